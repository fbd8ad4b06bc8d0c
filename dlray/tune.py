"""Hyperparameter sweeps: a job YAML plus a `tune:` section, run by Ray Tune over dlray training.

    dlray tune jobs/sweep_cnn_asha.yaml            # local Ray, or the cluster in RAY_ADDRESS
    dlray tune jobs/sweep_cnn_asha.yaml --resume   # continue the newest sweep of this file
    dlray export ~/dlray_runs/<sweep-name> out/best

Each Tune trial is a driver function that runs the job, with the trial's values applied, through
`train.fit` (a TorchTrainer with the job's own ScalingConfig). A Ray Train callback hands every
epoch's report to the trial, which reports it to Tune: ASHA, HyperBand, median stopping and PBT
decide after each epoch. Ray's own TuneReportCallback does the same for metrics but gives Tune no
checkpoint, and PBT skips every exploit without one; here, under PBT, each epoch's checkpoint
is reported too, and a trial restarted from another's continues it as a new Train run.

The sweep directory (<run.storage_path>/<run.name>) holds Tune's state and trial logs,
`sweep.yaml` (the resolved config, read back by --resume), `runs/<trial>` (each trial's Train
run: checkpoints, metrics.csv, curves.png, tensorboard/) and, at the end, `results.csv`,
`trials.png` and `best_config.yaml`, a job file that `dlray train` runs as it is.
"""

from __future__ import annotations

import copy
import hashlib
import math
import threading
from pathlib import Path

import yaml
from ray.train import UserCallback

from dlray import reports, trackers
from dlray.config import JobConfig, config_from_dict, set_dotted
from dlray.console import format_epoch
from dlray.reports import Kind

SWEEP_FILE = "sweep.yaml"
RESULTS_FILE = "results.csv"


def run_sweep(cfg: JobConfig, resume: bool = False, verbose: bool = True):
    """Run (or, with `resume`, continue) the sweep `cfg.tune` describes; returns Tune's ResultGrid.
    Not `verbose` (the CLI's default): Tune's status tables and each trial's epoch lines, without
    Ray Train's per-report INFO lines."""
    import ray
    from ray import tune

    from dlray.local_cluster import init_ray
    from dlray.train import storage_path

    if cfg.tune is None:
        raise ValueError("this job has no `tune:` section; add one (see jobs/sweep_cnn_asha.yaml) or use `dlray train`")
    trackers.check(cfg)
    init_ray(verbose)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"storage_path": storage_path(cfg.run.storage_path)})})
    sweep = Path(cfg.run.storage_path, cfg.run.name)
    job = cfg.model_dump(mode="json")
    if resume and not tune.Tuner.can_restore(str(sweep)):
        raise FileNotFoundError(f"no sweep to resume in {sweep}")
    if not resume and sweep.exists():
        raise FileExistsError(f"{sweep} exists: resume it with --resume, or pick another run.name")
    trials_job = copy.deepcopy(job)  # each trial's run joins the sweep's tracking: its MLflow parent run, its W&B group
    for path, value in trackers.start_sweep(cfg, str(sweep)).items():
        set_dotted(trials_job, path, value)
    # Train workers hold the trial's CPUs and GPUs; the driver only waits on them, and a CPU
    # of its own would leave a 2-worker trial unable to start on a 2-CPU machine. (Tune needs
    # some resource in the trial's bundle: a little memory, then.)
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=trials_job, verbose=verbose), {"cpu": 0, "memory": 64 * 2**20})
    if resume:
        tuner = tune.Tuner.restore(str(sweep), trainable, resume_unfinished=True, resume_errored=False)
    else:
        sweep.mkdir(parents=True)
        (sweep / SWEEP_FILE).write_text(yaml.safe_dump(job, sort_keys=False))
        max_concurrent = cfg.tune.max_concurrent_trials or concurrent_trials(cfg, ray.cluster_resources())
        param_space, search_alg = search_space(cfg, max_concurrent)
        pbt = cfg.tune.scheduler.name == "pbt"
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=cfg.train.metric,
                mode=cfg.train.mode,
                num_samples=cfg.tune.num_samples,
                scheduler=trial_scheduler(cfg),
                search_alg=search_alg,
            ),
            run_config=tune.RunConfig(
                name=cfg.run.name,
                storage_path=cfg.run.storage_path,
                verbose=1,  # status tables only: each trial's run prints its own epoch lines
                # PBT restores trials from Tune checkpoints; keep a few, as its docs advise.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4) if pbt else None,
            ),
        )
    grid = tuner.fit()
    # Trial statuses as Tune saved them, which is what --resume goes by (an interrupted trial is
    # still RUNNING there; the in-memory results cannot tell it from one ASHA stopped).
    statuses = {t.path: t.status for t in tune.ExperimentAnalysis(str(sweep)).trials}
    rows = summarize(grid, cfg, statuses)
    ended = [r for r in rows if r["status"] != "unfinished"]
    if len(ended) < expected_trials(cfg.tune):
        print(f"\nsweep interrupted with {len(ended)} of {expected_trials(cfg.tune)} trials ended; continue it with "
              f"`dlray tune <job> --resume` (the newest sweep of that job file, or name it with run.name={cfg.run.name})")
    else:
        write_results(rows, cfg, sweep)
        trackers.end_sweep(cfg, str(sweep), [sweep / RESULTS_FILE, sweep / "trials.png", sweep / "best_config.yaml"])
    return grid


