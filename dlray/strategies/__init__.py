"""Distributed strategies behind one small interface. `loop.py` never branches on the strategy.

    strategy = STRATEGIES[cfg.strategy.name](cfg, device, shard_classes)
    model, optimizers = strategy.prepare(model, make_optimizers)  # make_optimizers(module) -> [torch optimizers]
    with strategy.autocast(): losses = compute_loss(model, batch)
    strategy.backward(loss, sync=is_last_micro_batch)             # loss already / gradient_accumulation_steps
    grad_norm = strategy.step(index)                              # clip, step optimizers[index], zero grads
    strategy.full_state()                                         # complete weights on every rank (EMA, samples)
    strategy.save(directory) / strategy.load(directory)           # model + optimizers (+ loss scaler), all ranks
    strategy.CHECKPOINT_FORMAT                                   # how `dlray export` reads the weights back

Each strategy owns its mixed precision and its checkpoint format:
  ddp        DistributedDataParallel, torch.autocast, GradScaler for fp16; torch.distributed.checkpoint
  fsdp       FSDP2 `fully_shard` per block with a MixedPrecisionPolicy; sharded torch.distributed.checkpoint
  deepspeed  ZeRO stage 1/2/3 (+ CPU offload); DeepSpeed's own (sharded) checkpoint
"""

from dlray.strategies.ddp import DDPStrategy
from dlray.strategies.deepspeed import DeepSpeedStrategy
from dlray.strategies.fsdp import FSDPStrategy

STRATEGIES = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}
