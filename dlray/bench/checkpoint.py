"""`dlray bench checkpoint_upload`: how long training waits on a checkpoint of a few hundred MB written to
run.storage_path on local disk, run.checkpoint_upload sync and async side by side in one Ray Train run.

One Train worker calls dlray's own `report_with_checkpoint` CHECKPOINTS times in each mode, alternating,
each waiting for the one before it to be stored, and times (medians):
- blocked: the whole call, from the end of a step to the worker continuing: the local save of its part into
  a temporary directory (always synchronous), then `ray.train.report`;
- report: the report alone, from its call until the worker continues (what Ray's async upload takes off);
- after an async checkpoint, a metrics-only report made at once, in Ray's default (sync) mode and in async
  mode: a sync report waits its turn behind the upload still running (Ray hands reports on in order).
The "strategy" saves a fixed fp32 state dict of STATE_MB: an upload copies bytes, whatever model they are.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dlray.config import load_config

STATE_MB = 300
CHECKPOINTS = 5  # of each mode
TENSOR_MB = 4  # the state dict's tensors: a layer's weight of 1M fp32 values
TIMINGS_FILE = "timings.json"


def bench_checkpoint_upload(state_mb: int = STATE_MB, checkpoints: int = CHECKPOINTS) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from dlray.local_cluster import init_ray

    init_ray()
    storage = tempfile.mkdtemp(prefix="dlray-bench-")
    cfg = load_config("jobs/debug/cnn_cpu.yaml", [f"run.storage_path={storage}", "run.name=bench-checkpoint-upload"])
    trainer = TorchTrainer(
        _upload_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "state_mb": state_mb, "checkpoints": checkpoints},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name=cfg.run.name, storage_path=storage, checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    timings = json.loads(Path(storage, TIMINGS_FILE).read_text())
    median = {key: statistics.median(values) for key, values in timings.items()}
    return {
        "checkpoint_mb": state_mb,
        "checkpoints_per_mode": checkpoints,
        "storage": f"run.storage_path on local disk ({storage})",
        "seconds": timings,
        "median_s": median,
        "async_vs_sync_report": median["async_report"] / median["sync_report"],
        "async_vs_sync_blocked": median["async_blocked"] / median["sync_blocked"],
    }


class StateDictSave:
    """The one strategy method report_with_checkpoint calls, saving `mb` of fp32 tensors; timing its save."""

    CHECKPOINT_FORMAT = "bench-state-dict"

    def __init__(self, mb: int):
        generator = torch.Generator().manual_seed(0)
        self.state = {f"layer{i}.weight": torch.randn(TENSOR_MB * 2**18, generator=generator) for i in range(mb // TENSOR_MB)}
        self.save_s = 0.0

    def save(self, directory: str) -> None:
        start = time.perf_counter()
        torch.save(self.state, Path(directory, "model.pt"))
        self.save_s = time.perf_counter() - start


def _upload_worker(config: dict) -> None:
    import ray.train

    from dlray.checkpoint import UPLOAD_MODES, TrainState, report_with_checkpoint
    from dlray.config import JobConfig

    cfg = JobConfig.model_validate(config["job"])
    strategy = StateDictSave(config["state_mb"])
    timings: dict[str, list[float]] = {}
    for index in range(2 * config["checkpoints"]):
        mode = ("sync", "async")[index % 2]
        job = cfg.model_copy(update={"run": cfg.run.model_copy(update={"checkpoint_upload": mode})})
        start = time.perf_counter()
        report_with_checkpoint({"epoch": index, "val_loss": 1.0}, strategy, [], TrainState(epoch=index), job, {})
        blocked = time.perf_counter() - start
        timings.setdefault(f"{mode}_blocked", []).append(blocked)
        timings.setdefault(f"{mode}_report", []).append(blocked - strategy.save_s)
        if mode == "async":  # alternately, a step's report right behind the upload, as the loop makes it / in Ray's async mode
            next_mode = ("sync", "async")[index // 2 % 2]
            start = time.perf_counter()
            ray.train.report({"epoch": index}, checkpoint_upload_mode=UPLOAD_MODES[next_mode])
            timings.setdefault(f"next_report_{next_mode}_mode", []).append(time.perf_counter() - start)
        ray.train.get_all_reported_checkpoints()  # stored (and out of the local disk's way) before the next is timed
    Path(cfg.run.storage_path, TIMINGS_FILE).write_text(json.dumps(timings))  # Train's Result carries the last checkpoint's metrics only
