"""MLflow and Weights & Biases tracking of dlray runs (the job's `tracking:` section).

    dlray train jobs/cnn_digits.yaml tracking.mlflow={} tracking.wandb.mode=offline
    mlflow ui --backend-store-uri sqlite:///$HOME/dlray_runs/mlflow.db      # needs the full `mlflow` package
    wandb sync ~/dlray_runs/<run>/wandb/offline-run-*

A tracker is a Ray Train controller callback, as `dlray.runfiles.MetricsLogger` is: it runs in the
Train controller, which outlives the worker groups that FailureConfig restarts, so a run with a killed
worker stays one MLflow run / W&B run, and workers do no tracking I/O. It logs the flattened job config
as params, every epoch's metrics (and the final test report) at step global_step, workers' step-progress
reports as `step/<metric>`, and curves.png and sample grids as artifacts. The run is keyed by its run
directory: a run resumed by its `run.name` continues its MLflow run (found by the `dlray.run_dir` tag)
and its W&B run (whose id is derived from the directory). `dlray tune` nests each trial's run under one
MLflow run for the sweep and puts the trials in one W&B group; `dlray export` logs the artifact to the
run it came from.

Why not Ray's own integrations: `setup_mlflow` / `setup_wandb` run inside the training function (rank 0),
so a killed worker takes the run's handle with it and workers would do tracking I/O; `MLflowLoggerCallback`
/ `WandbLoggerCallback` are Tune logger callbacks, which Ray Train V2's RunConfig refuses (ray-project/ray#49454),
and under `dlray tune` they would see Tune's per-trial results only, without step reports, artifacts or a
parent run. What they do that fits is done the same way here: credentials from the environment, passed to
Ray's processes in the runtime env's env_vars (`tracking_env`, used by `dlray.local_cluster.init_ray`), W&B's run
grouped by the sweep, the config logged as params.

The controller hooks (`ControllerCallback`, `ReportCallback`) are Ray Train V2's DeveloperAPI: the public
`UserCallback` has no hook for the run's start and end, where a tracker opens and closes its run.
"""

from __future__ import annotations

import hashlib
import math
import netrc
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback

from dlray import reports
from dlray.config import JobConfig
from dlray.reports import Kind

# What MLflow, its Databricks backend and W&B read from the environment: URIs, tokens, API keys, modes.
TRACKING_ENV_PREFIXES = ("MLFLOW_", "DATABRICKS_", "WANDB_")
STEP_PREFIX = "step/"
RUN_DIR_TAG = "dlray.run_dir"
ARTIFACT_PATH = "artifact"  # where `dlray export` puts the exported artifact in the run's MLflow artifacts


def tracking_env() -> dict[str, str]:
    """The tracking credentials and settings of this environment, for the runtime env of Ray's processes
    (the Train controller that logs, Tune's trial drivers): never written to configs, params or logs."""
    return {k: v for k, v in os.environ.items() if k.startswith(TRACKING_ENV_PREFIXES)}


class TrackingError(ValueError):
    """Tracking the job asks for that cannot work from this environment."""


def check(cfg: JobConfig) -> None:
    """Refuse, before Ray starts anything, tracking that cannot work from here (raises TrackingError)."""
    if cfg.tracking.mlflow:
        mlflow_uri(cfg)
    wandb_cfg = cfg.tracking.wandb
    if wandb_cfg and wandb_cfg.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        try:
            logged_in = netrc.netrc().authenticators(host) is not None  # where `wandb login` keeps the key
        except (FileNotFoundError, netrc.NetrcParseError):
            logged_in = False
        if not logged_in:
            raise TrackingError("tracking.wandb.mode 'online' needs W&B credentials: set WANDB_API_KEY (or run `wandb login`), "
                             "or use tracking.wandb.mode=offline (written under the run directory; `wandb sync` it later)")


def callbacks(cfg: JobConfig, run_dir: str) -> list:
    """The Ray Train callbacks of the trackers the job turns on."""
    trackers: list = []
    if cfg.tracking.mlflow:
        trackers.append(MLflowTracker(cfg, run_dir))
    if cfg.tracking.wandb and cfg.tracking.wandb.mode != "disabled":
        trackers.append(WandbTracker(cfg, run_dir))
    return trackers


# ------------------------------------------------------------------------------ what is logged


# Counters of a step report that locate it rather than measure anything.
STEP_POSITION = ("epoch", "global_step", "step_in_epoch", "steps_per_epoch")


