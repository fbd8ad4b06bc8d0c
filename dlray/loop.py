"""The training loop, run by every Ray Train worker. Read it top to bottom.

    worker: cfg = JobConfig(**dict) -> data -> model -> strategy.prepare -> report "start" -> epochs of
            (micro-batches -> backward -> step [-> EMA] [-> report "step"]) -> validate [-> sample grid]
            -> report + checkpoint -> restore the best checkpoint -> test

Every report goes to the Ray Train controller, where dlray's callbacks write the run's files and
relay progress to the driver's console (dlray.console): workers print nothing themselves.

A family with several optimizers (a GAN) runs one backward and step per optimizer on each batch.

Strategy differences (DDP / FSDP2 / DeepSpeed, precision) live behind the strategy's methods.
"""

from __future__ import annotations

import logging
import math
import resource
import time

import psutil
import ray.train
import ray.train.collective
import ray.train.torch
import torch
import torch.distributed as dist

from dlray import finetune, precision
from dlray.batches import worker_data
from dlray.checkpoint import TrainState, best_checkpoint, report_with_checkpoint, restore
from dlray.config import JobConfig
from dlray.ema import EMA
from dlray.models import FAMILIES
from dlray.optim import apply_hyperparameters, build_optimizer, build_scheduler, is_per_step
from dlray.strategies import STRATEGIES


