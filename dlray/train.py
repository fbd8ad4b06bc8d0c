"""Driver side of training: builds Ray Train's TorchTrainer from a JobConfig and runs it.

    dlray train jobs/cnn_digits.yaml                     # a local Ray on 127.0.0.1
    RAY_ADDRESS=http://head:8265 ray job submit --working-dir . -- dlray train jobs/cnn_digits.yaml
"""

from __future__ import annotations

import os

import ray
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dlray.config import JobConfig
from dlray.loop import train_loop_per_worker
from dlray.tracking import MetricsLogger


def fit(cfg: JobConfig, callbacks: list | None = None) -> Result:
    """Train per `cfg` on the connected Ray cluster (or a new local one) and return Ray's Result.

    Re-running with the same `run.name` and `run.storage_path` resumes that run from its last
    checkpoint; a worker lost mid-run restarts from it, up to `run.max_failures` times.
    """
    init_ray()
    if cfg.run.name is None:
        raise ValueError("run.name must be set (load_config names runs after their job file)")
    storage = storage_path(cfg.run.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.resources_per_worker,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.checkpoint_num_to_keep,
                checkpoint_score_attribute=cfg.train.metric,
                checkpoint_score_order=cfg.train.mode,
            ),
            callbacks=[MetricsLogger(run_dir(cfg), cfg.train.num_epochs), *(callbacks or [])],
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )
    return trainer.fit()


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local one bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")


def run_dir(cfg: JobConfig) -> str:
    """Where Ray Train keeps this run: checkpoints, metrics.csv, curves.png, tensorboard/."""
    return os.path.join(storage_path(cfg.run.storage_path), cfg.run.name)


def storage_path(path: str) -> str:
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def worker_env(cfg: JobConfig) -> dict[str, str]:
    env = {}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA
    return env
