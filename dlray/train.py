"""Driver side of training: builds Ray Train's TorchTrainer from a JobConfig and runs it.

    dlray train jobs/cnn_digits.yaml                     # a local Ray on 127.0.0.1
    RAY_ADDRESS=http://head:8265 ray job submit --working-dir . -- dlray train jobs/cnn_digits.yaml
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dlray import trackers
from dlray.config import JobConfig
from dlray.data import streamed
from dlray.local_cluster import init_ray
from dlray.loop import train_loop_per_worker
from dlray.runfiles import MetricsLogger
from dlray.streaming import prepare_data, train_data_config
from dlray.watchdog import Watchdog

if TYPE_CHECKING:
    from dlray.console import Console
    from dlray.streaming import PreparedData


def fit(cfg: JobConfig, callbacks: list | None = None, console: Console | None = None, verbose: bool | None = None) -> Result:
    """Train per `cfg` on the connected Ray cluster (or a new local one) and return Ray's Result.

    Re-running with the same `run.name` and `run.storage_path` resumes that run from its last
    checkpoint; a worker lost mid-run restarts from it, up to `run.max_failures` times. With a
    `console` (dlray.console), progress shows there. Not `verbose` (default: the console's, else
    verbose), Ray Train's own INFO lines stay off.
    """
    if cfg.run.name is None:
        raise ValueError("run.name must be set (load_config names runs after their job file)")
    trackers.check(cfg)
    init_ray()
    # Resolved once, here: `ray job submit --working-dir` runs us in a temporary copy of the working dir, and
    # a relative path would put checkpoints there. The workers, the trackers and the checkpoints' configs get it.
    storage = storage_path(cfg.run.storage_path)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"storage_path": storage})})
    check_shared_storage(storage)
    verbose = verbose if verbose is not None else (console.verbose if console else True)
    if not verbose:
        # Each split's coordinator draws a bar per operator per epoch through Ray's tqdm; without it, off a
        # terminal, Ray Data logs progress at INFO, which RAY_DATA_LOG_LEVEL (init_ray) keeps out. (With bars
        # disabled outright it warns once per process that they are.) Datasets keep the context they were made in.
        ray.data.DataContext.get_current().use_ray_tqdm = False
    data = data_for_workers(cfg)
    log_level = "INFO" if verbose else "WARNING"
    watchdog = Watchdog.start(cfg.run.hang_timeout_s, run_dir(cfg), console.queue if console else None)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), **data.worker_config, "log_level": log_level, "watchdog": watchdog and watchdog.actor},
        datasets=data.datasets,
        dataset_config=train_data_config(),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.resources_per_worker,
            placement_strategy=cfg.scaling.placement_strategy,
            accelerator_type=cfg.scaling.accelerator_type,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures, max_preemption_failures=cfg.run.max_preemption_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.checkpoint_num_to_keep,
                checkpoint_score_attribute=cfg.train.metric,
                checkpoint_score_order=cfg.train.mode,
            ),
            callbacks=[MetricsLogger(run_dir(cfg)), *(console.callbacks() if console else []), *(callbacks or []), *trackers.callbacks(cfg, run_dir(cfg))],
            worker_runtime_env={"env_vars": worker_env(cfg)},
            logging_config=ray.train.LoggingConfig(log_level=log_level),
        ),
    )
    try:
        return trainer.fit()
    finally:
        if watchdog:
            watchdog.stop()


def data_for_workers(cfg: JobConfig) -> PreparedData:
    """The Ray Data pipelines of a streamed source (data.streaming, or the rule in dlray.data.rows), or the data built here."""
    if streamed(cfg.data) and (warning := preprocessing_cpus_warning(cfg, ray.cluster_resources().get("CPU", 0))):
        print(f"[dlray] warning: {warning}", flush=True)
    return prepare_data(cfg.data, cfg.train.seed, cfg.scaling.num_workers)


def preprocessing_cpus_warning(cfg: JobConfig, cluster_cpus: float) -> str | None:
    """Streamed data's preprocessing runs as Ray Data tasks beside the training workers: on a cluster whose
    CPUs the workers hold every one of, they wait for ever (an autoscaling cluster may add a CPU node)."""
    held = cfg.scaling.num_workers * (cfg.scaling.resources_per_worker or {}).get("CPU", 1)
    if cluster_cpus - held >= cfg.data.preprocess_num_cpus:
        return None
    return (f"streamed data is preprocessed by Ray Data tasks of data.preprocess_num_cpus={cfg.data.preprocess_num_cpus:g} CPU, but the "
            f"{cfg.scaling.num_workers} training workers hold {held:g} of this cluster's {cluster_cpus:g} CPUs: unless it autoscales, "
            "the first epoch will wait for ever; add a CPU node, or lower scaling.resources_per_worker.CPU or data.preprocess_num_cpus")


def run_dir(cfg: JobConfig) -> str:
    """Where Ray Train keeps this run: checkpoints, metrics.csv, curves.png, tensorboard/."""
    return os.path.join(storage_path(cfg.run.storage_path), cfg.run.name)


def storage_path(path: str) -> str:
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def check_shared_storage(storage: str) -> None:
    """Refuse, before training starts, a storage path some node cannot see.

    On a multi-node cluster every rank writes its checkpoint shards under run.storage_path and
    a restarted group reads them back from whichever node it lands on: node-local disk loses
    them. A marker file written here must be visible from a probe task pinned to each node.
    """
    if "://" in storage:  # cloud storage (s3://, gs://, ...) is shared by construction
        return
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if len(nodes) < 2:
        return
    os.makedirs(storage, exist_ok=True)
    marker = os.path.join(storage, f".dlray-shared-check-{uuid.uuid4().hex}")
    open(marker, "w").close()
    try:
        blind = nodes_not_seeing(marker, nodes)
    finally:
        os.remove(marker)
    if blind:
        raise StorageNotSharedError(
            f"run.storage_path {storage!r} is not visible from node(s) {', '.join(blind)}: multi-node runs need shared "
            "storage for checkpoints (an NFS/EFS/Filestore mount at the same path on every node, or a URI such as s3://bucket/runs)"
        )


class StorageNotSharedError(ValueError):
    pass


def nodes_not_seeing(path: str, nodes: list[dict]) -> list[str]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(os.path.exists)
    refs = {f"{n['NodeID'][:12]} ({n['NodeManagerAddress']})": probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
            for n in nodes}
    return [name for name, ref in refs.items() if not ray.get(ref)]


def worker_env(cfg: JobConfig) -> dict[str, str]:
    # DeepSpeed's accelerator follows the workers' device, whatever the submitting environment says
    # (a DS_ACCELERATOR=cpu left there by a laptop run would put GPU workers on its CPU backend).
    # DLRAY_TEST_SLOW_RANK: the straggler test's hook (dlray.watchdog.slowed), passed on where it is set.
    return {"DS_ACCELERATOR": "cuda" if cfg.scaling.use_gpu else "cpu"} | {k: v for k, v in os.environ.items() if k == "DLRAY_TEST_SLOW_RANK"}
