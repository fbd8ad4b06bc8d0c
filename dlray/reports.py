"""What a training worker reports (`ray.train.report`), each report saying its kind, and how the readers
tell them apart: the console, the run files (dlray.runfiles), the trackers, `dlray tune`, `dlray export`
and the benchmarks.

    ray.train.report(reports.epoch(metrics))          # a plain dict, as Ray Train takes them, with its kind
    if reports.kind(record) is Kind.EPOCH: ...
    reports.metrics(record)                           # its numbers without the kind: a metrics.csv row, a checkpoint's meta.json

    start  a worker group began (once per start or restart): where each rank runs, the precision and why,
           where it resumes from; for the console only
    step   progress within an epoch, every few steps (train.log_every_n_steps): the loss and throughput since
           the last one; the console's bar, the trackers' step/<metric>
    epoch  an epoch's metrics, reduced over the ranks, with its checkpoint: metrics.csv, TensorBoard, the
           trackers, Tune's schedulers, the best checkpoint
    final  the run's end: the best checkpoint's train.metric and its scores on the test split

A leaf module: the worker and the driver's readers import it, it imports nothing of dlray.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

KIND = "report"  # the key a report's kind travels under; no metric of its own, so metrics.csv has no such column


class Kind(StrEnum):
    START = "start"
    STEP = "step"
    EPOCH = "epoch"
    FINAL = "final"


def start(*, node: str, num_nodes: int, device: str, precision: str, precision_why: str, precision_warning: str, epoch: int, global_step: int,
          steps_per_epoch: int, resumed_from: str) -> dict:
    """`node`: "<node id> (<ip>)" of this rank; `epoch`, `global_step`: where it starts (0, or the checkpoint's);
    `resumed_from`: the checkpoint's path, or ""."""
    return {KIND: Kind.START.value, "node": node, "num_nodes": num_nodes, "device": device, "precision": precision, "precision_why": precision_why,
            "precision_warning": precision_warning, "epoch": epoch, "global_step": global_step, "steps_per_epoch": steps_per_epoch,
            "resumed_from": resumed_from}


def step(*, epoch: int, global_step: int, step_in_epoch: int, steps_per_epoch: int, lr: float, train_loss: float, samples_per_sec: float,
         **derived: float) -> dict:
    """`train_loss`, `samples_per_sec`: this rank's since its last step report; `derived`: the family's
    derived metrics of those (tokens_per_sec, ...)."""
    return {KIND: Kind.STEP.value, "epoch": epoch, "global_step": global_step, "step_in_epoch": step_in_epoch, "steps_per_epoch": steps_per_epoch,
            "lr": lr, "train_loss": train_loss, "samples_per_sec": samples_per_sec, **derived}


def epoch(metrics: dict) -> dict:
    """`metrics`: epoch, global_step, train_loss, val_*, lr, samples_per_sec, ... (the columns of metrics.csv)."""
    return {KIND: Kind.EPOCH.value, **metrics}


def final(metrics: dict) -> dict:
    """`metrics`: epoch, global_step, best_<train.metric>, bad_epochs and the test split's test_* (where it has rows)."""
    return {KIND: Kind.FINAL.value, **metrics}


def kind(record: dict) -> Kind:
    return Kind(record[KIND])


def metrics(record: dict) -> dict:
    """The report without its kind: what metrics.csv, a checkpoint's meta.json and Tune's results hold."""
    return {key: value for key, value in record.items() if key != KIND}


def epochs(records: Iterable[dict]) -> list[dict]:
    """The epoch reports among `records` (a run's history, a trial's results), in order."""
    return [r for r in records if kind(r) is Kind.EPOCH]


def from_row(row: dict) -> dict:
    """A metrics.csv row back as the report it was written from. The file keeps its columns (the run's
    documented output has no kind column), so the kind comes from the one column only an epoch fills."""
    return {KIND: (Kind.EPOCH if "train_loss" in row else Kind.FINAL).value, **row}
