"""Distributed strategies behind one small interface. `loop.py` never branches on the strategy.

    strategy = STRATEGIES[cfg.strategy.name](cfg, device, shard_classes)
    model, optimizers = strategy.prepare(model, make_optimizers)  # make_optimizers(module) -> [torch optimizers]
    with strategy.autocast(): losses = compute_loss(model, batch)
    strategy.backward(loss, sync=is_last_micro_batch)             # loss already / gradient_accumulation_steps
    grad_norm = strategy.step(index)                              # clip, step optimizers[index], zero grads; the norm before clipping
    strategy.local_state()                                        # this rank's part of the weights, no collective (EMA)
    strategy.gather(parts) / strategy.local_part(key, full)       # parts -> complete tensors on rank 0, and back
    strategy.save(directory) / strategy.load(directory)           # model + optimizers (+ loss scaler), all ranks
    strategy.CHECKPOINT_FORMAT                                   # how `dlray export` reads the weights back

Each strategy owns its mixed precision, its checkpoint format and its keys: a class of the `strategy:`
section's union (dlray.config.sections.StrategyConfig: zero_stage is DeepSpeedConfig's only). `cfg` is the
job's config with its precision resolved for the device (never `auto`).
  ddp        DistributedDataParallel, torch.autocast, GradScaler for fp16; torch.distributed.checkpoint
  fsdp       FSDP2 `fully_shard` per block with a MixedPrecisionPolicy; sharded torch.distributed.checkpoint
  deepspeed  ZeRO stage 1/2/3 (+ CPU offload); DeepSpeed's own (sharded) checkpoint
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from dlray.strategies.ddp import DDPStrategy
from dlray.strategies.deepspeed import DeepSpeedStrategy
from dlray.strategies.fsdp import FSDPStrategy


class Strategy(Protocol):
    """What the loop asks of a strategy; the three below satisfy it (checked by mypy in `make test`)."""

    CHECKPOINT_FORMAT: str  # "dcp" or "deepspeed": how `dlray export` reads the weights back
    device: torch.device  # the training device: dlray.step puts each batch there

    def __init__(self, cfg: Any, device: torch.device, shard_classes: tuple[type[nn.Module], ...] = ()) -> None: ...

    def prepare(self, model: nn.Module, make_optimizers: Callable[[nn.Module], list[torch.optim.Optimizer]]
                ) -> tuple[nn.Module, list[torch.optim.Optimizer]]:
        """The model wrapped for training on the device, and its optimizers (built on the wrapped parameters)."""
        ...

    def autocast(self) -> AbstractContextManager:
        """Around the forward and loss: the strategy's mixed precision."""
        ...

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Gradients of one micro-batch's loss; `sync` on the last micro-batch of an optimizer step."""
        ...

    def step(self, index: int = 0) -> torch.Tensor | float:
        """After the last micro-batch: clip, apply optimizer `index` (DeepSpeed's engine already has, in
        `backward`), zero the gradients; the gradient norm before clipping. A non-finite norm (the same on
        every rank) skips the step: its weights and optimizer state stay as they were."""
        ...

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's part of every weight and buffer, by state-dict key, without a collective: the whole
        tensor under DDP and ZeRO-1/2, the rank's shard under FSDP, its fp32 partition under ZeRO-3. The
        live tensors, not copies."""
        ...

    def gather(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Complete tensors from parts laid out as `local_state()`'s (the weights, or an average of them),
        as CPU copies on rank 0 and an empty dict elsewhere: a collective under FSDP and ZeRO-3."""
        ...

    def local_part(self, key: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of `full`, the complete tensor of state-dict `key`, as `local_state()` lays it out."""
        ...

    def save(self, directory: str) -> None: ...

    def load(self, directory: str) -> None: ...


STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}
