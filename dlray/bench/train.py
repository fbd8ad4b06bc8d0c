"""`dlray bench train`: dlray (Ray Train, 1 worker) samples/s / a plain PyTorch loop on the same model,
data and batch size; 2 workers / 1 worker; per-rank parameter+optimizer bytes of FSDP and ZeRO-3 / DDP
with 2 ranks (plain gloo process group: Ray adds nothing to what is measured).

bench_train and the plain loop (PLAIN_LOSSES: a classifier's, diffusers' and transformers' step) also
measure the diffusion and llm groups' training.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from dlray import precision
from dlray.bench.common import one_thread, unique_bytes
from dlray.config import load_config
from dlray.data import build_data
from dlray.local_cluster import free_port
from dlray.models import FAMILIES
from dlray.optim import build_optimizer
from dlray.precision import PRECISION_DTYPES

TRAIN_JOB = "jobs/cnn_digits.yaml"
TRAIN_EPOCHS = 4  # the first is warm-up and is not counted


def bench_train(job: str = TRAIN_JOB, overrides: tuple[str, ...] = (), worker_counts: tuple[int, ...] = (1, 2)) -> dict:
    import ray

    from dlray import reports
    from dlray.local_cluster import init_ray
    from dlray.runfiles import read_history
    from dlray.train import fit, run_dir

    init_ray()
    storage = tempfile.mkdtemp(prefix="dlray-bench-")
    # Whole epochs, validated and checkpointed at their ends only (a job's own step budget would end them early).
    epochs = [f"train.num_epochs={TRAIN_EPOCHS}", "train.max_steps=null", "train.val_every_n_steps=null", "train.checkpoint_every_n_steps=null"]
    common = [*overrides, f"run.storage_path={storage}", *epochs, "train.early_stopping_patience=null", "run.checkpoint_num_to_keep=1"]
    cfg = load_config(job, common)
    # The baseline runs in a 1-CPU Ray task: the same process environment a Train worker gets.
    plain_task = ray.remote(num_cpus=1)(plain_pytorch_samples_per_sec)
    plain, dlray = 0.0, dict.fromkeys(worker_counts, 0.0)
    for attempt in range(2):  # interleaved, best of two: a busy 2-core machine is noisy
        plain = max(plain, ray.get(plain_task.remote(cfg)))
        for workers in worker_counts:
            run_cfg = load_config(job, [*common, f"scaling.num_workers={workers}", f"run.name=bench-{workers}w-{attempt}"])
            fit(run_cfg)
            epochs = reports.epochs(read_history(run_dir(run_cfg)))[1:]
            dlray[workers] = max(dlray[workers], statistics.mean(r["samples_per_sec"] for r in epochs))
    results = {
        "model": f"{cfg.model.family}/{cfg.model.flavor}, {cfg.precision}",
        "micro_batch_size": cfg.train.micro_batch_size,
        "plain_pytorch_samples_per_sec": plain,
        "dlray_1_worker_samples_per_sec": dlray[1],
        "ratio_1_worker_vs_plain": dlray[1] / plain,
    }
    if 2 in dlray:
        results |= {"dlray_2_workers_samples_per_sec": dlray[2], "scaling_2_vs_1_workers": dlray[2] / dlray[1]}
    return results


def plain_pytorch_samples_per_sec(cfg) -> float:
    """The loop a PyTorch (or diffusers, or transformers) user would write: one process, one thread (as a 1-CPU
    Ray worker gets), the job's precision through torch.autocast."""
    with one_thread():
        torch.manual_seed(cfg.train.seed)
        data = build_data(cfg.data, seed=cfg.train.seed)
        family = FAMILIES[cfg.model.family]
        model = family.build(cfg.model.model_dump(), data.info)
        optimizer = build_optimizer(cfg.optim, model.parameters())
        loader = torch.utils.data.DataLoader(data.train, cfg.train.micro_batch_size, shuffle=True)
        plain_loss = PLAIN_LOSSES[cfg.model.family]
        dtype = PRECISION_DTYPES[precision.resolve(cfg.precision, torch.device("cpu"), cfg.strategy.name)]
        rates = []
        for _ in range(TRAIN_EPOCHS):
            model.train()
            start, seen = time.perf_counter(), 0
            for inputs, labels in loader:
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = plain_loss(model, inputs, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                seen += len(labels)
            rates.append(seen / (time.perf_counter() - start))
        return statistics.mean(rates[1:])


def _cross_entropy(model, images, labels):
    return torch.nn.functional.cross_entropy(model(images), labels)


def _diffusers_loss(model, images, labels):
    """diffusers' train_unconditional.py step, on the same UNet and noise schedule."""
    clean = images * 2 - 1
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (len(clean),))
    predicted = model.unet(model.noise_scheduler.add_noise(clean, noise, timesteps), timesteps).sample
    return torch.nn.functional.mse_loss(predicted.float(), noise)


