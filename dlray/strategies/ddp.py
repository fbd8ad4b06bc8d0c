"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel

from dlray.strategies import dcp


class DDPStrategy:
    CHECKPOINT_FORMAT = "dcp"

    def __init__(self, cfg, device: torch.device, shard_classes=()):
        from dlray.strategies import PRECISION_DTYPES

        self.device, self.max_grad_norm = device, cfg.train.max_grad_norm
        self.dtype = PRECISION_DTYPES[cfg.precision]
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def prepare(self, model, make_optimizer):
        model = model.to(self.device)
        # One rank has nothing to all-reduce: skip DDP's hooks, as ray.train.torch.prepare_model
        # does. Checkpoints stay interchangeable (DCP names parameters without DDP's "module.").
        if torch.distributed.get_world_size() > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        self.model = model
        self.optimizer = make_optimizer(self.model.parameters())
        return self.model, self.optimizer

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss, sync: bool):
        with nullcontext() if sync or not isinstance(self.model, DistributedDataParallel) else self.model.no_sync():
            self.scaler.scale(loss).backward()

    def step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, directory: str):
        dcp.save(directory, self.model, self.optimizer, self.scaler)

    def load(self, directory: str):
        dcp.load(directory, self.model, self.optimizer, self.scaler)