def expected_trials(tune_cfg) -> int:
    """num_samples per grid point, as Ray's variant generator makes them."""
    grid_points = 1
    for param in tune_cfg.search_space.values():
        name, args = param.distribution
        if name == "grid" or (name == "choice" and tune_cfg.search_alg.name == "grid"):
            grid_points *= len(args)
    return tune_cfg.num_samples * grid_points


def load_sweep(sweep_dir: str | Path) -> JobConfig:
    """The config a sweep started with (for --resume: the job file may have changed since)."""
    path = Path(sweep_dir, SWEEP_FILE)
    if not path.exists():
        raise FileNotFoundError(f"{sweep_dir} is not a dlray sweep (no {SWEEP_FILE})")
    return config_from_dict(yaml.safe_load(path.read_text()))


def latest_sweep(storage: str, job_stem: str) -> Path | None:
    """The newest `<job_stem>-<timestamp>` sweep under storage, for `dlray tune JOB --resume`."""
    sweeps = sorted(Path(storage).glob(f"{job_stem}-*/{SWEEP_FILE}"), key=lambda p: p.parent.name)
    return sweeps[-1].parent if sweeps else None


# ------------------------------------------------------------------------- search space


def search_space(cfg: JobConfig, max_concurrent: int):
    """(param_space, search_alg) for the Tuner. Keys are dotted config paths. (The searcher
    carries the concurrency limit: Tune ignores max_concurrent_trials for a searcher given to it.)"""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tune_cfg = cfg.tune
    if tune_cfg.search_alg.name == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        space = tune_cfg.search_space

        def define_by_run(trial):
            # Optuna asks only for the entries whose `when` holds: truly conditional spaces.
            values, constants = {}, {}
            for path, param in space.items():
                if param.active(values):
                    values[path] = suggest(trial, path, param)
                    if not isinstance(values[path], (bool, int, float, str)):
                        constants[path] = values[path]  # Optuna tracked its index; Tune's config gets the value
            return constants

        sampler = optuna.samplers.TPESampler(seed=tune_cfg.search_alg.seed)
        optuna_search = OptunaSearch(space=define_by_run, metric=cfg.train.metric, mode=cfg.train.mode, sampler=sampler)
        return {}, ConcurrencyLimiter(optuna_search, max_concurrent=max_concurrent)
    as_grid = tune_cfg.search_alg.name == "grid"
    param_space = {path: domain(param, as_grid) for path, param in tune_cfg.search_space.items()}
    return param_space, BasicVariantGenerator(random_state=tune_cfg.search_alg.seed, max_concurrent=max_concurrent)


def domain(param, as_grid: bool = False):
    """The ray.tune sampling domain of a search-space entry. A conditional entry is sampled in
    every trial, as Ray's generators sample independently, and applied only where it is active."""
    from ray import tune

    name, args = param.distribution
    if name == "grid" or (name == "choice" and as_grid):
        return tune.grid_search(list(args))
    if name == "choice":
        return tune.choice(list(args))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[name](*args)


def suggest(trial, path: str, param):
    name, args = param.distribution
    if name == "choice":
        if all(isinstance(a, (bool, int, float, str)) for a in args):
            return trial.suggest_categorical(path, list(args))
        return args[trial.suggest_categorical(path + "#index", list(range(len(args))))]  # Optuna takes plain values only
    if name == "randint":
        return trial.suggest_int(path, args[0], args[1] - 1)
    return trial.suggest_float(path, args[0], args[1], log=name == "loguniform")


