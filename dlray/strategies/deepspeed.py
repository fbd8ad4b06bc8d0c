"""DeepSpeed ZeRO stage 1/2/3, with optional optimizer / parameter offload to CPU memory.

The DeepSpeed config is derived from dlray's config, so a user never keeps two files in sync.
DeepSpeed counts gradient accumulation itself: `backward` hands every micro-batch to the engine
and the engine applies the optimizer on the accumulation boundary.

Mixed precision is DeepSpeed's `torch_autocast` section: the engine keeps fp32 weights, runs its
forward under torch.autocast on its own device (CPU or CUDA alike), and gathers and reduces the
matmul weights in the low dtype. fp16 losses are scaled by `LossScale`, which the ZeRO optimizer
takes as its own loss scale (see `DeepSpeedStrategy.prepare`). Its `bf16` / `fp16` sections
instead hold bf16 weights and switch off any autocast around the engine on CUDA (not on CPU), so
fp32 inputs met bf16 weights there: the same code failed on a GPU and passed on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dlray.precision import PRECISION_DTYPES
from dlray.strategies.ddp import rank0_copies
from dlray.strategies.scaler import load_scaler, save_scaler

CHECKPOINT_TAG = "deepspeed"  # fixed: one checkpoint per Ray checkpoint directory
GROWTH_INTERVAL = 2000  # steps without an overflow before the loss scale doubles: torch.amp.GradScaler's default


class LossScale:
    """The fp16 loss scale: torch.amp.GradScaler's policy (2**16 to start, halved on an overflow, doubled
    after GROWTH_INTERVAL steps without one) and the names of its checkpoint state, so strategies/scaler.py
    saves it beside the checkpoint as it saves the DDP strategy's GradScaler. A Python float, not a
    GradScaler's device tensor: ZeRO compares and divides by its loss scale several times a step, and on
    a GPU each of those would wait for the device."""

    def __init__(self):
        self.scale, self.clean_steps = 2.0**16, 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.clean_steps = self.scale / 2, 0
        else:
            self.clean_steps += 1
            if self.clean_steps == GROWTH_INTERVAL:
                self.scale, self.clean_steps = self.scale * 2, 0

    def is_enabled(self) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "_growth_tracker": self.clean_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scale, self.clean_steps = float(state_dict["scale"]), int(state_dict["_growth_tracker"])


class DeepSpeedStrategy:
    CHECKPOINT_FORMAT = "deepspeed"

    def __init__(self, cfg, device: torch.device, shard_classes=()):
        self.device, self.dtype = device, PRECISION_DTYPES[cfg.precision]
        self.trainable_only = cfg.finetune.trainable_only
        self.ds_config = deepspeed_config(cfg)
        self.loss_scale = LossScale() if cfg.precision == "fp16" else None  # bf16 has fp32's range and needs none

    def prepare(self, model, make_optimizers):
        import deepspeed

        (optimizer,) = make_optimizers(model)  # the engine drives one optimizer (the config refuses more)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        # ZeRO-3's parameters by state-dict key (a tied one under each of its keys): each holds its
        # rank's slice of the flattened fp32 weight (padded to world size x ds_tensor's size) in ds_tensor.
        self.partitioned = {k: v for k, v in self.engine.module.state_dict(keep_vars=True).items() if hasattr(v, "ds_tensor")}
        if self.loss_scale:
            # DeepSpeed 0.19.8's ZeRO optimizer takes the gradient norm, clips, and calls a non-finite norm an
            # overflow on the gradients as backward left them, divided by its own loss scale: 1 for fp32
            # weights. Under torch_autocast fp16 it scales the loss with a GradScaler that unscales only
            # inside the optimizer step, after the clipping, and that never hears of an overflow (the step
            # returns before it): the norm came out 2**16 times too large, every update was clipped to
            # max_grad_norm / 2**16, and the first overflow stopped training for good. Given our scale as
            # its own (`override_loss_scale`, ZeRO's hook for an outside scale), ZeRO scales the loss by it,
            # and divides the norm and the gradients by it before clipping, as under its own `fp16`
            # section; the GradScaler goes, or it would unscale the gradients a second time.
            self.engine.optimizer.torch_autocast_gradscaler = None
            self.engine.optimizer.override_loss_scale(self.loss_scale.scale)
        return self.engine, [optimizer]

    def autocast(self):
        # The engine's forward autocasts by itself; this covers the loss computed from its outputs
        # (cross-entropy and the like in fp32), with the engine's dtype so the two never disagree.
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss, sync: bool):
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divided by the accumulation steps
        steps = self.engine.global_steps
        self.engine.step()  # no-op until the accumulation boundary
        if self.loss_scale and self.engine.global_steps > steps:
            # After the step: ZeRO has unscaled this step's gradients, and the next step's loss takes the new
            # scale. An overflow (a non-finite norm) skipped the step; the scale backs off and training goes on.
            self.loss_scale.update(overflow=not self.engine.was_step_applied())
            self.engine.optimizer.override_loss_scale(self.loss_scale.scale)

    def step(self, index: int = 0) -> torch.Tensor | float:
        """The engine stepped in `backward` on the accumulation boundary; the gradient norm it clipped
        (unscaled; inf where fp16 overflowed and the step was skipped)."""
        norm = self.engine.get_global_grad_norm()
        return norm if norm is not None else float("nan")

    def local_state(self) -> dict[str, torch.Tensor]:
        """Under ZeRO-3 each parameter's fp32 partition (ds_tensor, which the optimizer steps: under
        torch_autocast the module keeps fp32 weights), not the bf16-rounded weights a gather would give;
        otherwise (and buffers) the module's whole tensors."""
        return {k: self.partitioned[k].ds_tensor if k in self.partitioned else v for k, v in self.engine.module.state_dict().items()}

    def gather(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All-gathers one partition at a time, in the parts' own dtype (fp32: no rounding to the
        communication dtype, as DeepSpeed's own gathers under torch_autocast do)."""
        return rank0_copies((k, self.full_tensor(k, v)) for k, v in parts.items())

    def full_tensor(self, key: str, part: torch.Tensor) -> torch.Tensor:
        param = self.partitioned.get(key)
        if param is None:
            return part
        group = param.ds_process_group
        flat = torch.empty(part.numel() * dist.get_world_size(group), dtype=part.dtype, device=self.device)
        dist.all_gather_single(flat, part.to(self.device), group=group)  # on the device: with offload_param a partition is in CPU memory
        return flat[:param.ds_numel].view(param.ds_shape)

    def local_part(self, key: str, full: torch.Tensor) -> torch.Tensor:
        param = self.partitioned.get(key)
        if param is None:
            return full
        size = param.ds_tensor.ds_numel
        start = size * dist.get_rank(param.ds_process_group)
        part = full.new_zeros(size)  # the last ranks' padding: zeros
        own = full.flatten()[start:start + size]
        part[:len(own)] = own
        return part

    def save(self, directory: str):
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=self.trainable_only)
        save_scaler(directory, self.loss_scale)  # DeepSpeed's checkpoint knows nothing of it

    def load(self, directory: str):
        path, _ = self.engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_lr_scheduler_states=False,
                                              load_module_strict=not self.trainable_only)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/{CHECKPOINT_TAG}")
        if self.loss_scale:
            load_scaler(directory, self.loss_scale)
            self.engine.optimizer.override_loss_scale(self.loss_scale.scale)


def deepspeed_config(cfg) -> dict:
    zero = {"stage": cfg.strategy.zero_stage}
    if cfg.strategy.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if cfg.strategy.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "gradient_clipping": cfg.train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "torch_autocast": {"enabled": cfg.precision != "fp32", "dtype": cfg.precision},
        # dlray builds a plain torch optimizer from `optim:`; DeepSpeed wraps it for ZeRO.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,  # dlray reports its own metrics
    }


def load_weights_offline(directory: str, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights (or those that trained) from a (possibly ZeRO-3 sharded) DeepSpeed checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(directory, tag=CHECKPOINT_TAG, exclude_frozen_parameters=trainable_only)