def tracked_metrics(record: dict) -> dict[str, float]:
    """The numbers of one report to log at its global_step: an epoch's (and the final report's) under
    their own names, a step report's under step/ (its train_loss is over the last few steps, not the
    epoch: a chart of its own, which W&B and MLflow group by the prefix)."""
    step = reports.kind(record) is Kind.STEP
    metrics = {}
    for key, value in reports.metrics(record).items():
        if key == "global_step" or isinstance(value, bool) or not isinstance(value, (int, float)) or (step and key in STEP_POSITION):
            continue
        metrics[STEP_PREFIX + key if step else key] = float(value)
    return metrics


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested job config as MLflow params: dotted keys (as overrides name them), values as text."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            params |= flatten(value, f"{prefix}{key}.")
        else:
            params[prefix + key] = str(value)
    return params


# ------------------------------------------------------------------------------ the callbacks


class Tracker(ControllerCallback, ReportCallback):
    """One run in a tracking service for one Ray Train run; subclasses say how to open, log and close it."""

    def __init__(self, cfg: JobConfig, run_dir: str):
        self.cfg, self.run_dir = cfg.model_copy(deep=True), run_dir

    def after_controller_start(self, train_run_context):
        self.start()

    def after_report(self, training_report, metrics):
        record = metrics[0]  # rank 0's: the loop all-reduces before reporting
        kind = reports.kind(record)
        if kind in (Kind.START, Kind.CHECKPOINT):  # where the ranks run, a checkpoint between validations: for the console
            return
        self.log(tracked_metrics(record), record.get("global_step", 0))
        if kind is Kind.STEP:
            return
        # MetricsLogger (a UserCallback, called before this) has just redrawn the curves and kept the epoch's sample grid.
        curves = Path(self.run_dir, "curves.png")
        if curves.exists():
            self.log_file(curves)
        grid = Path(self.run_dir, "samples", f"epoch_{record.get('epoch', 0):04d}.png")
        if training_report.checkpoint is not None and grid.exists():
            self.log_file(grid, "samples", record.get("global_step", 0))

    def after_controller_finish(self, result):
        self.finish("FAILED" if result.error else "FINISHED")

    def before_controller_abort(self):  # Ctrl-C on the driver
        self.finish("KILLED")

    def start(self): ...

    def log(self, metrics: dict[str, float], step: int): ...

    def log_file(self, path: Path, directory: str = "", step: int = 0): ...

    def finish(self, status: str): ...


class MLflowTracker(Tracker):
    def start(self):
        cfg = self.cfg
        self.client, self.run_id = mlflow_run(cfg, self.run_dir, flatten(cfg.model_dump(mode="json")))
        self.client.update_run(self.run_id, status="RUNNING")  # a resumed run ran before
        print(f"[dlray] MLflow run {self.run_id} in experiment {cfg.tracking.mlflow.experiment_name!r} at {redacted(mlflow_uri(cfg))}", flush=True)

    def log(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items() if math.isfinite(v)])

    def log_file(self, path, directory="", step=0):
        self.client.log_artifact(self.run_id, str(path), directory or None)

    def finish(self, status):
        self.client.set_terminated(self.run_id, status)


class WandbTracker(Tracker):
    def start(self):
        cfg = self.cfg
        self.run = wandb_run(cfg, self.run_dir)
        # One x axis for epoch and step metrics: step reports replayed after a restart go back in
        # global_step, which W&B's own step counter would refuse.
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        print(f"[dlray] W&B run {self.run.id} ({cfg.tracking.wandb.mode}) in project {cfg.tracking.wandb.project!r}: {self.run.dir}", flush=True)

    def log(self, metrics, step):
        self.run.log(metrics | {"global_step": step})

    def log_file(self, path, directory="", step=0):
        import wandb

        if directory:  # an image of the run's history (sample grids), shown by step
            self.run.log({directory: wandb.Image(str(path)), "global_step": step})
        else:  # a file of the run, uploaded with it (the run's files/ when offline)
            shutil.copy(path, Path(self.run.dir) / path.name)

    def finish(self, status):
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


# ------------------------------------------------------------------------------ MLflow


def mlflow_uri(cfg: JobConfig) -> str:
    """tracking.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else an SQLite store beside the runs
    (MLflow's own default store kind; its file store is deprecated)."""
    uri = cfg.tracking.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if "://" in cfg.run.storage_path:
        raise TrackingError(f"tracking.mlflow needs a tracking server when run.storage_path is a URI ({cfg.run.storage_path}): "
                         "set tracking.mlflow.tracking_uri or MLFLOW_TRACKING_URI")
    return "sqlite:///" + os.path.join(os.path.abspath(os.path.expanduser(cfg.run.storage_path)), "mlflow.db")


