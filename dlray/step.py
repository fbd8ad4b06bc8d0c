"""The Ray-free core of training: an optimizer step, an evaluation, and an epoch's running totals. The Ray
worker (dlray.loop) drives them, and so do the tests, in plain process groups:

    totals = EpochTotals.zeros(len(family.optimizers), device)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    for global_step, micro_batches in enumerate(optimizer_steps(batches.train(epoch), accumulation), 1):
        guard.check(global_step, train_step(model, family, strategy, micro_batches, totals, accumulation, schedulers))
    totals.all_reduce()                                                          # one collective
    metrics = totals.train_metrics(family.optimizers) | prefixed("val", evaluate(model, family, val_batches, device, strategy.autocast))

A micro-batch is (fields, weight, skipped), as dlray.batches yields them: weight None when every row counts
(streamed splits pad with weight-0 rows), skipped the rows its data dropped (None where the data counts none).
Nothing here knows of Ray; every rank calls the same functions in the same order (their collectives match).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import torch
import torch.distributed as dist

from dlray.optim import is_per_step

MicroBatch = tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]


@dataclass
class EpochTotals:
    """This rank's sums over the micro-batches since the last validation (an epoch's, unless train.val_every_n_steps
    validates within epochs), by name. Every field is a view into one float64
    buffer on the training device, so that `all_reduce` sums them over the ranks in one collective
    (NCCL reduces only CUDA tensors) and nothing waits for the device before the epoch ends."""

    buffer: torch.Tensor
    losses: torch.Tensor  # per optimizer: its loss x rows, summed
    grad_norms: torch.Tensor  # per optimizer: the gradient norm before clipping, summed over the optimizer steps
    samples: torch.Tensor  # rows trained on (a 0-d view)
    skipped: torch.Tensor  # rows the data skipped (a 0-d view)
    steps: int = 0  # optimizer steps taken: the same on every rank, never reduced
    nonfinite: int = 0  # of those, the steps skipped as non-finite (the same on every rank: train_step all-reduces the flag)
    data_s: float = 0.0  # this rank's seconds waiting for its micro-batches (`timed`): its own, no collective in it (stragglers)
    counts_skipped: bool = False  # whether the data counts skipped rows (streamed data does)

    @classmethod
    def zeros(cls, num_optimizers: int, device: torch.device) -> EpochTotals:
        n = num_optimizers
        buffer = torch.zeros(2 * n + 2, dtype=torch.float64, device=device)
        return cls(buffer, buffer[:n], buffer[n : 2 * n], buffer[2 * n], buffer[2 * n + 1])

    def zero(self) -> None:
        """Start the sums again (after a validation reported them)."""
        self.buffer.zero_()
        self.steps = self.nonfinite = 0
        self.data_s = 0.0

    def all_reduce(self) -> None:
        """Sum over the ranks, in place. The gradient norms, already the same on every rank (gradients are
        reduced before they are measured), come back as their mean."""
        dist.all_reduce(self.buffer)
        self.grad_norms /= dist.get_world_size()

    def train_metrics(self, phases: Sequence[str]) -> dict[str, float]:
        """train_loss (over every optimizer's loss) and grad_norm (mean over the optimizer steps); with
        several optimizers also each one's: train_<phase>_loss and <phase>_grad_norm (a GAN's generator
        and discriminator). Over the steps applied: NaN where every step was skipped as non-finite."""
        n = len(phases)
        values = torch.cat([self.losses.sum()[None] / self.samples, self.losses / self.samples, self.grad_norms / max(self.steps - self.nonfinite, 1)]).tolist()
        loss, losses, norms = values[0], values[1 : n + 1], values[n + 1 :]  # read with one device sync
        if len(phases) == 1:
            return {"train_loss": loss, "grad_norm": norms[0]}
        return ({"train_loss": loss} | {f"train_{phase}_loss": value for phase, value in zip(phases, losses)}
                | {f"{phase}_grad_norm": value for phase, value in zip(phases, norms)})

    def throughput(self, elapsed_s: float) -> dict[str, float | int]:
        """samples_per_sec over `elapsed_s`, and skipped_rows where the data counts them."""
        samples, skipped = self.buffer[-2:].tolist()
        return {"samples_per_sec": samples / elapsed_s} | ({"skipped_rows": int(skipped)} if self.counts_skipped else {})


def step_budget(num_epochs: int, max_steps: int | None, max_tokens: int | None, steps_per_epoch: int, tokens_per_step: int) -> int:
    """The optimizer steps a run takes: train.max_steps, or train.max_tokens in whole steps (the step that
    reaches it included), the smaller of the two, or else num_epochs whole epochs."""
    budgets = [max_steps] if max_steps else []
    if max_tokens:
        budgets.append(-(-max_tokens // tokens_per_step))
    return min(budgets) if budgets else num_epochs * steps_per_epoch


def optimizer_steps(micro_batches: Iterable[MicroBatch], accumulation: int) -> Iterator[Iterator[MicroBatch]]:
    """The micro-batches, `accumulation` to an optimizer step (the last step may have fewer), fetched as the
    step consumes them. Exhausts `micro_batches` (a generator's code after its last batch runs)."""
    iterator = iter(micro_batches)
    while (first := next(iterator, None)) is not None:
        yield chain([first], islice(iterator, accumulation - 1))


def timed(micro_batches: Iterable[MicroBatch], totals: EpochTotals) -> Iterator[MicroBatch]:
    """`micro_batches`, the seconds this rank waits for each added to totals.data_s. A rank's own time: in
    synchronous data parallel training every rank's step takes as long as the slowest's, which the others spend
    waiting in a collective (DDP's forward broadcasts buffers, FSDP's gathers), while the wait for data is its own."""
    iterator = iter(micro_batches)
    while True:
        start = time.perf_counter()
        item = next(iterator, None)
        totals.data_s += time.perf_counter() - start
        if item is None:
            return
        yield item


def train_step(model: torch.nn.Module, family: Any, strategy: Any, micro_batches: Iterable[MicroBatch], totals: EpochTotals,
               accumulation: int = 1, schedulers: Sequence[Any] = ()) -> str:
    """One optimizer step of each of the family's optimizers (a GAN's players take turns on every
    micro-batch) over `micro_batches`: forward under the strategy's autocast, backward of the loss over
    `accumulation` (gradients synchronised on the last micro-batch only), then the strategy's step (clip,
    apply, zero) and the per-step schedules. Sums the losses, rows and gradient norms into `totals`.

    What was non-finite on any rank ("loss", "grad norm", "loss and grad norm"; "" when nothing was), the
    same on every rank. Such a step moved no weights: the strategy skips a non-finite gradient norm (the
    norm of the reduced gradients, the same on every rank; a non-finite loss makes one), GradScaler and
    DeepSpeed each by their own overflow check; its loss, rows and norm stay out of `totals`, which counts it."""
    losses, norms = torch.zeros_like(totals.losses), torch.zeros_like(totals.grad_norms)
    samples = 0
    for (batch, weight, skipped), last in with_last(micro_batches):
        batch, rows, scale = real_rows(batch, weight)
        batch = to_device(batch, strategy.device)
        for index, phase in enumerate(family.optimizers):
            with strategy.autocast():
                loss = family.training_loss(model, batch, phase)
            strategy.backward(loss * scale / accumulation, sync=last)
            losses[index] += loss.detach() * rows  # no .item(): it would wait for the GPU every micro-batch
            if last:
                norms[index] = strategy.step(index)
            if last and index < len(schedulers) and is_per_step(schedulers[index]):
                schedulers[index].step()
        samples += rows
        if skipped is not None:
            totals.skipped += int(skipped.sum())
            totals.counts_skipped = True
    totals.steps += 1
    # One small collective and one wait for the device a step: the ranks must agree on the count and on when to stop.
    flags = torch.stack([losses.isfinite().all(), norms.isfinite().all()]).logical_not().to(torch.float64)
    dist.all_reduce(flags)
    bad_loss, bad_norm = (flags > 0).tolist()
    if bad_loss or bad_norm:
        totals.nonfinite += 1
        return " and ".join(what for what, bad in (("loss", bad_loss), ("grad norm", bad_norm)) if bad)
    totals.losses += losses
    totals.grad_norms += norms
    totals.samples += samples
    return ""


class NonFiniteError(FloatingPointError):
    """Training diverged: too many optimizer steps in a row were non-finite."""


class NonFiniteGuard:
    """Ends a run whose optimizer steps come out non-finite `max_in_a_row` times in a row (train.max_nonfinite_steps),
    naming the first of them; fewer are skipped (as a loss scaler's overflows are) and training goes on.

        guard.check(global_step, train_step(...))   # raises NonFiniteError at the limit
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row, self.first = 0, (0, "")

    def check(self, global_step: int, nonfinite: str) -> None:
        """After optimizer step `global_step` (1-based), with what train_step found non-finite ("" when nothing)."""
        if not nonfinite:
            self.in_a_row = 0
            return
        if self.in_a_row == 0:
            self.first = (global_step, nonfinite)
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            step, what = self.first
            raise NonFiniteError(
                f"training diverged: {self.in_a_row} optimizer steps in a row were non-finite, from step {step} on (non-finite: {what}); "
                "each was skipped, so the weights and the best checkpoint are those before it. Lower optim.lr, set train.max_grad_norm, "
                "or raise train.max_nonfinite_steps")


@torch.no_grad()
def evaluate(model: torch.nn.Module, family: Any, batches: Iterable[tuple[list[torch.Tensor], torch.Tensor]], device: torch.device,
             autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float]:
    """Weighted means over all ranks of every per-sample value the family's compute_loss returns (loss,
    accuracy, ...), by its keys. `batches`: (fields, weight) with weight 0 for padding rows."""
    model.eval()
    # Summed on the training device (NCCL reduces only CUDA tensors), read once at the end.
    sums: dict[str, torch.Tensor] = {}
    weight_total = torch.zeros((), dtype=torch.float64, device=device)
    for batch, weight in batches:
        batch, weight = to_device(batch, device), weight.to(device, torch.float64, non_blocking=True)
        with autocast():
            values = family.compute_loss(model, batch)
        for key, value in values.items():
            sums[key] = sums.get(key, 0) + (value.double() * weight).sum()
        weight_total += weight.sum()
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys] + [weight_total])
    dist.all_reduce(packed)
    return dict(zip(keys, (packed[:-1] / packed[-1]).tolist()))


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """{"loss": ...} -> {"val_loss": ...}"""
    return {f"{prefix}_{key}": value for key, value in metrics.items()}


def real_rows(batch: list[torch.Tensor], weight: torch.Tensor | None) -> tuple[list[torch.Tensor], int, float]:
    """The batch's weight-1 rows (streamed splits are padded with weight-0 rows), how many, and the loss
    scale: 0 for a batch of padding only, which still runs forward and backward (its rank must take
    part in the step's collectives) but must not move the weights."""
    if weight is None or bool(weight.all()):
        return batch, len(batch[-1]), 1.0
    keep = weight > 0
    if not keep.any():
        return batch, 0, 0.0
    return [field[keep] for field in batch], int(keep.sum()), 1.0


def to_device(batch: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [t.to(device, non_blocking=True) for t in batch]


def with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, whether it is the last one), looking one item ahead."""
    iterator = iter(items)
    previous = next(iterator, None)
    for item in iterator:
        yield previous, False
        previous = item
    if previous is not None:
        yield previous, True
