"""The training loop, run by every Ray Train worker. Read it top to bottom: setup, steps, finish.

    worker: cfg = JobConfig(**dict), its precision chosen for this device -> batches -> model -> strategy.prepare
            -> the step budget (train.num_epochs, or train.max_steps / train.max_tokens) -> [restore a checkpoint,
            mid-epoch too] -> report "start" -> optimizer steps (dlray.step.train_step) [-> EMA], each followed by
            at most one of: a validation + checkpoint (an epoch's end, every train.val_every_n_steps, the budget's
            end), a "step" progress report [+ a checkpoint by time or before a preemption], a checkpoint every
            train.checkpoint_every_n_steps -> restore the best checkpoint -> test -> report "final"

The step, the evaluation and the running totals are dlray.step's, Ray-free (the tests drive them too);
this file adds what a Ray Train worker does around them. Every report (dlray.reports) goes to the Ray
Train controller, where dlray's callbacks write the run's files and relay progress to the driver's
console (dlray.console): workers print nothing themselves.

A run resumed from a checkpoint taken mid-epoch goes on with the batch the interrupted run would have
taken next (dlray.batches: an epoch's order depends on the seed and the epoch alone), with the weights,
optimizer, schedules and RNG streams restored: it ends where the uninterrupted run ends. The train
metrics of its first validation cover the steps trained since it resumed.

Strategy differences (DDP / FSDP2 / DeepSpeed, precision) live behind the strategy's methods, family
differences behind the family's, and in-memory vs streamed data behind the batches' (dlray.batches).
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import time
from itertools import islice

import psutil
import ray.train
import ray.train.collective
import ray.train.torch
import torch
import torch.distributed as dist

from dlray import finetune, oom, precision, reports
from dlray.batches import worker_data
from dlray.checkpoint import UPLOAD_MODES, TrainState, best_checkpoint, report_with_checkpoint, restore
from dlray.config import JobConfig
from dlray.ema import EMA
from dlray.models import FAMILIES
from dlray.optim import apply_hyperparameters, build_optimizer, build_scheduler, is_per_step
from dlray.step import EpochTotals, NonFiniteGuard, evaluate, optimizer_steps, prefixed, step_budget, timed, train_step
from dlray.strategies import STRATEGIES
from dlray.watchdog import Heartbeat, slowed


def train_loop_per_worker(config: dict) -> None:
    """config: {"job": the JobConfig as a dict, "streamed" and "in_memory": the data (dlray.batches.worker_data),
    "log_level": for this process's Python loggers}."""
    # Root, not "ray.train": Ray Train's per-report INFO line comes from a logger named after its file
    # path, which RunConfig's LoggingConfig does not reach.
    logging.getLogger().setLevel(config["log_level"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    hardware = precision.detect(device)
    oom.record_history(device)
    cfg, precision_why = with_precision(JobConfig.model_validate(config["job"]), hardware)
    family = FAMILIES[cfg.model.family]
    num_nodes, node = count_nodes(world)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    batches, data_info, tokenizer = worker_data(config, cfg, rank, world, device)
    model = build_model(family, cfg, data_info)
    family = finetune.objective(family, cfg, model, device)  # finetune.objective's loss (DPO, ORPO, KTO) and its reference model
    flops_per_sample = model_flops_per_sample(family, model, data_info)
    strategy = STRATEGIES[cfg.strategy.name](cfg, device, family.shard_classes())
    model, optimizers = strategy.prepare(model, lambda module: make_optimizers(family, module, cfg, fused=device.type == "cuda"))
    ema = EMA(strategy, cfg.train.ema_decay) if cfg.train.ema_decay else None
    sampler = Sampler(family, cfg, data_info, device, rank)
    torch.manual_seed(cfg.train.seed + 1 + rank)  # but different dropout / augmentation draws

    accumulation = cfg.train.gradient_accumulation_steps
    steps_per_epoch = count_steps(batches, cfg, world)
    tokens_per_step = cfg.train.micro_batch_size * accumulation * world * data_info.get("max_seq_len", 0)
    total_steps = step_budget(cfg.train.num_epochs, cfg.train.max_steps, cfg.train.max_tokens, steps_per_epoch, tokens_per_step)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    schedulers = [build_scheduler(cfg.scheduler, o, steps_per_epoch, total_steps, cfg.train.mode) for o in optimizers]
    checkpoint = ray.train.get_checkpoint() or (ray.train.Checkpoint(cfg.run.resume_from_checkpoint) if cfg.run.resume_from_checkpoint else None)
    state = resume(checkpoint, cfg, strategy, optimizers, schedulers, ema)
    resumed_from_step = state.global_step
    ray.train.report(reports.start(
        node=node, num_nodes=num_nodes, device=str(device), precision=cfg.precision, precision_why=precision_why,
        precision_warning=precision.slowdown_warning(cfg.precision, hardware) or "", epoch=state.epoch, global_step=state.global_step,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, num_epochs=num_epochs, tokens_per_step=tokens_per_step,
        resumed_from=checkpoint.path if checkpoint else "",
    ))

    totals = EpochTotals.zeros(len(family.optimizers), device)
    progress = ProgressCadence(cfg.train.log_every_n_steps, rank)
    saves = CheckpointCadence(cfg, rank)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    beats = Heartbeat(config.get("watchdog"), rank, node)  # a watchdog outside the ranks times the steps (run.hang_timeout_s)
    interval = {"start": time.perf_counter(), "peak_private": private_mib()}  # since the last validation: throughput, memory
    started: dict[str, float] = {}  # when this run took its first optimizer step, reported with the validation that follows it

    def validate(epoch: int) -> bool:
        """Every rank, after the step that ends an epoch, the budget or a val_every_n_steps interval: the
        validation report with its checkpoint. Whether early stopping ends the run here."""
        elapsed = time.perf_counter() - interval["start"]
        totals.all_reduce()
        val_batches = batches.eval("val")
        if cfg.train.val_max_batches:
            val_batches = islice(val_batches, cfg.train.val_max_batches)
        metrics = {"epoch": epoch, "global_step": state.global_step, "step_in_epoch": state.step_in_epoch} | totals.train_metrics(family.optimizers)
        metrics |= prefixed("val", evaluate(model, family, beats.through(val_batches, state.global_step), device, strategy.autocast))
        metrics |= {"lr": optimizers[0].param_groups[0]["lr"], "nonfinite_steps": totals.nonfinite} | totals.throughput(elapsed)
        metrics |= {"resumed_from_step": resumed_from_step, "num_nodes": num_nodes, "peak_rss_mib": peak_rss_mib(),
                    "peak_private_mib": interval["peak_private"]} | started | tokens(state.global_step, tokens_per_step)
        started.clear()
        metrics |= family.derived_metrics(metrics, data_info) | data_time_spread(totals, world)
        metrics |= model_flops_utilisation(metrics["samples_per_sec"], flops_per_sample, world, hardware)
        check_finite(metrics, cfg.train.metric, epoch, trained=totals.steps > totals.nonfinite)
        for scheduler in schedulers:
            if not is_per_step(scheduler):
                scheduler.step(metrics[cfg.train.metric])
        state.update(metrics[cfg.train.metric], cfg.train.mode)
        epoch_ended = state.step_in_epoch == steps_per_epoch
        with beats.alive(state.global_step):
            samples_png = sampler.grid_png(strategy, ema) if epoch_ended else None  # a generative family's grid: once an epoch
            if epoch_ended:
                state.next_epoch()
            model.train()
            report_with_checkpoint(reports.epoch(metrics), strategy, schedulers, state, cfg, data_info, ema, samples_png, tokenizer)
        saves.saved()
        totals.zero()
        interval.update(start=time.perf_counter(), peak_private=private_mib())
        progress.restart()  # the next step report counts from this one
        beats.step(state.global_step)
        patience = cfg.train.early_stopping_patience
        return bool(patience and state.bad_validations >= patience)

    stopped = False
    while state.global_step < total_steps and not stopped:
        epoch, done = state.epoch, state.step_in_epoch
        model.train()
        window = Window(time.perf_counter())
        micro_batches = timed(slowed(batches.train(epoch, done * accumulation, prefetch_next=epoch + 1 < num_epochs), rank), totals)
        for step_batches in optimizer_steps(micro_batches, accumulation):
            with oom.explained(cfg, state.global_step + 1, rank, device):
                nonfinite = train_step(model, family, strategy, step_batches, totals, accumulation, schedulers)
            state.global_step += 1
            state.step_in_epoch += 1
            guard.check(state.global_step, nonfinite)
            beats.step(state.global_step, totals)
            if ema:
                ema.update()
            if state.global_step == 1:  # the run's start-up latency ends here (`dlray bench cluster` reads it)
                started["first_step_unix_time"] = time.time()
            interval["peak_private"] = max(interval["peak_private"], private_mib())
            if state.global_step == total_steps:
                break  # the budget ends mid-epoch: its last validation follows
            due = progress.due()
            if state.step_in_epoch == steps_per_epoch:
                continue  # the epoch's own validation follows its last step
            if cfg.train.val_every_n_steps and state.global_step % cfg.train.val_every_n_steps == 0:
                if stopped := validate(epoch):
                    break
                window = Window(time.perf_counter())
                continue
            if due:
                record = {"epoch": epoch, "global_step": state.global_step, "step_in_epoch": state.step_in_epoch,
                          "steps_per_epoch": steps_per_epoch, "lr": optimizers[0].param_groups[0]["lr"], "nonfinite_steps": totals.nonfinite} | window.read(totals)
                # In the checkpoints' upload mode: a sync-mode report would wait for an async upload still running.
                ray.train.report(reports.step(**record, **tokens(state.global_step, tokens_per_step), **family.derived_metrics(record, data_info)),
                                 checkpoint_upload_mode=UPLOAD_MODES[cfg.run.checkpoint_upload])
                progress.reported()
            if reason := saves.due(state.global_step, at_report=due):
                report = reports.checkpoint(epoch=epoch, global_step=state.global_step, step_in_epoch=state.step_in_epoch, reason=reason,
                                            metric=cfg.train.metric, mode=cfg.train.mode)
                with beats.alive(state.global_step):
                    report_with_checkpoint(report, strategy, schedulers, state, cfg, data_info, ema, None, tokenizer)
                saves.saved()
        if not stopped:
            stopped = validate(epoch)

    beats.done()
    # Finish on the best weights, as early stopping promises, and score them once on the test split.
    best = best_checkpoint(cfg.train.metric, cfg.train.mode)
    if best is not None:
        restore(best, strategy, schedulers, restore_train_state=False)
    final = {"epoch": state.epoch - (state.step_in_epoch == 0), "global_step": state.global_step, "best_" + cfg.train.metric: state.best,
             "bad_validations": state.bad_validations}
    if batches.rows["test"]:
        final |= prefixed("test", evaluate(model, family, batches.eval("test"), device, strategy.autocast))
    ray.train.report(reports.final(final | family.derived_metrics(final, data_info)))


def with_precision(cfg: JobConfig, hardware: precision.Hardware) -> tuple[JobConfig, str]:
    """The job with the precision this worker computes in (`auto` resolved for its device; TF32 set on
    a CUDA device), and why, for the start report."""
    chosen, why = precision.choose(cfg.precision, hardware, cfg.strategy.name)
    tf32, tf32_why = precision.choose_tf32(hardware, chosen, cfg.train.tf32)
    if hardware.device_type == "cuda":
        precision.set_tf32(tf32)
    return cfg.model_copy(update={"precision": chosen}), "; ".join(filter(None, (why, tf32_why)))


def count_steps(batches, cfg: JobConfig, world: int) -> int:
    """Optimizer steps per epoch, the same on every rank."""
    steps = math.ceil(batches.micro_batches / cfg.train.gradient_accumulation_steps)
    if steps == 0:
        raise ValueError(
            f"train.micro_batch_size x train.gradient_accumulation_steps x scaling.num_workers = "
            f"{cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world} exceeds the {batches.rows['train']} training samples"
        )
    return steps


def resume(checkpoint: ray.train.Checkpoint | None, cfg: JobConfig, strategy, optimizers: list, schedulers: list, ema: EMA | None) -> TrainState:
    """Where the run starts: `checkpoint` (this run's own latest after a restart, else run.resume_from_checkpoint)
    loaded into the strategy, schedulers and EMA, or a fresh start."""
    if checkpoint is None:
        return TrainState(base_lr=cfg.optim.lr)
    state = restore(checkpoint, strategy, schedulers, ema)
    # This config's hyperparameters, not the checkpoint's: a PBT trial continues another's state with its own.
    for optimizer, scheduler in zip(optimizers, schedulers):
        apply_hyperparameters(optimizer, scheduler, cfg.optim, state.base_lr or cfg.optim.lr)
    state.base_lr = cfg.optim.lr
    return state


def check_finite(metrics: dict, metric: str, epoch: int, trained: bool = True) -> None:
    """`trained`: whether any step since the last validation was applied (else train_loss has no value; the
    skipped steps are NonFiniteGuard's to judge)."""
    for key in dict.fromkeys(["train_loss", metric] if trained else [metric]):  # accuracy can look finite while the loss is NaN
        if not math.isfinite(metrics[key]):
            raise FloatingPointError(f"{key} is {metrics[key]} at epoch {epoch}: training diverged (check optim.lr)")


def model_flops_utilisation(samples_per_sec: float, flops_per_sample: float | None, world: int, hardware: precision.Hardware) -> dict[str, float]:
    """{"mfu": ...}, of the GPUs' dense bf16 peak, where the family counts its FLOPs and the GPU's peak is known; else {}."""
    if not (hardware.peak_flops and flops_per_sample):
        return {}
    return {"mfu": samples_per_sec * flops_per_sample / (world * hardware.peak_flops)}


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
    """A generative family's sample grid after each epoch (other families: none): rank 0 draws it with a
    full copy of the model on the EMA (or current) weights, the same seeds every epoch, so the grids of
    successive epochs compare."""

    NUM_IMAGES = 16

    def __init__(self, family, cfg: JobConfig, data_info: dict, device, rank: int):
        self.family, self.seed, self.device = family, cfg.train.seed, device
        self.model = family.build(cfg.model.model_dump(), data_info).to(device).eval() if family.sample and rank == 0 else None

    def grid_png(self, strategy, ema: EMA | None) -> bytes | None:
        """Every rank calls it: gathering sharded weights is a collective. The PNG on rank 0, None elsewhere."""
        if not self.family.sample:
            return None
        weights = ema.gather() if ema else strategy.gather(strategy.local_state())
        if self.model is None:
            return None
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


class CheckpointCadence:
    """When to checkpoint between validations, and why: every train.checkpoint_every_n_steps steps; at the
    first step report run.checkpoint_interval_s after the last checkpoint (rank 0's clock, broadcast); at the
    first step report after Ray Train announces that a node of the run is being drained for preemption, once
    (Ray restarts the group on other nodes from it: FailureConfig.max_preemption_failures). Both checks are
    collectives, made at step reports only (about every 5 s), which every rank makes at the same steps."""

    def __init__(self, cfg: JobConfig, rank: int):
        self.every, self.interval_s, self.rank = cfg.train.checkpoint_every_n_steps, cfg.run.checkpoint_interval_s, rank
        self.last = time.monotonic()
        self.preemption_seen = False

    def due(self, global_step: int, at_report: bool) -> str:
        """Why a checkpoint is due after this step ("" when none is)."""
        if self.every and global_step % self.every == 0:
            return f"every {self.every} steps"
        if not at_report:
            return ""
        if self.interval_s and ray.train.collective.broadcast_from_rank_zero(time.monotonic() - self.last >= self.interval_s if self.rank == 0 else None):
            return f"{self.interval_s:g} s since the last"
        info = ray.train.get_preemption_info()
        if info is None or self.preemption_seen:
            return ""
        self.preemption_seen = True
        deadline = f", deadline in {info.deadline_ms / 1000 - time.time():.0f} s" if info.deadline_ms else ""
        return f"preemption of ranks {info.preempted_ranks} announced{deadline}"

    def saved(self) -> None:
        self.last = time.monotonic()


def tokens(global_step: int, tokens_per_step: int) -> dict[str, int]:
    """{"tokens_seen": ...} across ranks, for data made of tokens; else {}."""
    return {"tokens_seen": global_step * tokens_per_step} if tokens_per_step else {}


class Window:
    """This rank's training loss and throughput since its last step report, from the epoch's running totals."""

    def __init__(self, start: float):
        self.time, self.loss_sum, self.rows, self.data_s, self.steps = start, 0.0, 0.0, 0.0, 0

    def read(self, totals: EpochTotals) -> dict[str, float]:
        """train_loss, samples_per_sec, and data_time_s: the rank's seconds per step waiting for its batches (EpochTotals.data_s)."""
        loss_sum, rows = torch.stack([totals.losses.sum(), totals.samples]).tolist()  # one device sync per report, not per step
        now = time.perf_counter()
        window = {"train_loss": (loss_sum - self.loss_sum) / max(rows - self.rows, 1), "samples_per_sec": (rows - self.rows) / (now - self.time),
                  "data_time_s": (totals.data_s - self.data_s) / max(totals.steps - self.steps, 1)}
        self.time, self.loss_sum, self.rows, self.data_s, self.steps = now, loss_sum, rows, totals.data_s, totals.steps
        return window


def data_time_spread(totals: EpochTotals, world: int) -> dict[str, float]:
    """The ranks' seconds per step waiting for their batches since the last validation (EpochTotals.data_s):
    data_time_s, their median, and data_time_spread, the slowest rank's less the fastest's (0: none lags)."""
    times: list[float] = [0.0] * world
    dist.all_gather_object(times, totals.data_s / max(totals.steps, 1))
    median = statistics.median(times)
    return {"data_time_s": median, "data_time_spread": max(times) - min(times)}


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
