"""What a training worker reports (`ray.train.report`), each report saying its kind, and how the readers
tell them apart: the console, the run files (dlray.runfiles), the trackers, `dlray tune`, `dlray export`
and the benchmarks.

    ray.train.report(reports.epoch(metrics))          # a plain dict, as Ray Train takes them, with its kind
    if reports.kind(record) is Kind.EPOCH: ...
    reports.metrics(record)                           # its numbers without the kind: a metrics.csv row, a checkpoint's meta.json

    start       a worker group began (once per start or restart): where each rank runs, the precision and why,
                where it resumes from, the run's step budget; for the console only
    step        progress within an epoch, every few steps (train.log_every_n_steps): the loss and throughput since
                the last one; the console's bar, the trackers' step/<metric>
    epoch       a validation's metrics, reduced over the ranks, with its checkpoint: at each epoch's end, every
                train.val_every_n_steps steps and at the budget's last step (`step_in_epoch` says where in its
                epoch). metrics.csv, TensorBoard, the trackers, Tune's schedulers, early stopping, the best checkpoint
    checkpoint  a checkpoint between validations (train.checkpoint_every_n_steps, run.checkpoint_interval_s, a
                preemption): where it is, and train.metric at its worst, so that Ray keeps it only as the latest;
                for Ray's checkpoint manager only
    final       the run's end: the best checkpoint's train.metric and its scores on the test split

A leaf module: the worker and the driver's readers import it, it imports nothing of dlray.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from enum import StrEnum

KIND = "report"  # the key a report's kind travels under; no metric of its own, so metrics.csv has no such column


class Kind(StrEnum):
    START = "start"
    STEP = "step"
    EPOCH = "epoch"
    CHECKPOINT = "checkpoint"
    FINAL = "final"


def start(*, node: str, num_nodes: int, device: str, precision: str, precision_why: str, precision_warning: str, epoch: int, global_step: int,
          steps_per_epoch: int, total_steps: int, num_epochs: int, tokens_per_step: int, resumed_from: str) -> dict:
    """`node`: "<node id> (<ip>)" of this rank; `epoch`, `global_step`: where it starts (0, or the checkpoint's);
    `total_steps`, `num_epochs`: the run's budget and the epochs it spans; `tokens_per_step`: across ranks (0 for
    data without tokens); `resumed_from`: the checkpoint's path, or ""."""
    return {KIND: Kind.START.value, "node": node, "num_nodes": num_nodes, "device": device, "precision": precision, "precision_why": precision_why,
            "precision_warning": precision_warning, "epoch": epoch, "global_step": global_step, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "num_epochs": num_epochs, "tokens_per_step": tokens_per_step, "resumed_from": resumed_from}


def step(*, epoch: int, global_step: int, step_in_epoch: int, steps_per_epoch: int, lr: float, train_loss: float, samples_per_sec: float,
         data_time_s: float = 0.0, nonfinite_steps: int = 0, **derived: float) -> dict:
    """`train_loss`, `samples_per_sec`, `data_time_s` (seconds per step waiting for its batches, a straggler's
    usual cause: the rank's own time): this rank's since its last step report; `nonfinite_steps`: the optimizer
    steps skipped as non-finite since the last validation (dlray.step.train_step); `derived`: the family's
    derived metrics of those (tokens_per_sec, ...)."""
    return {KIND: Kind.STEP.value, "epoch": epoch, "global_step": global_step, "step_in_epoch": step_in_epoch, "steps_per_epoch": steps_per_epoch,
            "lr": lr, "train_loss": train_loss, "samples_per_sec": samples_per_sec, "data_time_s": data_time_s,
            "nonfinite_steps": nonfinite_steps, **derived}


def epoch(metrics: dict) -> dict:
    """`metrics`: epoch, global_step, train_loss, val_*, lr, samples_per_sec, nonfinite_steps (optimizer steps skipped as
    non-finite since the last validation), data_time_s and data_time_spread (the ranks' seconds per step waiting
    for their batches: the median, and the slowest rank's less the fastest's), ... (the columns of metrics.csv)."""
    return {KIND: Kind.EPOCH.value, **metrics}


def checkpoint(*, epoch: int, global_step: int, step_in_epoch: int, reason: str, metric: str, mode: str) -> dict:
    """`reason`: why now, for the console; `metric`, `mode`: train.metric and train.mode, whose worst value the report carries."""
    # Position last: a train.metric that is a position itself ("epoch", a GAN's) ranks by it.
    return {KIND: Kind.CHECKPOINT.value, metric: WORST if mode == "min" else -WORST, "epoch": epoch, "global_step": global_step,
            "step_in_epoch": step_in_epoch, "reason": reason}


# The placeholder score of a checkpoint between validations: finite, because Ray keeps the scores in a JSON
# snapshot to resume from, where an infinity would come back as null.
WORST = sys.float_info.max


def scored(value: float) -> bool:
    """Whether a train.metric value was measured (not a checkpoint's placeholder, not NaN)."""
    return math.isfinite(value) and abs(value) != WORST


def best(records: list, metric: str, mode: str, metrics=lambda record: record):
    """The record with the best `metric` (`metrics(record)`: its metrics), the latest (highest global_step) among
    equal scores, as Ray Train keeps the later of equally scored checkpoints; None when none was scored."""
    scored_records = [r for r in records if scored(metrics(r).get(metric, math.nan))]
    if not scored_records:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored_records, key=lambda r: (sign * metrics(r)[metric], metrics(r).get("global_step", 0)))


def final(metrics: dict) -> dict:
    """`metrics`: epoch, global_step, best_<train.metric>, bad_validations and the test split's test_* (where it has rows)."""
    return {KIND: Kind.FINAL.value, **metrics}


def kind(record: dict) -> Kind:
    return Kind(record[KIND])


def metrics(record: dict) -> dict:
    """The report without its kind (and a checkpoint's without its placeholder score): what metrics.csv, a
    checkpoint's meta.json and Tune's results hold."""
    return {key: value for key, value in record.items() if key != KIND and not (isinstance(value, float) and abs(value) == WORST)}


def epochs(records: Iterable[dict]) -> list[dict]:
    """The epoch (validation) reports among `records` (a run's history, a trial's results), in order."""
    return [r for r in records if kind(r) is Kind.EPOCH]


def from_row(row: dict) -> dict:
    """A metrics.csv row back as the report it was written from. The file keeps its columns (the run's
    documented output has no kind column), so the kind comes from the one column only an epoch fills."""
    return {KIND: (Kind.EPOCH if "train_loss" in row else Kind.FINAL).value, **row}
