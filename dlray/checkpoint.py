"""Checkpoints through Ray Train: every rank writes its part, Ray gathers them in storage.

A checkpoint directory holds the strategy's own files (DCP shards or a DeepSpeed tag), one
`train_state_rank<N>.pt` per rank (schedulers, RNG, counters; tensors and plain types only, loaded
with weights_only=True), `meta.json` from rank 0, which tells `dlray export` how to read it, and
from rank 0 `ema.safetensors` (with `train.ema_decay`: the complete average, gathered from the ranks'
parts; read back under any world size), `samples.png` (generative families) and
`tokenizer/` (text data: the tokenizer travels with the weights, so `dlray export` needs nothing else).
Saving for a report and loading on resume share this one path.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from dlray import reports
from dlray.config import JobConfig

META_FILE = "meta.json"
EMA_FILE = "ema.safetensors"
SAMPLES_FILE = "samples.png"
TOKENIZER_DIR = "tokenizer"


@dataclass
class TrainState:
    """Where a run is: saved with every checkpoint (as plain numbers), restored on resume."""

    epoch: int = 0  # the epoch under way (at an epoch's end: the next one)
    step_in_epoch: int = 0  # its optimizer steps done: a run resumed mid-epoch goes on from the next one
    global_step: int = 0  # optimizer steps done
    best: float | None = None  # the best train.metric so far
    bad_validations: int = 0  # validations since it last improved (early stopping)
    base_lr: float | None = None  # optim.lr the schedules were built with (a PBT trial may continue another's with its own)

    def update(self, value: float, mode: str) -> bool:
        """Count one more validation, with train.metric at `value`; whether it improved on the best."""
        improved = self.best is None or (value < self.best if mode == "min" else value > self.best)
        self.best, self.bad_validations = (value, 0) if improved else (self.best, self.bad_validations + 1)
        return improved

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0


def report_with_checkpoint(report: dict, strategy, schedulers: list, state: TrainState, cfg: JobConfig, data_info: dict, ema=None,
                           samples_png: bytes | None = None, tokenizer=None) -> None:
    """Every rank: its part of the checkpoint and its train state, then `report` (a validation's or a checkpoint's,
    dlray.reports) with the checkpoint, named after its step so that names sort in the order they were taken."""
    rank = dist.get_rank()
    with local_checkpoint_dir(cfg) as directory:
        strategy.save(directory)
        if ema is not None:  # every rank: gathering its parts is a collective
            ema.save(Path(directory, EMA_FILE))
        torch.save(
            {"progress": asdict(state), "schedulers": [s.state_dict() for s in schedulers], "rng": torch.get_rng_state(), "cuda_rng": _cuda_rng()},
            Path(directory, f"train_state_rank{rank}.pt"),
        )
        if rank == 0:
            write_meta(directory, strategy.CHECKPOINT_FORMAT, cfg, data_info, state, reports.metrics(report))
            if samples_png is not None:
                Path(directory, SAMPLES_FILE).write_bytes(samples_png)
            if tokenizer is not None:
                tokenizer.save_pretrained(Path(directory, TOKENIZER_DIR))
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=checkpoint_name(state.global_step),
                         checkpoint_upload_mode=UPLOAD_MODES[cfg.run.checkpoint_upload], delete_local_checkpoint_after_upload=True)


def checkpoint_name(global_step: int) -> str:
    return f"checkpoint_step{global_step:08d}"


# run.checkpoint_upload -> Ray Train's mode. ASYNC: report() returns once the ranks agree on the checkpoint's
# name; one thread per worker copies the directories to storage in report order, then hands Ray the report.
UPLOAD_MODES = {"async": ray.train.CheckpointUploadMode.ASYNC, "sync": ray.train.CheckpointUploadMode.SYNC}


@contextmanager
def local_checkpoint_dir(cfg: JobConfig) -> Iterator[str]:
    """Where a rank writes its part before Ray uploads it. It outlives the report (an async upload reads it
    later): Ray deletes it once uploaded; here only if saving or reporting fails first. Named after the run,
    so a directory an interrupted upload left behind says whose it is."""
    directory = tempfile.mkdtemp(prefix=f"dlray-ckpt-{cfg.run.name}-")
    try:
        yield directory
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def write_meta(directory: str | Path, checkpoint_format: str, cfg: JobConfig, data_info: dict, state: TrainState, metrics: dict) -> None:
    """meta.json, what `dlray export` reads a checkpoint by: the strategy's checkpoint format (dlray.strategies:
    CHECKPOINT_FORMAT), the job config (its precision as the workers chose it), what the data told the model,
    the world size that wrote it, where the run was and the metrics reported with it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    meta = {"format": checkpoint_format, "config": cfg.model_dump(mode="json"), "data_info": data_info, "world_size": world,
            "progress": asdict(state), "metrics": metrics}
    Path(directory, META_FILE).write_text(json.dumps(meta, indent=2))


def restore(checkpoint: ray.train.Checkpoint, strategy, schedulers: list, ema=None, restore_train_state: bool = True) -> TrainState:
    """Load a checkpoint into the running strategy (and EMA); returns where the run was."""
    with checkpoint.as_directory() as directory:
        strategy.load(directory)
        state_file = Path(directory, f"train_state_rank{dist.get_rank()}.pt")
        if not state_file.exists():  # resumed under a larger world size: borrow rank 0's counters
            state_file = Path(directory, "train_state_rank0.pt")
        state = torch.load(state_file, weights_only=True)
        if ema is not None and Path(directory, EMA_FILE).exists():
            ema.load(Path(directory, EMA_FILE))
        elif ema is not None:  # a checkpoint saved without EMA: average from its weights on
            ema.reset()
    if restore_train_state:
        for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
    return TrainState(**state["progress"])


def best_checkpoint(metric: str, mode: str) -> ray.train.Checkpoint | None:
    """The validated checkpoint with the best `metric` (checkpoints between validations carry none that counts)."""
    best = reports.best(ray.train.get_all_reported_checkpoints(), metric, mode, lambda reported: reported.metrics)
    return best.checkpoint if best else None


def read_meta(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir, META_FILE)
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint_dir} is not a dlray checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def _cuda_rng():
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else None
