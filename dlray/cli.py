"""dlray command line: each verb is a few lines calling the module of the same name.

    dlray validate jobs/cnn_digits.yaml [key=value ...]
    dlray plan     jobs/gpu/gpt_1b_fsdp.yaml [key=value ...] [--json]
    dlray train    jobs/cnn_digits.yaml [key=value ...]
    dlray tune     jobs/sweep_cnn_asha.yaml [key=value ...] [--resume]
    dlray export   <run-dir | sweep-dir | checkpoint-dir> out/cnn
    dlray serve    out/cnn [max_batch_size=16 ...] [--print-config]
    dlray bench    [train|cluster|tune|data|serve|diffusion|llm|checkpoint|all]
    dlray k8s render jobs/cnn_digits.yaml [key=value ...] --image IMG [--kind rayservice --artifact DIR]
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Optional

import typer
import yaml

from dlray.config import ConfigError, JobConfig, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
OVERRIDES = typer.Argument(None, help="dotted overrides, e.g. strategy.name=deepspeed strategy.zero_stage=3")
ENGINE_NAMES = {"vllm": "vLLM through Ray Serve LLM", "dlray": "dlray's engine"}  # serve.engine, as `dlray serve` names it
VERBOSE = typer.Option(False, "--verbose", "-v", help="keep Ray's own INFO lines (per-report, per-checkpoint, per-request) in the output")


def _load(job: Optional[Path], overrides: Optional[list[str]]) -> JobConfig:
    try:
        return load_config(job, overrides or [])
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _check_fits(cfg: JobConfig) -> None:
    """A GPU job with a scaling.accelerator_type whose memory plan exceeds that GPU stops here, before any cluster starts."""
    from dlray.plan import PlanError, check_fits

    try:
        check_fits(cfg)
    except PlanError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def validate(job: Path, overrides: Optional[list[str]] = OVERRIDES):
    """Check a job config (and overrides) without starting anything; print the resolved config."""
    cfg = _load(job, overrides)
    _check_fits(cfg)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    typer.echo(f"ok: {job} is a valid job config", err=True)


@app.command()
def plan(job: Path, overrides: Optional[list[str]] = OVERRIDES,
         as_json: bool = typer.Option(False, "--json", help="num_params, world_size and per_device bytes as JSON")):
    """What each device will hold (parameters, gradients, optimizer state, activations, buffers), from the model
    built on fake tensors: no memory, no download, no cluster."""
    cfg = _load(job, overrides)
    from dlray.plan import PlanError, describe
    from dlray.plan import plan as memory_plan

    try:
        result = memory_plan(cfg)
    except PlanError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result.to_json(), indent=2) if as_json else result.render(f"{job}: {describe(cfg)}"))


@app.command()
def train(job: Path, overrides: Optional[list[str]] = OVERRIDES, verbose: bool = VERBOSE):
    """Train on Ray Train: the cluster in RAY_ADDRESS, or a local Ray on 127.0.0.1."""
    cfg = _load(job, overrides)
    _check_fits(cfg)
    from ray.train import TrainingFailedError

    from dlray import trackers
    from dlray.console import Console
    from dlray.local_cluster import init_ray
    from dlray.train import fit, run_dir

    try:
        trackers.check(cfg)  # before any cluster starts
    except trackers.TrackingError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    init_ray(verbose)
    with Console(cfg, verbose) as console:
        console.print(f"[dlray] training {job} as run {cfg.run.name}: {cfg.model.family}/{cfg.model.flavor}, "
                      f"{cfg.scaling.num_workers} workers{' with GPUs' if cfg.scaling.use_gpu else ''}, strategy {cfg.strategy.name}; run directory {run_dir(cfg)}")
        try:
            result = fit(cfg, console=console)
        except TrainingFailedError as error:  # Ray Train V2's fit raises its Result's error: the summary says it, no traceback
            result = failed_result(error, run_dir(cfg))
    console.summary(result, run_dir(cfg))
    if result.error:
        raise typer.Exit(1)


def failed_result(error, path: str):
    """A failed run's Result: its checkpoints (none before the first) and its error."""
    from ray.train import Result

    try:
        result = Result.from_path(path)
    except RuntimeError:  # no checkpoint yet
        result = Result(metrics={}, checkpoint=None, error=None, path=path, metrics_dataframe=None, best_checkpoints=[])
    result.error = error
    return result


