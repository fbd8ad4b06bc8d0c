"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel

from dlray.precision import PRECISION_DTYPES
from dlray.strategies import dcp


class DDPStrategy:
    CHECKPOINT_FORMAT = "dcp"

    def __init__(self, cfg, device: torch.device, shard_classes=()):
        self.device, self.max_grad_norm = device, cfg.train.max_grad_norm
        self.trainable_only, self.compile = cfg.finetune.trainable_only, cfg.train.compile
        self.dtype = PRECISION_DTYPES[cfg.precision]
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def prepare(self, model, make_optimizers):
        model = model.to(self.device)
        self.optimizers = make_optimizers(model)
        # One rank has nothing to all-reduce: skip DDP's hooks, as ray.train.torch.prepare_model
        # does. Checkpoints stay interchangeable (DCP names parameters without DDP's "module.").
        if torch.distributed.get_world_size() > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # With several optimizers (a GAN) each backward reaches only some parameters.
            model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=len(self.optimizers) > 1)
        if self.compile:
            # The wrapper, after wrapping, as torch's DDP notes ask: dynamo's DDPOptimizer then splits the graph at
            # DDP's bucket boundaries, so each bucket's all-reduce starts while backward goes on. In place: the
            # state dict keeps its names, so checkpoints and exports do not change.
            model.compile()
        self.model = model
        return self.model, self.optimizers

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss, sync: bool):
        with nullcontext() if sync or not isinstance(self.model, DistributedDataParallel) else self.model.no_sync():
            self.scaler.scale(loss).backward()

    def step(self, index: int = 0) -> torch.Tensor:
        optimizer = self.optimizers[index]
        self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), self.max_grad_norm or math.inf)
        # A non-finite norm (of the reduced gradients: the same on every rank) skips the step, which would make
        # every weight NaN; an enabled GradScaler skips it itself, and backs off its scale.
        if self.scaler.is_enabled() or norm.isfinite():
            self.scaler.step(optimizer)
        self.scaler.update()
        self.model.zero_grad(set_to_none=True)  # all of it: a GAN's generator loss also reached the discriminator
        return norm  # a tensor: reading it here would wait for the GPU every step

    def local_state(self) -> dict[str, torch.Tensor]:
        return getattr(self.model, "module", self.model).state_dict()

    def gather(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rank0_copies(parts.items())

    def local_part(self, key: str, full: torch.Tensor) -> torch.Tensor:
        return full

    def save(self, directory: str):
        dcp.save(directory, self.model, self.optimizers, self.scaler, self.trainable_only)

    def load(self, directory: str):
        dcp.load(directory, self.model, self.optimizers, self.scaler, self.trainable_only)


def optimizer_params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def rank0_copies(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """CPU copies of `tensors` on rank 0, an empty dict elsewhere. Every rank runs through all of them:
    under FSDP and ZeRO-3 each one is a collective."""
    keep = torch.distributed.get_rank() == 0
    return {key: tensor.detach().to("cpu", copy=True) for key, tensor in tensors if keep}
