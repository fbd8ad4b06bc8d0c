"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across ranks.

Each block in the family's SHARD_CLASSES, or named in a Hugging Face model's `_no_split_modules`
(so any pretrained architecture shards by its blocks), becomes its own FSDP unit, so only one block's full
parameters are gathered at a time. Mixed precision is FSDP's MixedPrecisionPolicy: compute in
bf16, gradients reduced in fp32, fp32 master weights in the optimizer.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from dlray.precision import PRECISION_DTYPES
from dlray.strategies import dcp
from dlray.strategies.ddp import optimizer_params, rank0_copies


class FSDPStrategy:
    CHECKPOINT_FORMAT = "dcp"

    def __init__(self, cfg, device: torch.device, shard_classes=()):
        self.device, self.max_grad_norm = device, cfg.train.max_grad_norm
        self.trainable_only, self.compile = cfg.finetune.trainable_only, cfg.train.compile
        self.shard_classes = tuple(shard_classes)
        self.reshard_after_forward = cfg.strategy.reshard_after_forward
        dtype = PRECISION_DTYPES[cfg.precision]
        self.mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

    def prepare(self, model, make_optimizers):
        model = model.to(self.device)
        options = {"mp_policy": self.mp_policy, "reshard_after_forward": self.reshard_after_forward}
        block_names = set(getattr(model, "_no_split_modules", None) or ())
        blocks = [m for m in model.modules() if isinstance(m, self.shard_classes) or type(m).__name__ in block_names]
        for module in blocks:
            if self.compile:  # block by block (torchtitan's way); FSDP's hooks stay outside the graphs
                module.compile()
            fully_shard(module, **options)
        if self.compile and not blocks:
            model.compile()
        self.model = fully_shard(model, **options)
        # Each sharded tensor's layout, to put local parts (an EMA's) back together and take them apart.
        self.layouts = {k: (v.device_mesh, v.placements, v.shape, v.stride()) for k, v in self.model.state_dict().items() if isinstance(v, DTensor)}
        # Built after sharding so that the optimizers hold (and shard their state by) the DTensors.
        self.optimizers = make_optimizers(self.model)
        return self.model, self.optimizers

    def autocast(self):
        # The MixedPrecisionPolicy casts parameters and floating inputs itself.
        return nullcontext()

    def backward(self, loss, sync: bool):
        self.model.set_requires_gradient_sync(sync)
        loss.backward()

    def step(self, index: int = 0) -> torch.Tensor:
        optimizer = self.optimizers[index]
        norm = torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), self.max_grad_norm or math.inf)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if norm.isfinite():  # the same on every rank; a non-finite step would make every weight NaN
            optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return norm

    def local_state(self) -> dict[str, torch.Tensor]:
        """The DTensors' local shards (dim 0, torch.chunk's split); buffers whole."""
        return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in self.model.state_dict().items()}

    def gather(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All-gathers one tensor at a time, so that no rank holds more than one of them complete on the device."""
        return rank0_copies((k, self.full_tensor(k, v)) for k, v in parts.items())

    def full_tensor(self, key: str, part: torch.Tensor) -> torch.Tensor:
        if key not in self.layouts:
            return part
        mesh, placements, shape, stride = self.layouts[key]
        return DTensor.from_local(part, mesh, placements, run_check=False, shape=shape, stride=stride).full_tensor()

    def local_part(self, key: str, full: torch.Tensor) -> torch.Tensor:
        if key not in self.layouts:
            return full
        mesh, placements, _, _ = self.layouts[key]
        return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()  # None: this rank's own slice, no scatter

    def save(self, directory: str):
        dcp.save(directory, self.model, self.optimizers, trainable_only=self.trainable_only)

    def load(self, directory: str):
        dcp.load(directory, self.model, self.optimizers, trainable_only=self.trainable_only)