def trial_values(tune_cfg, config: dict) -> dict:
    """The searched values a trial uses: its active entries."""
    return {path: config[path] for path, param in tune_cfg.search_space.items() if path in config and param.active(config)}


def trial_job(job: dict, values: dict) -> JobConfig:
    trial = copy.deepcopy({k: v for k, v in job.items() if k != "tune"})
    for path, value in values.items():
        set_dotted(trial, path, value)
    return config_from_dict(trial)


# --------------------------------------------------------------------------- scheduling


def trial_scheduler(cfg: JobConfig):
    """One Tune iteration is one validation (plus the run's final report, which carries the best value)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule, PopulationBasedTraining

    s, epochs = cfg.tune.scheduler, cfg.sweep_max_t()
    if s.name == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial at the epoch budget ends by itself, after its test evaluation.
    if s.name == "asha":
        return ASHAScheduler(max_t=epochs, grace_period=s.grace_period, reduction_factor=s.reduction_factor, stop_last_trials=False)
    if s.name == "hyperband":
        return HyperBandScheduler(max_t=epochs, reduction_factor=s.reduction_factor, stop_last_trials=False)
    if s.name == "median":
        return MedianStoppingRule(grace_period=s.grace_period, min_samples_required=s.min_samples_required)
    return PopulationBasedTraining(
        time_attr="training_iteration",  # validations, as perturbation_interval counts them (Ray's default is seconds)
        perturbation_interval=s.perturbation_interval,
        hyperparam_mutations={path: domain(p) for path, p in cfg.tune.search_space.items()},
        quantile_fraction=s.quantile_fraction,
        resample_probability=s.resample_probability,
        synch=s.synch,
    )


def concurrent_trials(cfg: JobConfig, cluster: dict) -> int:
    """How many trials' Train worker groups the cluster holds at once (Ray's advice for Tune
    over Train: more drivers than that only wait)."""
    per_worker = cfg.scaling.resources_per_worker or {}
    fits = [cluster.get("CPU", 0) // (cfg.scaling.num_workers * per_worker.get("CPU", 1))]
    if cfg.scaling.use_gpu:
        fits.append(cluster.get("GPU", 0) // (cfg.scaling.num_workers * per_worker.get("GPU", 1)))
    return max(1, int(min(fits)))


# ------------------------------------------------------------------------------ a trial


def run_trial(config: dict, job: dict, verbose: bool = True) -> None:
    """Tune's function for one trial: the job with this trial's values, trained by train.fit."""
    from ray import tune
    from ray.util.queue import Queue

    from dlray.train import fit

    tune_cfg = JobConfig.model_validate(job).tune
    sweep = Path(job["run"]["storage_path"], job["run"]["name"])
    trial_id = tune.get_context().get_trial_id()
    start = tune.get_checkpoint()  # PBT: another (or this) trial's checkpoint to continue from
    cfg = trial_job(job, trial_values(tune_cfg, config) | {
        "run.storage_path": str(sweep / "runs"),
        "run.name": trial_id if start is None else f"{trial_id}-{hashlib.sha1(start.path.encode()).hexdigest()[:8]}",
        "run.resume_from_checkpoint": start.path if start else None,
    })
    with_checkpoints = tune_cfg.scheduler.name == "pbt"

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome = {}

    def train():
        try:
            outcome["result"] = fit(cfg, callbacks=[TrialReporter(queue, cfg.train.metric)], verbose=verbose)
        except BaseException as err:  # noqa: BLE001 - handed to the trial's thread, which raises it
            outcome["error"] = err
        finally:
            queue.put(None)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    while (item := queue.get()) is not None:
        metrics, checkpoint_path = item
        if reports.kind(metrics) is Kind.EPOCH:  # an epoch's: its line, under the trial's name in the driver's output
            print(format_epoch(metrics, cfg.train.num_epochs).replace("[dlray]", f"[dlray] {trial_id}", 1), flush=True)
        checkpoint = tune.Checkpoint(checkpoint_path) if with_checkpoints and checkpoint_path else None
        tune.report(metrics, checkpoint=checkpoint)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    if outcome["result"].error:
        raise outcome["result"].error


class TrialReporter(UserCallback):
    """Ray Train callback (in the Train controller): every report, to the trial's driver."""

    def __init__(self, queue, metric: str):
        self.queue, self.metric = queue, metric

    def after_report(self, run_context, metrics, checkpoint):
        if reports.kind(metrics[0]) in (Kind.START, Kind.STEP, Kind.CHECKPOINT):  # Tune's schedulers decide per validation
            return
        record = dict(metrics[0])
        # The final report scores the run's best checkpoint: its value is the best epoch's.
        record.setdefault(self.metric, record.get("best_" + self.metric))
        if checkpoint:
            record["checkpoint_path"] = checkpoint.path
        self.queue.put((record, checkpoint.path if checkpoint else None))