@app.command()
def tune(
    job: Path,
    overrides: Optional[list[str]] = OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="continue this job file's newest sweep (or the one named by run.name)"),
    verbose: bool = VERBOSE,
):
    """Hyperparameter sweep with Ray Tune: each trial a full training run of the job."""
    cfg = _load(job, overrides)
    if cfg.tune is None:
        typer.echo(f"error: {job} has no `tune:` section (see jobs/sweep_cnn_asha.yaml); to train it once, use `dlray train`", err=True)
        raise typer.Exit(2)
    from dlray.train import storage_path
    from dlray.tune import latest_sweep, load_sweep, run_sweep

    if resume:
        named = any(o.startswith("run.name=") for o in overrides or []) or (yaml.safe_load(job.read_text()).get("run") or {}).get("name")
        sweep = Path(storage_path(cfg.run.storage_path), cfg.run.name) if named else latest_sweep(storage_path(cfg.run.storage_path), job.stem)
        if sweep is None or not sweep.exists():
            typer.echo(f"error: no sweep of {job} to resume under {storage_path(cfg.run.storage_path)}", err=True)
            raise typer.Exit(2)
        typer.echo(f"resuming sweep {sweep}")
        cfg = load_sweep(sweep)
    from dlray.trackers import TrackingError

    try:
        grid = run_sweep(cfg, resume=resume, verbose=verbose)
    except (FileExistsError, FileNotFoundError, TrackingError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if grid.num_terminated == 0:
        typer.echo("no trial finished", err=True)
        raise typer.Exit(1)


@app.command()
def export(
    source: Path,
    out: Path,
    merge_lora: bool = typer.Option(False, "--merge-lora", help="adapter runs: write the base with the adapters merged in, not the adapter alone"),
):
    """Checkpoint (or the best checkpoint of a run or a sweep) -> servable artifact (safetensors + dlray.json)."""
    from dlray.export import export as export_artifact

    path = export_artifact(source, out, merge_lora=merge_lora)
    typer.echo(f"artifact written to {path}")


@app.command()
def serve(
    artifact: Path,
    overrides: Optional[list[str]] = typer.Argument(None, help="serve settings, e.g. max_batch_size=16 num_replicas=2 port=8001"),
    print_config: bool = typer.Option(False, "--print-config", help="print a Serve config YAML for `serve deploy` instead of serving"),
    verbose: bool = VERBOSE,
):
    """Serve an exported artifact with Ray Serve until interrupted; print its routes and an example request."""
    from dlray.serve.app import ServeAddressError, describe, engine_of, run, serve_config

    settings = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            typer.echo(f"error: serve override {item!r} must look like key=value", err=True)
            raise typer.Exit(2)
        settings[key.removeprefix("serve.")] = yaml.safe_load(value)
    try:
        config = serve_config(str(artifact), settings)  # the settings checked before Ray starts
        engine = None if print_config else engine_of(str(artifact), settings)  # the cluster that deploys the config picks its own
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if print_config:
        typer.echo(yaml.safe_dump(config, sort_keys=False))
        return
    from dlray.local_cluster import init_ray

    init_ray(verbose)
    on = "" if engine is None else f" on {ENGINE_NAMES[engine[0]]} ({engine[1]})"
    typer.echo(f"starting {artifact}{on}")
    # `kill`, systemd and container runtimes stop a server with SIGTERM: shut Serve down as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run(str(artifact), settings, verbose=verbose)
    except ServeAddressError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"serving {artifact}; Ctrl-C to stop\n{describe(str(artifact), settings)}")
    threading.Event().wait()  # until Ctrl-C or SIGTERM raise KeyboardInterrupt


@app.command()
def bench(what: str = typer.Argument("all", help="train | cluster | tune | data | serve | diffusion | llm | checkpoint | all, or one benchmark, e.g. llm_train"),
          out: Path = typer.Option(Path("benchmarks/results.md"))):
    """Measure dlray against plain PyTorch / unbatched baselines; write the results file."""
    from dlray.bench import run_benchmarks

    run_benchmarks(what, out)


k8s_app = typer.Typer(no_args_is_help=True, help="KubeRay manifests rendered from a job config.")
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(
    job: Path,
    overrides: Optional[list[str]] = OVERRIDES,
    image: str = typer.Option(..., help="container image built from the Dockerfile, e.g. registry.example.com/dlray:0.1.0"),
    kind: str = typer.Option("rayjob", help="rayjob (runs `dlray train`) | rayservice (serves --artifact)"),
    artifact: Optional[str] = typer.Option(None, help="rayservice: exported artifact dir on the shared volume, e.g. /mnt/shared/artifacts/cnn"),
    name: Optional[str] = typer.Option(None, help="metadata.name; default dlray-<job file stem>"),
):
    """Print a RayJob or RayService manifest for `kubectl apply -f -`."""
    from dlray.k8s import dump, render

    try:
        manifest = render(job, overrides or [], image=image, kind=kind, artifact=artifact, name=name)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(dump(manifest), nl=False)


if __name__ == "__main__":
    app()
