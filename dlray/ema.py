"""Exponential moving average of the weights (`train.ema_decay`), as diffusers' EMAModel keeps it.

The average is fp32 and complete on every rank: each step it folds in the strategy's full
weights (gathered from the shards under FSDP and ZeRO-3), so sampling and export never need
a collective. Decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so early
averages are not dominated by the random initial weights.
"""

from __future__ import annotations

import torch
from safetensors.torch import load, save

STEP_KEY = "__ema_updates__"


class EMA:
    def __init__(self, state: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.reset(state)

    def reset(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone() for k, v in state.items()}

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor]) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in state.items():
            average = self.shadow[key]
            if average.is_floating_point():
                average.lerp_(value.to(average.device, torch.float32), 1 - decay)
            else:  # counters such as BatchNorm's num_batches_tracked
                average.copy_(value)

    def to_bytes(self) -> bytes:
        return save({**{k: v.cpu().contiguous() for k, v in self.shadow.items()}, STEP_KEY: torch.tensor(self.updates)})

    def load_bytes(self, data: bytes) -> None:
        state = load(data)
        self.updates = int(state.pop(STEP_KEY))
        for key, value in state.items():
            self.shadow[key].copy_(value)
