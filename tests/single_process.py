"""A family's model trained, evaluated and exported in one process (no Ray) by the loop's Ray-free core
(dlray.step) on one rank: build_model, the DDP strategy (on one rank, the bare model), train_step with the
config's optimizer and schedule, evaluate, and checkpoint.write_meta's meta.json."""

import contextlib
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.utils.data import DataLoader

from dlray import step
from dlray.batches import EvalShard
from dlray.checkpoint import TOKENIZER_DIR, TrainState, write_meta
from dlray.config import config_from_dict
from dlray.data import build_data
from dlray.export import export
from dlray.loop import build_model, make_optimizers
from dlray.models import FAMILIES
from dlray.optim import build_scheduler
from dlray.strategies import STRATEGIES

CPU = torch.device("cpu")


@contextlib.contextmanager
def one_rank():
    """A process group of this process alone, for the strategy's and evaluate's collectives (none if one is up)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train(cfg, steps: int, batch_size: int):
    """`steps` optimizer steps on shuffled training batches, in fp32 unless the job names a precision;
    the data and the model, in eval mode."""
    torch.manual_seed(0)
    family = FAMILIES[cfg.model.family]
    data = build_data(cfg.data, seed=cfg.train.seed)
    cfg = cfg.model_copy(update={"precision": "fp32" if cfg.precision == "auto" else cfg.precision})
    with one_rank():
        strategy = STRATEGIES["ddp"](cfg, CPU)
        model, optimizers = strategy.prepare(build_model(family, cfg, data.info), lambda module: make_optimizers(family, module, cfg))
        schedulers = [build_scheduler(cfg.scheduler, optimizer, steps, steps, cfg.train.mode) for optimizer in optimizers]
        loader = DataLoader(data.train, batch_size, shuffle=True, drop_last=True)
        batches = ((batch, None, None) for _ in range(steps) for batch in loader)
        totals = step.EpochTotals.zeros(len(family.optimizers), CPU)
        model.train()
        for batch in islice(batches, steps):
            step.train_step(model, family, strategy, [batch], totals, schedulers=schedulers)
    return data, model.eval()


def evaluate(family, model, dataset) -> dict[str, float]:
    """The mean of each per-sample value compute_loss returns, over the dataset (dlray.step.evaluate)."""
    with one_rank():
        return step.evaluate(model, family, DataLoader(EvalShard(dataset, 0, 1), 256), CPU)


def export_trained(cfg, data, model, directory: Path) -> Path:
    """`dlray export` of a checkpoint laid out as checkpoint.report_with_checkpoint writes one
    (weights in DCP, meta.json, the tokenizer of text data)."""
    checkpoint = directory / "checkpoint"
    dcp.save({"model": model.state_dict()}, checkpoint_id=checkpoint, no_dist=True)
    write_meta(checkpoint, STRATEGIES["ddp"].CHECKPOINT_FORMAT, cfg, data.info, TrainState(), {})
    if data.tokenizer is not None:
        data.tokenizer.save_pretrained(checkpoint / TOKENIZER_DIR)
    return export(checkpoint, directory / "artifact")


def checkpointing_gradients(job: dict, data) -> tuple[list, list[torch.Tensor]]:
    """Two models of the job from the same seed, without and with train.gradient_checkpointing, and
    the gradients of each on the same 4 training samples."""
    family = FAMILIES[job["model"]["family"]]
    batch = next(iter(DataLoader(data.train, 4)))
    models, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(family, config_from_dict({**job, "train": {"gradient_checkpointing": checkpointing}}), data.info)
        family.training_loss(model.train(), batch, "model").backward()
        models.append(model)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return models, grads
