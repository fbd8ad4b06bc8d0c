"""When device memory runs out anyway: a CUDA out-of-memory error in a training step becomes one line naming the
step, the rank, what was allocated against what the job's memory plan (dlray.plan, `dlray plan`) expected, and
the plan's suggestions; on a GPU the allocator's history goes beside it, as torchtitan keeps it.

    record_history(device)                                 # worker start: the CUDA allocator records its history
    with explained(cfg, global_step, rank, device):        # around each training step (dlray.loop)
        train_step(...)                                    # torch.cuda.OutOfMemoryError -> OutOfMemory(one line)

The snapshot (`torch.cuda.memory._snapshot()`, a pickle) is written to <run dir>/memory/oom-rank<R>-step<S>.pickle;
drag it into https://pytorch.org/memory_viz to see what held the memory.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import torch

HISTORY_ENTRIES = 100_000  # allocator events kept: torchtitan's default, a few MB of host memory


class OutOfMemory(RuntimeError):
    """A CUDA out-of-memory error, explained."""


def record_history(device: torch.device) -> None:
    """On a CUDA device, have the allocator record each allocation's Python stack for the snapshot an OOM writes."""
    if device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES, stacks="python")


@contextmanager
def explained(cfg, global_step: int, rank: int, device: torch.device) -> Iterator[None]:
    """Turns a torch.cuda.OutOfMemoryError raised inside into OutOfMemory with message() (the original chained)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        snapshot = write_snapshot(cfg, global_step, rank, device)
        raise OutOfMemory(message(cfg, global_step, rank, device, snapshot)) from error


def message(cfg, global_step: int, rank: int, device: torch.device, snapshot: str | None) -> str:
    """One line (the console shows an error's last line): where, how much, the plan, what would fit."""
    from dlray.plan import PlanError, gib, plan, suggestions

    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    held = (f"{gib(torch.cuda.memory_allocated(device))} allocated, {gib(torch.cuda.max_memory_allocated(device))} at the peak, of "
            f"{gib(torch.cuda.get_device_properties(device).total_memory)}") if on_cuda else "no CUDA allocator to ask"
    try:
        expected = plan(cfg)
    except PlanError as error:
        return f"CUDA out of memory at step {global_step} on rank {rank}: {held}; no memory plan ({error})"
    if expected.device_memory is None:  # the job names no scaling.accelerator_type: this device's memory (this machine's, off a GPU)
        expected.device_memory = torch.cuda.get_device_properties(device).total_memory if on_cuda else psutil.virtual_memory().total
    parts = ", ".join(f"{part} {gib(size)}" for part, size in expected.per_device.items())
    where = f"; the allocator's history: {snapshot}" if snapshot else ""
    return (f"CUDA out of memory at step {global_step} on rank {rank}: {held}; the plan (dlray plan) expected {gib(expected.total_bytes)} "
            f"per device ({parts}). To fit: {'; '.join(suggestions(cfg, expected))}{where}")


def write_snapshot(cfg, global_step: int, rank: int, device: torch.device) -> str | None:
    """The CUDA allocator's snapshot under the run directory (a local one: a URI's storage is not a path here), or None."""
    if device.type != "cuda" or "://" in cfg.run.storage_path:
        return None
    path = os.path.join(cfg.run.storage_path, cfg.run.name or "", "memory", f"oom-rank{rank}-step{global_step}.pickle")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            pickle.dump(torch.cuda.memory._snapshot(), file)
    except (OSError, RuntimeError):  # the error message matters more than the snapshot
        return None
    return path