def train_loop_per_worker(config: dict) -> None:
    """config: {"job": the JobConfig as a dict, "streamed" and "in_memory": the data (dlray.batches.worker_data),
    "log_level": for this process's Python loggers}."""
    # Root, not "ray.train": Ray Train's per-report INFO line comes from a logger named after its file
    # path, which RunConfig's LoggingConfig does not reach.
    logging.getLogger().setLevel(config["log_level"])
    cfg = JobConfig.model_validate(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    family = FAMILIES[cfg.model.family]
    num_nodes, node = count_nodes(world)
    hardware = precision.detect(device)
    cfg.precision, precision_why = precision.choose(cfg.precision, hardware, cfg.strategy.name)
    tf32, tf32_why = precision.choose_tf32(hardware, cfg.precision, cfg.train.tf32)
    if device.type == "cuda":
        precision.set_tf32(tf32)
    precision_why = "; ".join(filter(None, (precision_why, tf32_why)))

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    batches, data_info, tokenizer = worker_data(config, cfg, rank, world, device)
    model = build_model(family, cfg, data_info)
    flops_per_sample = model_flops_per_sample(family, model, data_info)
    strategy = STRATEGIES[cfg.strategy.name](cfg, device, family.shard_classes())
    model, optimizers = strategy.prepare(model, lambda module: make_optimizers(family, module, cfg, fused=device.type == "cuda"))
    ema = EMA(strategy, cfg.train.ema_decay) if cfg.train.ema_decay else None
    sampler = Sampler(family, cfg, data_info, device) if family.sample and rank == 0 else None
    torch.manual_seed(cfg.train.seed + 1 + rank)  # but different dropout / augmentation draws

    accumulation = cfg.train.gradient_accumulation_steps
    steps_per_epoch = math.ceil(batches.micro_batches / accumulation)
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.micro_batch_size x train.gradient_accumulation_steps x scaling.num_workers = "
            f"{cfg.train.micro_batch_size * accumulation * world} exceeds the {batches.rows['train']} training samples"
        )
    schedulers = [build_scheduler(cfg.scheduler, o, steps_per_epoch, cfg.train.num_epochs, cfg.train.mode) for o in optimizers]
    meta = {"format": strategy.CHECKPOINT_FORMAT, "config": cfg.model_dump(mode="json"), "data_info": data_info, "world_size": world}

    state = TrainState(base_lr=cfg.optim.lr)
    resumed_from_step = 0
    checkpoint = ray.train.get_checkpoint()  # this run's own latest, after a restart
    if checkpoint is None and cfg.run.resume_from_checkpoint:
        checkpoint = ray.train.Checkpoint(cfg.run.resume_from_checkpoint)
    if checkpoint:
        state = restore(checkpoint, strategy, schedulers, ema)
        # This config's hyperparameters, not the checkpoint's: a PBT trial continues another's state with its own.
        for optimizer, scheduler in zip(optimizers, schedulers):
            apply_hyperparameters(optimizer, scheduler, cfg.optim, state.base_lr or cfg.optim.lr)
        state.base_lr = cfg.optim.lr
        resumed_from_step = state.global_step
    progress = ProgressCadence(cfg.train.log_every_n_steps, rank)
    ray.train.report({
        "phase": "start", "node": node, "num_nodes": num_nodes, "device": str(device), "precision": cfg.precision,
        "precision_why": precision_why, "precision_warning": precision.slowdown_warning(cfg.precision, hardware) or "",
        "epoch": state.epoch, "global_step": state.global_step, "steps_per_epoch": steps_per_epoch,
        "resumed_from": checkpoint.path if checkpoint else "",
    })

    started = {}  # when this run took its first optimizer step, reported with the epoch it falls in
    for epoch in range(state.epoch, cfg.train.num_epochs):
        model.train()
        # Loss sum per optimizer, samples, skipped rows; on the training device: NCCL reduces only CUDA tensors.
        totals = torch.zeros(len(family.optimizers) + 2, dtype=torch.float64, device=device)
        grad_norms = torch.zeros(len(family.optimizers), dtype=torch.float64, device=device)  # summed over the epoch's steps
        start = time.perf_counter()
        window = Window(start)
        step_in_epoch, peak_private = 0, private_mib()
        for i, (batch, weight, skipped) in enumerate(batches.train(epoch)):
            batch, rows, scale = real_rows(batch, weight)
            batch = to_device(batch, device)
            boundary = (i + 1) % accumulation == 0 or i + 1 == batches.micro_batches
            for index, phase in enumerate(family.optimizers):
                with strategy.autocast():
                    loss = family.training_loss(model, batch, phase)
                strategy.backward(loss * scale / accumulation, sync=boundary)
                totals[index] += loss.detach() * rows  # no .item(): it would wait for the GPU every micro-batch
                if boundary:
                    grad_norms[index] += strategy.step(index)
                    if is_per_step(schedulers[index]):
                        schedulers[index].step()
            totals[-2] += rows
            if skipped is not None:
                totals[-1] += int(skipped.sum())
            if boundary:
                state.global_step += 1
                if ema:
                    ema.update()
                if state.global_step == 1:  # the run's start-up latency ends here (`dlray bench cluster` reads it)
                    started["first_step_unix_time"] = time.time()
                step_in_epoch += 1
                peak_private = max(peak_private, private_mib())
                if progress.due() and step_in_epoch < steps_per_epoch:  # the epoch's own report follows its last step
                    record = {"phase": "step", "epoch": epoch, "global_step": state.global_step, "step_in_epoch": step_in_epoch,
                              "steps_per_epoch": steps_per_epoch, "lr": optimizers[0].param_groups[0]["lr"]} | window.read(totals)
                    ray.train.report(record | family.derived_metrics(record, data_info))
                    progress.reported()
        elapsed = time.perf_counter() - start
        dist.all_reduce(totals)

        metrics = {"epoch": epoch, "global_step": state.global_step, "train_loss": (totals[:-2].sum() / totals[-2]).item()}
        # Before clipping, mean over the epoch's optimizer steps (the same on every rank: gradients are reduced first).
        norms = (grad_norms / steps_per_epoch).tolist()
        if len(family.optimizers) == 1:
            metrics["grad_norm"] = norms[0]
        else:  # e.g. train_generator_loss and generator_grad_norm, the same for the discriminator
            metrics |= {f"train_{phase}_loss": (totals[i] / totals[-2]).item() for i, phase in enumerate(family.optimizers)}
            metrics |= {f"{phase}_grad_norm": norms[i] for i, phase in enumerate(family.optimizers)}
        metrics |= evaluate(model, batches.eval("val"), family, strategy, device, prefix="val")
        metrics |= {"lr": optimizers[0].param_groups[0]["lr"], "samples_per_sec": totals[-2].item() / elapsed}
        if config["streamed"]:
            metrics["skipped_rows"] = int(totals[-1].item())
        metrics |= {"resumed_from_step": resumed_from_step, "num_nodes": num_nodes, "peak_rss_mib": peak_rss_mib(),
                    "peak_private_mib": peak_private} | started
        started = {}
        metrics |= family.derived_metrics(metrics, data_info)
        if hardware.peak_flops and flops_per_sample:  # model FLOPs utilisation, of the GPUs' dense bf16 peak
            metrics["mfu"] = metrics["samples_per_sec"] * flops_per_sample / (world * hardware.peak_flops)
        for scheduler in schedulers:
            if not is_per_step(scheduler):
                scheduler.step(metrics[cfg.train.metric])
        samples_png = None
        if family.sample:  # every rank takes part: gathering sharded weights is a collective
            weights = ema.gather() if ema else strategy.gather(strategy.local_state())
            samples_png = sampler.grid_png(weights) if sampler else None

        for key in dict.fromkeys(["train_loss", cfg.train.metric]):  # accuracy can look finite while the loss is NaN
            if not math.isfinite(metrics[key]):
                raise FloatingPointError(f"{key} is {metrics[key]} at epoch {epoch}: training diverged (check optim.lr)")
        state.update(metrics[cfg.train.metric], cfg.train.mode)
        report_with_checkpoint(metrics, strategy, schedulers, state, meta, ema, samples_png, tokenizer)
        progress.restart()  # the next step report counts from this one
        if cfg.train.early_stopping_patience and state.bad_epochs >= cfg.train.early_stopping_patience:
            break

    # Finish on the best weights, as early stopping promises, and score them once on the test split.
    best = best_checkpoint(cfg.train.metric, cfg.train.mode)
    if best is not None:
        restore(best, strategy, schedulers, restore_train_state=False)
    final = {"epoch": state.epoch - 1, "global_step": state.global_step, "best_" + cfg.train.metric: state.best, "bad_epochs": state.bad_epochs}
    if batches.rows["test"]:
        final |= evaluate(model, batches.eval("test"), family, strategy, device, prefix="test")
    ray.train.report(final | family.derived_metrics(final, data_info))


