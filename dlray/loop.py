"""The training loop, run by every Ray Train worker. Read it top to bottom.

    worker: cfg = JobConfig(**dict) -> data -> model -> strategy.prepare -> epochs of
            (micro-batches -> backward -> step [-> EMA]) -> validate [-> sample grid]
            -> report + checkpoint -> restore the best checkpoint -> test

A family with several optimizers (a GAN) runs one backward and step per optimizer on each batch.

Strategy differences (DDP / FSDP2 / DeepSpeed, precision) live behind the strategy's methods.
"""

from __future__ import annotations

import itertools
import math
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dlray import finetune, precision
from dlray.checkpoint import best_checkpoint, report_with_checkpoint, restore
from dlray.config import JobConfig
from dlray.data import build_data
from dlray.ema import EMA
from dlray.models import FAMILIES
from dlray.optim import apply_hyperparameters, build_optimizer, build_scheduler, is_per_step
from dlray.strategies import STRATEGIES


def train_loop_per_worker(config: dict) -> None:
    cfg = JobConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    family = FAMILIES[cfg.model.family]
    num_nodes = count_nodes(rank, world)
    hardware = precision.detect(device)
    cfg.precision = choose_precision(cfg, hardware, rank)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    data = build_data(cfg.data, seed=cfg.train.seed)
    data_info = data.info
    model = build_model(family, cfg, data_info)
    flops_per_sample = model_flops_per_sample(family, model, data_info)
    strategy = STRATEGIES[cfg.strategy.name](cfg, device, family.SHARD_CLASSES)
    model, optimizers = strategy.prepare(model, lambda module: make_optimizers(family, module, cfg, fused=device.type == "cuda"))
    ema = EMA(strategy.full_state(), cfg.train.ema_decay) if cfg.train.ema_decay else None
    sampler = Sampler(family, cfg, data_info, device) if hasattr(family, "sample") and rank == 0 else None
    torch.manual_seed(cfg.train.seed + 1 + rank)  # but different dropout / augmentation draws

    shuffle = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    train_loader = DataLoader(data.train, cfg.train.micro_batch_size, sampler=shuffle, **loader_options(cfg, device))
    val_loader = eval_loader(data.val, cfg, rank, world, device)
    accumulation = cfg.train.gradient_accumulation_steps
    steps_per_epoch = len(train_loader) // accumulation
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.micro_batch_size x train.gradient_accumulation_steps x scaling.num_workers = "
            f"{cfg.train.micro_batch_size * accumulation * world} exceeds the {len(data.train)} training samples"
        )
    schedulers = [build_scheduler(cfg.scheduler, o, steps_per_epoch, cfg.train.num_epochs, cfg.train.mode) for o in optimizers]
    meta = {"format": strategy.CHECKPOINT_FORMAT, "config": cfg.model_dump(mode="json"), "data_info": data_info, "world_size": world}

    progress = {"epoch": 0, "global_step": 0, "best": None, "bad_epochs": 0, "base_lr": cfg.optim.lr}
    resumed_from_step = 0
    checkpoint = ray.train.get_checkpoint()  # this run's own latest, after a restart
    if checkpoint is None and cfg.run.resume_from_checkpoint:
        checkpoint = ray.train.Checkpoint(cfg.run.resume_from_checkpoint)
    if checkpoint:
        progress = restore(checkpoint, strategy, schedulers, ema)
        # This config's hyperparameters, not the checkpoint's: a PBT trial continues another's state with its own.
        for optimizer, scheduler in zip(optimizers, schedulers):
            apply_hyperparameters(optimizer, scheduler, cfg.optim, progress.get("base_lr", cfg.optim.lr))
        progress["base_lr"] = cfg.optim.lr
        resumed_from_step = progress["global_step"]
        if rank == 0:
            print(f"[dlray] resumed from epoch {progress['epoch']}, step {progress['global_step']} of {checkpoint.path}")

    for epoch in range(progress["epoch"], cfg.train.num_epochs):
        shuffle.set_epoch(epoch)  # a new shuffle each epoch, identical across ranks
        model.train()
        # Loss sum per optimizer, samples; on the training device: NCCL reduces only CUDA tensors.
        totals = torch.zeros(len(family.OPTIMIZERS) + 1, dtype=torch.float64, device=device)
        start = time.perf_counter()
        for i, batch in enumerate(itertools.islice(train_loader, steps_per_epoch * accumulation)):
            batch = to_device(batch, device)
            boundary = (i + 1) % accumulation == 0
            for index, phase in enumerate(family.OPTIMIZERS):
                with strategy.autocast():
                    loss = training_loss(family, model, batch, phase)
                strategy.backward(loss / accumulation, sync=boundary)
                totals[index] += loss.detach() * len(batch[-1])  # no .item(): it would wait for the GPU every micro-batch
                if boundary:
                    strategy.step(index)
                    if is_per_step(schedulers[index]):
                        schedulers[index].step()
            totals[-1] += len(batch[-1])
            if boundary:
                progress["global_step"] += 1
                if ema:
                    ema.update(strategy.full_state())
                if progress["global_step"] == 1 and rank == 0:  # start-up latency, as `dlray bench cluster` reads it
                    print(f"[dlray] first optimizer step done at unix time {time.time():.3f}", flush=True)
        elapsed = time.perf_counter() - start
        dist.all_reduce(totals)

        metrics = {"epoch": epoch, "global_step": progress["global_step"], "train_loss": (totals[:-1].sum() / totals[-1]).item()}
        if len(family.OPTIMIZERS) > 1:  # e.g. train_generator_loss, train_discriminator_loss
            metrics |= {f"train_{phase}_loss": (totals[i] / totals[-1]).item() for i, phase in enumerate(family.OPTIMIZERS)}
        metrics |= evaluate(model, val_loader, family, strategy, device, prefix="val")
        metrics |= {"lr": optimizers[0].param_groups[0]["lr"], "samples_per_sec": totals[-1].item() / elapsed}
        metrics |= {"resumed_from_step": resumed_from_step, "num_nodes": num_nodes}
        metrics |= derived_metrics(family, metrics, data_info)
        if hardware.peak_flops and flops_per_sample:  # model FLOPs utilisation, of the GPUs' dense bf16 peak
            metrics["mfu"] = metrics["samples_per_sec"] * flops_per_sample / (world * hardware.peak_flops)
        for scheduler in schedulers:
            if not is_per_step(scheduler):
                scheduler.step(metrics[cfg.train.metric])
        # Every rank takes part: gathering sharded weights is a collective.
        weights = ema.shadow if ema else strategy.full_state() if hasattr(family, "sample") else None
        samples_png = sampler.grid_png(weights) if sampler else None

        for key in dict.fromkeys(["train_loss", cfg.train.metric]):  # accuracy can look finite while the loss is NaN
            if not math.isfinite(metrics[key]):
                raise FloatingPointError(f"{key} is {metrics[key]} at epoch {epoch}: training diverged (check optim.lr)")
        value = metrics[cfg.train.metric]
        improved = progress["best"] is None or (value < progress["best"] if cfg.train.mode == "min" else value > progress["best"])
        progress |= {"epoch": epoch + 1, "best": value if improved else progress["best"], "bad_epochs": 0 if improved else progress["bad_epochs"] + 1}
        report_with_checkpoint(metrics, strategy, schedulers, progress, meta, ema, samples_png, getattr(data, "tokenizer", None))
        if cfg.train.early_stopping_patience and progress["bad_epochs"] >= cfg.train.early_stopping_patience:
            if rank == 0:
                print(f"[dlray] early stop at epoch {epoch}: {cfg.train.metric} has not improved for {progress['bad_epochs']} epochs")
            break

    # Finish on the best weights, as early stopping promises, and score them once on the test split.
    best = best_checkpoint(cfg.train.metric, cfg.train.mode)
    if best is not None:
        restore(best, strategy, schedulers, restore_train_state=False)
    final = {"epoch": progress["epoch"] - 1, "global_step": progress["global_step"], "best_" + cfg.train.metric: progress["best"]}
    if len(data.test):
        final |= evaluate(model, eval_loader(data.test, cfg, rank, world, device), family, strategy, device, prefix="test")
    ray.train.report(final | derived_metrics(family, final, data_info))


