"""DeepSpeed ZeRO stage 1/2/3, with optional optimizer / parameter offload to CPU memory.

The DeepSpeed config is derived from dlray's config, so a user never keeps two files in sync.
DeepSpeed counts gradient accumulation itself: `backward` hands every micro-batch to the engine
and the engine applies the optimizer on the accumulation boundary.

Mixed precision is DeepSpeed's `torch_autocast` section: the engine keeps fp32 weights, runs its
forward under torch.autocast on its own device (CPU or CUDA alike), gathers and reduces the
matmul weights in the low dtype, and scales fp16 losses with a GradScaler. Its `bf16` / `fp16`
sections instead hold bf16 weights and switch off any autocast around the engine on CUDA (not on
CPU), so fp32 inputs met bf16 weights there: the same code failed on a GPU and passed on CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dlray.precision import PRECISION_DTYPES
from dlray.strategies.ddp import rank0_copies
from dlray.strategies.scaler import load_scaler, save_scaler

CHECKPOINT_TAG = "deepspeed"  # fixed: one checkpoint per Ray checkpoint directory


class DeepSpeedStrategy:
    CHECKPOINT_FORMAT = "deepspeed"

    def __init__(self, cfg, device: torch.device, shard_classes=()):
        self.device, self.dtype = device, PRECISION_DTYPES[cfg.precision]
        self.trainable_only = cfg.finetune.trainable_only
        self.ds_config = deepspeed_config(cfg)

    def prepare(self, model, make_optimizers):
        import deepspeed

        (optimizer,) = make_optimizers(model)  # the engine drives one optimizer (the config refuses more)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        # ZeRO-3's parameters by state-dict key (a tied one under each of its keys): each holds its
        # rank's slice of the flattened fp32 weight (padded to world size x ds_tensor's size) in ds_tensor.
        self.partitioned = {k: v for k, v in self.engine.module.state_dict(keep_vars=True).items() if hasattr(v, "ds_tensor")}
        return self.engine, [optimizer]

    def autocast(self):
        # The engine's forward autocasts by itself; this covers the loss computed from its outputs
        # (cross-entropy and the like in fp32), with the engine's dtype so the two never disagree.
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss, sync: bool):
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divided by the accumulation steps
        self.engine.step()  # no-op until the accumulation boundary

    def step(self, index: int = 0) -> torch.Tensor | float:
        """The engine stepped in `backward` on the accumulation boundary; the gradient norm it clipped."""
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
        save_scaler(directory, self.loss_scaler())  # DeepSpeed's checkpoint leaves its torch_autocast scaler out

    def load(self, directory: str):
        path, _ = self.engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_lr_scheduler_states=False,
                                              load_module_strict=not self.trainable_only)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/{CHECKPOINT_TAG}")
        load_scaler(directory, self.loss_scaler())

    def loss_scaler(self) -> torch.amp.GradScaler | None:
        """The GradScaler the ZeRO optimizer keeps under torch_autocast fp16 (None otherwise)."""
        return getattr(self.engine.optimizer, "torch_autocast_gradscaler", None)


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