def build_model(family, cfg: JobConfig, data_info: dict) -> torch.nn.Module:
    """The family's model, new or from model.name_or_path, with only the finetune method's weights trainable."""
    model = family.build(cfg.model.model_dump(), data_info, **finetune.load_options(cfg.finetune, cfg.precision, family))
    if cfg.train.gradient_checkpointing:  # the config refuses it for families without
        family.enable_gradient_checkpointing(model)
    return finetune.apply(model, family, cfg)


def make_optimizers(family, module, cfg: JobConfig, fused: bool = False) -> list[torch.optim.Optimizer]:
    return [build_optimizer(cfg.optim, [p for p in params if p.requires_grad], fused) for params in family.optimizer_params(module)]


def model_flops_per_sample(family, model, data_info: dict) -> float | None:
    """Training FLOPs per sample, for families that can count them (gpt: per token x tokens per window)."""
    if not family.flops_per_token:
        return None
    return family.flops_per_token(model, data_info["max_seq_len"]) * data_info["max_seq_len"]


class Sampler:
    """Rank 0's sample grid after each epoch: a full copy of the model on the EMA (or current)
    weights, the same seeds every epoch, so the grids of successive epochs compare."""

    NUM_IMAGES = 16

    def __init__(self, family, cfg: JobConfig, data_info: dict, device):
        self.family, self.seed, self.device = family, cfg.train.seed, device
        self.model = family.build(cfg.model.model_dump(), data_info).to(device).eval()

    def grid_png(self, weights: dict[str, torch.Tensor]) -> bytes:
        from dlray.png import png_grid

        self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        generators = [torch.Generator(self.device).manual_seed(self.seed + i) for i in range(self.NUM_IMAGES)]
        return png_grid(self.family.sample(self.model, generators).cpu())