# ------------------------------------------------------------------------------ results


def summarize(grid, cfg: JobConfig, statuses: dict[str, str]) -> list[dict]:
    """One row per trial: its searched values, best metric, epochs run and how it ended (and,
    not written to the CSV, its per-epoch history for the plot). `statuses`: Tune's, by trial path."""
    metric, best = cfg.train.metric, (max if cfg.train.mode == "max" else min)
    rows = []
    for result in grid:
        history = epoch_history(result)
        values = [r[metric] for r in history if math.isfinite(r.get(metric, math.nan))]
        last = result.metrics or {}
        if result.error:
            status = "failed: " + _one_line(result.error)
        elif statuses.get(result.path) != "TERMINATED":
            status = "unfinished"
        elif last and reports.kind(last) is Kind.FINAL:
            status = "completed"
        else:
            status = f"stopped early (ran {len(history)}/{cfg.train.num_epochs} epochs)"
        rows.append({
            "trial_id": last.get("trial_id") or Path(result.path).name,
            **trial_values(cfg.tune, result.config or {}),
            metric: best(values) if values else None,
            "epochs": len({r["epoch"] for r in history}),
            "status": status,
            "history": history,
        })
    sign = 1 if cfg.train.mode == "max" else -1
    rows.sort(key=lambda r: (r[metric] is None, -sign * (r[metric] or 0)))
    return rows


def epoch_history(result) -> list[dict]:
    """The trial's per-epoch reports, in order (the final test report left out)."""
    frame = result.metrics_dataframe
    if frame is None or reports.KIND not in frame:
        return []
    return reports.epochs(frame.to_dict("records"))


def write_results(rows: list[dict], cfg: JobConfig, sweep: Path) -> None:
    import csv

    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "history"]
    with open(sweep / RESULTS_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_trials(rows, cfg, sweep / "trials.png")
    best = next((r for r in rows if r[cfg.train.metric] is not None and not r["status"].startswith("failed")), None)
    if best is not None:
        write_best_config(best, cfg, sweep)
    print(format_table(rows, keys))
    print(f"\nsweep directory: {sweep}  ({RESULTS_FILE}, trials.png, best_config.yaml, runs/)")
    if best is not None:
        print(f"next: dlray export {sweep} out/{cfg.run.name}   (the best trial's best checkpoint), or dlray train {sweep / 'best_config.yaml'}")


def write_best_config(best: dict, cfg: JobConfig, sweep: Path) -> None:
    values = {k: v for k, v in best.items() if k in cfg.tune.search_space}
    job = trial_job(cfg.model_dump(mode="json"), values).model_dump(mode="json", exclude={"tune"})
    job["run"]["name"] = None  # a fresh run name per `dlray train`
    path = sweep / "best_config.yaml"
    header = f"# dlray train {path}\n# The best trial ({best['trial_id']}, {cfg.train.metric} {best[cfg.train.metric]:.4g}) of sweep {cfg.run.name}.\n"
    path.write_text(header + yaml.safe_dump(job, sort_keys=False))


def plot_trials(rows: list[dict], cfg: JobConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = cfg.train.metric
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        points = [(r["epoch"] + 1, r[metric]) for r in row["history"] if math.isfinite(r.get(metric, math.nan))]
        if not points:
            continue
        xs, ys = zip(*points)
        ended_early = row["status"] != "completed"
        line = ax.plot(xs, ys, "--" if ended_early else "-", marker="o", markersize=3, label=f"{row['trial_id']} ({row['status'].split(' (')[0]})")
        if ended_early:  # where the scheduler (or an error) ended it
            ax.plot(xs[-1], ys[-1], "x", color=line[0].get_color(), markersize=10)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{cfg.run.name}: dashed, x = stopped early or failed")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(rows: list[dict], keys: list[str]) -> str:
    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = {k: min(60, max(len(k), *(len(cell(r.get(k))) for r in rows))) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(cell(r.get(k))[: widths[k]].ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def _one_line(error: BaseException) -> str:
    """The root cause's line of a (Ray-wrapped) traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1].strip() if lines else type(error).__name__)[:200]