def _next_token_loss(model, input_ids, labels):
    """A transformers causal LM trained on windows whose labels are already shifted (dlray.data.text):
    every position's logits against the next token."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


PLAIN_LOSSES = {"cnn": _cross_entropy, "diffusion": _diffusers_loss, "gpt": _next_token_loss}


def bench_memory() -> dict:
    cases = {"ddp": {"name": "ddp"}, "fsdp": {"name": "fsdp"}, "zero3": {"name": "deepspeed", "zero_stage": 3}}
    measured = state_bytes_per_rank([{"model": {"flavor": "resnet18"}, "strategy": strategy, "precision": "fp32"} for strategy in cases.values()])
    per_rank = {label: max(ranks) for label, ranks in zip(cases, measured)}
    return {
        "model": "cnn/resnet18 (11.2M parameters), AdamW, fp32, 2 ranks",
        "bytes_per_rank": per_rank,
        "fsdp_vs_ddp": per_rank["fsdp"] / per_rank["ddp"],
        "zero3_vs_ddp": per_rank["zero3"] / per_rank["ddp"],
    }


def state_bytes_per_rank(configs: list[dict], world: int = 2) -> list[list[int]]:
    """For each cnn job config (as a dict, on 8 px digits): each rank's bytes of parameters, master weights
    and optimizer state after one step, in `world` processes of a plain gloo group (Ray adds nothing to
    what is measured). dlray.plan's state bytes are checked against these."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_memory_worker, args=(world, free_port(), configs, queue), nprocs=world, join=True)
    by_rank = dict(queue.get() for _ in range(world))
    return [[by_rank[rank][case] for rank in range(world)] for case in range(len(configs))]


def _memory_worker(rank: int, world: int, port: int, configs: list[dict], queue) -> None:
    import torch.distributed as dist

    from dlray.config import config_from_dict
    from dlray.strategies import STRATEGIES

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    dist.init_process_group("gloo")
    family = FAMILIES["cnn"]
    info = {"image_shape": (1, 8, 8), "class_names": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25]}
    measured = []
    for config in configs:
        cfg = config_from_dict(config)
        runner = STRATEGIES[cfg.strategy.name](cfg, torch.device("cpu"), family.shard_classes())
        model, (optimizer,) = runner.prepare(family.build(cfg.model.model_dump(), info), lambda module: [build_optimizer(cfg.optim, module.parameters())])
        batch = (torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
        loss = family.compute_loss(model, batch)["loss"].mean()  # one step, so the optimizer state exists
        runner.backward(loss, sync=True)
        runner.step()
        measured.append(_local_state_bytes(model, optimizer))
    queue.put((rank, measured))
    dist.destroy_process_group()
    # Several DeepSpeed engines in one process leave C++ threads that now and then abort the interpreter's
    # teardown ("terminate called without an active exception"), after the results are in the queue.
    os._exit(0)


def _local_state_bytes(model, optimizer) -> int:
    """Bytes of parameters, master weights and optimizer state this rank holds (shared storage counted once)."""
    from torch.distributed.tensor import DTensor

    tensors = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in model.parameters()]  # ZeRO-3 keeps only this rank's partition
    tensors += [p for group in optimizer.param_groups for p in group["params"]]
    tensors += list(optimizer.state)  # the stepped tensors: ZeRO-3 keeps its fp32 partitions out of param_groups
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value) and value.numel() > 1]
    return unique_bytes(t.to_local() if isinstance(t, DTensor) else t for t in tensors)
