"""Exponential moving average of the weights (`train.ema_decay`), as diffusers' EMAModel keeps it.

The average is sharded as the weights are: each rank keeps an fp32 average of its own part of
them (`strategy.local_state()`: the whole model under DDP and ZeRO-1/2, its FSDP shards, its ZeRO-3
fp32 partitions), folded in on the device each step without a collective. The complete average
exists only when gathered to rank 0, to save it (a checkpoint's ema.safetensors, what `dlray
export` serves) or to draw samples. Decay warms up as min(decay, (1 + n) / (10 + n)) after n
updates, so early averages are not dominated by the random initial weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

STEP_KEY = "__ema_updates__"


class EMA:
    def __init__(self, strategy, decay: float):
        self.strategy, self.decay = strategy, decay
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average over from the current weights."""
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {}  # by state-dict key, this rank's part
        self.averaged: dict[torch.device, list[str]] = {}  # floating keys, by device (one foreach call each)
        self.copied: list[str] = []  # counters such as BatchNorm's num_batches_tracked
        first_key: dict[tuple, str] = {}
        for key, value in self.strategy.local_state().items():
            # Tied weights (an output layer that is the input embedding) share one average, updated once.
            storage = (value.data_ptr(), value.shape, value.stride(), value.dtype) if value.numel() else (key,)
            if storage in first_key:
                self.shadow[key] = self.shadow[first_key[storage]]
                continue
            first_key[storage] = key
            if value.is_floating_point():
                self.shadow[key] = value.detach().float().clone()
                self.averaged.setdefault(value.device, []).append(key)
            else:
                self.shadow[key] = value.detach().clone()
                self.copied.append(key)

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the weights as they are now (after an optimizer step); every rank, no collective."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        local = self.strategy.local_state()
        for keys in self.averaged.values():
            torch._foreach_lerp_([self.shadow[k] for k in keys], [local[k].float() for k in keys], 1 - decay)
        for key in self.copied:
            self.shadow[key].copy_(local[key])

    def gather(self) -> dict[str, torch.Tensor]:
        """The complete average, on rank 0 on the CPU (an empty dict elsewhere): every rank calls it."""
        return self.strategy.gather(self.shadow)

    def save(self, path: str | Path) -> None:
        """The complete average and its update count to a safetensors file, written by rank 0: every rank calls it."""
        full = self.gather()
        if dist.get_rank() == 0:
            save_file({**full, STEP_KEY: torch.tensor(self.updates)}, str(path))

    @torch.no_grad()
    def load(self, path: str | Path) -> None:
        """What `save` wrote (under any world size): each rank reads its own part, one tensor at a time."""
        with safe_open(str(path), framework="pt") as saved:
            self.updates = int(saved.get_tensor(STEP_KEY))
            for key, average in self.shadow.items():
                average.copy_(self.strategy.local_part(key, saved.get_tensor(key)))