def build_model(family, cfg: JobConfig, data_info: dict) -> torch.nn.Module:
    """The family's model, new or from model.name_or_path, with only the finetune method's weights trainable."""
    model = family.build(cfg.model.model_dump(), data_info, **finetune.load_options(cfg.finetune, cfg.precision, family))
    if cfg.train.gradient_checkpointing:
        family.enable_gradient_checkpointing(model)
    return finetune.apply(model, family, cfg)


def choose_precision(cfg: JobConfig, hardware: precision.Hardware, rank: int) -> str:
    """The precision this worker computes in (`auto` resolved for its device); rank 0 says which and why."""
    chosen, why = precision.choose(cfg.precision, hardware, cfg.strategy.name)
    if rank == 0:
        print(f"[dlray] precision {chosen}: {why}", flush=True)
        if warning := precision.slowdown_warning(chosen, hardware):
            print(f"[dlray] warning: {warning}", flush=True)
    return chosen


def make_optimizers(family, module, cfg: JobConfig, fused: bool = False) -> list[torch.optim.Optimizer]:
    groups = family.param_groups(module) if len(family.OPTIMIZERS) > 1 else [module.parameters()]
    return [build_optimizer(cfg.optim, [p for p in params if p.requires_grad], fused) for params in groups]


def training_loss(family, model, batch, phase: str):
    """The mean loss the optimizer of `phase` minimises (single-optimizer families have one phase)."""
    values = family.compute_loss(model, batch, phase) if len(family.OPTIMIZERS) > 1 else family.compute_loss(model, batch)
    return values["loss"].mean()