def mlflow_run(cfg: JobConfig, run_dir: str, params: dict[str, str] | None = None):
    """(MlflowClient, run id) of the run keyed by `run_dir`: continued where the experiment has it, else
    created with `params` (None: not created, run id None)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    settings = cfg.tracking.mlflow
    uri = mlflow_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        # A local store keeps artifacts beside its database (MLflow's default is ./mlruns of whichever
        # directory the logging process runs in: Ray's session directory, for the Train controller).
        location = os.path.join(os.path.dirname(uri.removeprefix("sqlite:///")), "mlartifacts") if uri.startswith("sqlite:///") else None
        try:
            experiment_id = client.create_experiment(settings.experiment_name, artifact_location=location)
        except MlflowException:  # created meanwhile by another run's controller
            experiment_id = client.get_experiment_by_name(settings.experiment_name).experiment_id
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'", max_results=1)
    if found:
        run_id, logged = found[0].info.run_id, found[0].data.params
    elif params is None:
        return client, None
    else:
        tags = {RUN_DIR_TAG: run_dir} | ({"mlflow.parentRunId": settings.parent_run_id} if settings.parent_run_id else {})
        run_id = client.create_run(experiment_id, run_name=os.path.basename(run_dir), tags=tags).info.run_id
        logged = {}
    if params:
        # MLflow refuses to change a logged param: a resumed run keeps the values it started with.
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]  # 6000: MLflow's longest param value
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=new[i : i + 100])
    return client, run_id


def redacted(uri: str) -> str:
    """A URI as printed: without a user or password it might carry."""
    parts = urlsplit(uri)
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl() if parts.username or parts.password else uri


# ------------------------------------------------------------------------------ W&B


def wandb_run_id(run_dir: str) -> str:
    """The W&B run id of a run directory: the same for every start of the run (restart, resume, export)."""
    return hashlib.sha1(run_dir.encode()).hexdigest()[:16]


def wandb_run(cfg: JobConfig, run_dir: str):
    import wandb

    settings = cfg.tracking.wandb
    os.makedirs(run_dir, exist_ok=True)
    return wandb.init(
        id=wandb_run_id(run_dir),
        resume="allow",
        name=os.path.basename(run_dir),
        project=settings.project,
        entity=settings.entity,
        group=settings.group,
        mode=settings.mode,
        dir=run_dir,  # offline runs land in <run dir>/wandb/offline-run-*
        config=cfg.model_dump(mode="json"),
        allow_val_change=True,  # a resumed run may train more epochs than it started with
        # silent and console off: dlray's console is the process's stdout; no system metrics, as they
        # would describe the Train controller's process, not the training workers'.
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )


# ------------------------------------------------------------------------------ sweeps and exports


def start_sweep(cfg: JobConfig, sweep_dir: str) -> dict[str, object]:
    """Open the sweep's own MLflow run (continued on --resume) and return what each trial's config
    needs to join the sweep: the parent run, the W&B group, the store the parent is in."""
    overrides: dict[str, object] = {}
    if cfg.tracking.mlflow:
        _, parent = mlflow_run(cfg, sweep_dir, flatten(cfg.model_dump(mode="json")))
        overrides["tracking.mlflow.parent_run_id"] = parent
        if not (cfg.tracking.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            overrides["tracking.mlflow.tracking_uri"] = mlflow_uri(cfg)  # a trial's storage path is inside the sweep's
    if cfg.tracking.wandb:
        overrides["tracking.wandb.group"] = cfg.tracking.wandb.group or cfg.run.name
    return overrides


def end_sweep(cfg: JobConfig, sweep_dir: str, files: list[Path]) -> None:
    """Attach the sweep's results to its MLflow run and mark it finished, and the trials' runs a scheduler
    stopped early killed (Tune ends such a trial's process, and its Train controller with it, mid-run)."""
    if not cfg.tracking.mlflow:
        return
    client, parent = mlflow_run(cfg, sweep_dir)
    for path in files:
        if path.exists():
            client.log_artifact(parent, str(path))
    experiment = client.get_run(parent).info.experiment_id
    for trial in client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"):
        client.set_terminated(trial.info.run_id, "KILLED")
    client.set_terminated(parent, "FINISHED")


def log_export(cfg: JobConfig, artifact: Path) -> None:
    """Log an exported artifact to the tracked run it was exported from (`cfg`: the run's, from its checkpoint)."""
    if cfg.run.name is None:  # a checkpoint saved outside train.fit: no run, nothing tracked
        return
    run_dir = os.path.join(cfg.run.storage_path, cfg.run.name)  # absolute: train.fit resolved it before the checkpoint kept it
    if cfg.tracking.mlflow:
        client, run_id = mlflow_run(cfg, run_dir)
        if run_id is not None:
            client.log_artifacts(run_id, str(artifact), ARTIFACT_PATH)
    if cfg.tracking.wandb and cfg.tracking.wandb.mode != "disabled":
        import wandb

        run = wandb_run(cfg, run_dir)
        model = wandb.Artifact(f"{os.path.basename(run_dir)}-model", type="model")
        model.add_dir(str(artifact))
        run.log_artifact(model)
        run.finish()