def count_nodes(world: int) -> tuple[int, str]:
    """How many machines this run's ranks span, and this rank's: "<node id> (<ip>)"."""
    node = ray.get_runtime_context().get_node_id()
    nodes = [None] * world
    dist.all_gather_object(nodes, node)
    return len(set(nodes)), f"{node[:12]} ({ray.util.get_node_ip_address()})"


class ProgressCadence:
    """When every rank sends a step report: every `log_every_n_steps` optimizer steps or, when that is
    None, every so many steps that reports come about INTERVAL_S apart, as rank 0 times its first step
    and then its reports, and broadcasts. Ray Train's controller takes one report per worker each time
    it polls (every 2 s by default): closer reports would stall training."""

    INTERVAL_S = 5.0  # 2.5 controller polls

    def __init__(self, log_every_n_steps: int | None, rank: int):
        self.fixed, self.rank = log_every_n_steps, rank
        self.every = log_every_n_steps or 0  # 0: not chosen yet
        self.steps, self.since = 0, time.perf_counter()

    def due(self) -> bool:
        """Call after each optimizer step: is a report due now?"""
        self.steps += 1
        if not self.every:  # after the first step, which over-estimates (warm-up, compilation): reports come early rather than late
            self.choose()
            return False
        return self.steps >= self.every

    def reported(self) -> None:
        if not self.fixed:
            self.choose()
        self.restart()

    def choose(self) -> None:
        """Every rank must report at the same steps: rank 0's choice, from its clock."""
        per_step = (time.perf_counter() - self.since) / self.steps
        self.every = ray.train.collective.broadcast_from_rank_zero(max(1, round(self.INTERVAL_S / per_step)) if self.rank == 0 else None)

    def restart(self) -> None:
        self.steps, self.since = 0, time.perf_counter()


class Window:
    """This rank's training loss and throughput since its last step report, from the epoch's running totals."""

    def __init__(self, start: float):
        self.time, self.loss_sum, self.rows = start, 0.0, 0.0

    def read(self, totals: torch.Tensor) -> dict[str, float]:
        loss_sum, rows = torch.stack([totals[:-2].sum(), totals[-2]]).tolist()  # one device sync per report, not per step
        now = time.perf_counter()
        window = {"train_loss": (loss_sum - self.loss_sum) / max(rows - self.rows, 1), "samples_per_sec": (rows - self.rows) / (now - self.time)}
        self.time, self.loss_sum, self.rows = now, loss_sum, rows
        return window


@torch.no_grad()
def evaluate(model, loader, family, strategy, device, prefix: str) -> dict[str, float]:
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


def real_rows(batch: list[torch.Tensor], weight: torch.Tensor | None) -> tuple[list[torch.Tensor], int, float]:
    """The batch's weight-1 rows (streamed splits are padded with weight-0 rows), how many, and the loss
    scale: 0 for a batch of padding only, which still runs forward and backward (its rank must take
    part in the step's collectives) but must not move the weights."""
    if weight is None or bool(weight.all()):
        return batch, len(batch[-1]), 1.0
    keep = weight > 0
    if not keep.any():
        return batch, 0, 0.0
    return [field[keep] for field in batch], int(keep.sum()), 1.0


def peak_rss_mib() -> float:
    """This worker's peak resident memory so far, the object store's pages it has read blocks from included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def private_mib() -> float:
    """This worker's own resident memory now: resident less shared pages, as Ray's memory monitor and
    dashboard count a worker's. The shared pages are mostly Ray's object store, mapped into each
    process that reads a block: streamed data touches more of it the more there is (up to
    object_store_memory, which Ray bounds and evicts), while the worker's own memory stays flat."""
    info = psutil.Process().memory_info()
    return (info.rss - getattr(info, "shared", 0)) / 2**20  # no `shared` off Linux: all of it


def to_device(batch, device):
    return [t.to(device, non_blocking=True) for t in batch]
