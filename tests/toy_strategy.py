"""A strategy added by the README's recipe (one file satisfying dlray.strategies.Strategy, one line in
STRATEGIES): every rank holds the whole model and averages the gradients itself, one all_reduce per
parameter after the last micro-batch of a step: DDP without its buckets, its overlap or mixed precision.
tests/test_strategies.py registers it and trains it through the Ray-free core (dlray.step)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from dlray.strategies import dcp
from dlray.strategies.ddp import optimizer_params, rank0_copies


class ToyStrategy:
    CHECKPOINT_FORMAT = "dcp"  # dlray.strategies.dcp's files: `dlray export` reads them back

    def __init__(self, cfg, device: torch.device, shard_classes=()):
        self.device, self.max_grad_norm = device, cfg.train.max_grad_norm

    def prepare(self, model, make_optimizers):
        self.model = model.to(self.device)
        self.optimizers = make_optimizers(self.model)
        return self.model, self.optimizers

    def autocast(self):
        return nullcontext()  # fp32 only

    def backward(self, loss, sync: bool):
        loss.backward()
        if sync:
            for param in self.model.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= dist.get_world_size()

    def step(self, index: int = 0) -> torch.Tensor:
        optimizer = self.optimizers[index]
        norm = torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), self.max_grad_norm or math.inf)
        optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return norm

    def local_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def gather(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rank0_copies(parts.items())

    def local_part(self, key: str, full: torch.Tensor) -> torch.Tensor:
        return full

    def save(self, directory: str):
        dcp.save(directory, self.model, self.optimizers)

    def load(self, directory: str):
        dcp.load(directory, self.model, self.optimizers)