def model_flops_per_sample(family, model, data_info: dict) -> float | None:
    """Training FLOPs per sample, for families that can count them (gpt: per token x tokens per window)."""
    if not hasattr(family, "flops_per_token"):
        return None
    return family.flops_per_token(model, data_info["max_seq_len"]) * data_info["max_seq_len"]


def derived_metrics(family, metrics: dict, data_info: dict) -> dict:
    """What the family computes from the reported metrics (gpt: perplexity, tokens/s); most compute none."""
    return family.derived_metrics(metrics, data_info) if hasattr(family, "derived_metrics") else {}


class Sampler:
    """Rank 0's sample grid after each epoch: a full copy of the model on the EMA (or current)
    weights, the same seeds every epoch, so the grids of successive epochs compare."""

    NUM_IMAGES = 16

    def __init__(self, family, cfg: JobConfig, data_info: dict, device):
        self.family, self.seed, self.device = family, cfg.train.seed, device
        self.model = family.build(cfg.model.model_dump(), data_info).to(device).eval()

    def grid_png(self, weights: dict[str, torch.Tensor]) -> bytes:
        from dlray.tracking import png_grid

        self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        generators = [torch.Generator(self.device).manual_seed(self.seed + i) for i in range(self.NUM_IMAGES)]
        return png_grid(self.family.sample(self.model, generators).cpu())


def count_nodes(rank: int, world: int) -> int:
    """How many machines this run's ranks span; each rank also says where it runs."""
    node = ray.get_runtime_context().get_node_id()
    print(f"[dlray] rank {rank}/{world} on node {node[:12]} ({ray.util.get_node_ip_address()})")
    nodes = [None] * world
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


class EvalShard(Dataset):
    """Rank `rank`'s share of an evaluation set: every sample exactly once across ranks.

    Shards are padded to equal length (FSDP and ZeRO-3 need every rank to run the same number
    of forward passes); padding items carry weight 0 so they do not count.
    """

    def __init__(self, dataset: Dataset, rank: int, world: int):
        self.dataset, self.n = dataset, len(dataset)
        self.indices = range(rank, world * math.ceil(self.n / world), world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        return self.dataset[index % self.n], float(index < self.n)


def loader_options(cfg: JobConfig, device: torch.device) -> dict:
    # Pinned (page-locked) batches copy to a GPU asynchronously (to_device's non_blocking).
    workers = cfg.data.dataloader_num_workers
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}


def eval_loader(dataset: Dataset, cfg: JobConfig, rank: int, world: int, device: torch.device) -> DataLoader:
    return DataLoader(EvalShard(dataset, rank, world), cfg.train.micro_batch_size, **loader_options(cfg, device))


@torch.no_grad()
def evaluate(model, loader: DataLoader, family, strategy, device, prefix: str) -> dict[str, float]:
    """Weighted means of every per-sample value the family's compute_loss returns, over all ranks."""
    model.eval()
    # Summed on the training device (NCCL reduces only CUDA tensors), read once at the end.
    sums: dict[str, torch.Tensor] = {}
    weight_total = torch.zeros((), dtype=torch.float64, device=device)
    for batch, weight in loader:
        batch, weight = to_device(batch, device), weight.to(device, torch.float64, non_blocking=True)
        with strategy.autocast():
            values = family.compute_loss(model, batch)
        for key, value in values.items():
            sums[key] = sums.get(key, 0) + (value.double() * weight).sum()
        weight_total += weight.sum()
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys] + [weight_total])
    dist.all_reduce(packed)
    return {f"{prefix}_{k}": (packed[i] / packed[-1]).item() for i, k in enumerate(keys)}


def to_device(batch, device):
    return [t.to(device, non_blocking=True) for t in batch]
