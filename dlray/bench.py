"""Benchmarks, side by side in one run, against plain PyTorch and unbatched baselines.

    dlray bench all        # or: train | cluster | tune | serve | diffusion | llm; writes benchmarks/results.md and .json
    dlray bench llm_train  # or any one benchmark by its key in BENCHMARKS

train   dlray (Ray Train, 1 worker) samples/s / a plain PyTorch loop on the same model, data and
        batch size; 2 workers / 1 worker; per-rank parameter+optimizer bytes of FSDP and ZeRO-3
        / DDP with 2 ranks (plain gloo process group: Ray adds nothing to what is measured).
cluster time from `ray job submit` to the first optimizer step, and samples/s of the same 2-worker
        job with its ranks on 2 nodes / on 1 node, on a cluster/local.sh cluster (head + 1 worker node).
tune    ASHA vs FIFO random search (same space, same sampler seed, 3 seeds): epochs trained until a
        trial first reaches TUNE_TARGET validation accuracy; and Tune's overhead: a FIFO sweep of
        TUNE_OVERHEAD_TRIALS identical trials, one at a time, over that many standalone runs.
serve   @serve.batch (max_batch_size 32) / unbatched (max_batch_size 1) requests/s at 32
        concurrent HTTP clients, with p50/p99 latency.
diffusion  jobs/diffusion_digits.yaml: dlray (1 worker) images/s / the plain diffusers training
        loop on the same UNet; DDPM-1000 vs DDIM-50 sampling latency; the images endpoint's
        images/s batched / unbatched at 16 concurrent clients.
llm     jobs/gpt_pretrain.yaml's gpt/debug and gpt/small: dlray (1 worker) tokens/s / a plain
        PyTorch + transformers loop on the same Llama, data, batch and precision; QLoRA (NF4, double quantisation) bytes of
        the quantised linears / bf16, quantisation state included; generation tokens/s, the engine
        alone with 16 sequences batched / one at a time, and the generate endpoint's at 1 and 16
        streaming clients with the time to first token; on a GPU, the MFU of gpt/1b training.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from dlray import precision
from dlray.config import load_config
from dlray.data import build_data
from dlray.local_cluster import RAY, free_port, local_cluster
from dlray.models import FAMILIES
from dlray.optim import build_optimizer
from dlray.precision import PRECISION_DTYPES

TRAIN_JOB = "jobs/cnn_digits.yaml"
DIFFUSION_JOB = "jobs/diffusion_digits.yaml"
IMAGE_CLIENTS, IMAGE_REQUESTS, IMAGE_STEPS = 16, 96, 20
TRAIN_JOB_DEBUG = "jobs/debug/cnn_cpu.yaml"
TRAIN_EPOCHS = 4  # the first is warm-up and is not counted
CLUSTER_EPOCHS = 6  # more than TRAIN_EPOCHS: a 2-core machine's epoch-to-epoch noise averages out
SERVE_CLIENTS, SERVE_REQUESTS = 32, 384
SWEEP_JOB = "jobs/sweep_cnn_asha.yaml"
TUNE_SEEDS, TUNE_SAMPLES, TUNE_EPOCHS, TUNE_TARGET = (0, 1, 2), 5, 5, 0.90
TUNE_OVERHEAD_TRIALS = 4
GPT_JOB = "jobs/gpt_pretrain.yaml"
# flavor -> characters of the bundled help texts it trains on (None: all ~0.5 MB). `small` takes
# about 4 s a step on one CPU thread: the whole corpus would keep its dlray and plain runs over an
# hour, its first 48 KB (~85 training windows, 5 steps an epoch) about a minute and a half each.
GPT_TRAIN_FLAVORS = {"debug": None, "small": 48_000}
QLORA_FLAVOR, QLORA_VOCAB = "base", 32000  # 110M parameters, GPT-2 small's body with a Llama-sized vocabulary
GEN_STREAMS, GEN_ROUNDS, GEN_MAX_TOKENS = (1, 16), 4, 64
MFU_FLAVOR, MFU_BATCH, MFU_SEQ_LEN, MFU_VOCAB, MFU_STEPS = "1b", 4, 2048, 32000, 10


def run_benchmarks(what: str, out: Path) -> dict:
    """Run a group of BENCHMARKS, one benchmark of a group (by its key, e.g. llm_train) or all, and
    rewrite `out` with these results beside the earlier ones of the others."""
    selected = {key: bench for name, benchmarks in BENCHMARKS.items() for key, bench in benchmarks.items() if what in ("all", name, key)}
    if not selected:
        keys = [key for benchmarks in BENCHMARKS.values() for key in benchmarks]
        raise ValueError(f"bench target must be all, a group ({', '.join(BENCHMARKS)}) or one benchmark ({', '.join(keys)}), got {what!r}")
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    results["machine"] = machine()
    for key, bench in selected.items():
        results[key] = bench()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.write_text(render_markdown(results))
    print(out.read_text())
    return results


# --------------------------------------------------------------------------------- training


def bench_train(job: str = TRAIN_JOB, overrides: tuple[str, ...] = (), worker_counts: tuple[int, ...] = (1, 2)) -> dict:
    import ray

    from dlray.tracking import read_history
    from dlray.train import fit, init_ray, run_dir

    init_ray()
    storage = tempfile.mkdtemp(prefix="dlray-bench-")
    common = [*overrides, f"run.storage_path={storage}", f"train.num_epochs={TRAIN_EPOCHS}", "train.early_stopping_patience=null", "run.checkpoint_num_to_keep=1"]
    cfg = load_config(job, common)
    # The baseline runs in a 1-CPU Ray task: the same process environment a Train worker gets.
    plain_task = ray.remote(num_cpus=1)(plain_pytorch_samples_per_sec)
    plain, dlray = 0.0, dict.fromkeys(worker_counts, 0.0)
    for attempt in range(2):  # interleaved, best of two: a busy 2-core machine is noisy
        plain = max(plain, ray.get(plain_task.remote(cfg)))
        for workers in worker_counts:
            run_cfg = load_config(job, [*common, f"scaling.num_workers={workers}", f"run.name=bench-{workers}w-{attempt}"])
            fit(run_cfg)
            epochs = [r for r in read_history(run_dir(run_cfg)) if "train_loss" in r][1:]
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
    with _one_thread():
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


@contextmanager
def _one_thread():
    """One intra-op thread, as a 1-CPU Ray worker or a serving replica computes; and steady on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    import torch.multiprocessing as mp

    cases = {"ddp": {"name": "ddp"}, "fsdp": {"name": "fsdp"}, "zero3": {"name": "deepspeed", "zero_stage": 3}}
    per_rank = {}
    for label, strategy in cases.items():
        queue = mp.get_context("spawn").SimpleQueue()
        port = free_port()
        mp.spawn(_memory_worker, args=(2, port, strategy, queue), nprocs=2, join=True)
        per_rank[label] = max(queue.get() for _ in range(2))
    return {
        "model": "cnn/resnet18 (11.2M parameters), AdamW, fp32, 2 ranks",
        "bytes_per_rank": per_rank,
        "fsdp_vs_ddp": per_rank["fsdp"] / per_rank["ddp"],
        "zero3_vs_ddp": per_rank["zero3"] / per_rank["ddp"],
    }


def _memory_worker(rank: int, world: int, port: int, strategy: dict, queue) -> None:
    import torch.distributed as dist

    from dlray.config import config_from_dict
    from dlray.strategies import STRATEGIES

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    dist.init_process_group("gloo")
    cfg = config_from_dict({"model": {"flavor": "resnet18"}, "strategy": strategy})
    family = FAMILIES["cnn"]
    info = {"image_shape": (1, 8, 8), "class_names": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25]}
    runner = STRATEGIES[cfg.strategy.name](cfg, torch.device("cpu"), family.shard_classes())
    model, (optimizer,) = runner.prepare(family.build(cfg.model.model_dump(), info), lambda module: [build_optimizer(cfg.optim, module.parameters())])
    batch = (torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    loss = family.compute_loss(model, batch)["loss"].mean()  # one step, so the optimizer state exists
    runner.backward(loss, sync=True)
    runner.step()
    queue.put(_local_state_bytes(model, optimizer))
    dist.destroy_process_group()


def _local_state_bytes(model, optimizer) -> int:
    """Bytes of parameters, master weights and optimizer state this rank holds (shared storage counted once)."""
    from torch.distributed.tensor import DTensor

    tensors = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in model.parameters()]  # ZeRO-3 keeps only this rank's partition
    tensors += [p for group in optimizer.param_groups for p in group["params"]]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value) and value.numel() > 1]
    return _unique_bytes(t.to_local() if isinstance(t, DTensor) else t for t in tensors)


def _unique_bytes(tensors) -> int:
    """Bytes of `tensors`, each storage counted once (tied weights, parameters the optimizer also lists, shared tables)."""
    seen, total = set(), 0
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.numel())
        if tensor.numel() and key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


# ---------------------------------------------------------------------------------- cluster


def bench_cluster() -> dict:
    from dlray.tracking import read_history

    storage = tempfile.mkdtemp(prefix="dlray-bench-")
    placements = {"1_node": ("STRICT_PACK", 1), "2_nodes": ("STRICT_SPREAD", 2)}
    first_step: dict[str, list[float]] = {label: [] for label in placements}
    rates = {label: 0.0 for label in placements}
    # Head + 1 worker node, 2 CPUs each: the 2-worker job fits on one node or spreads over two.
    with local_cluster(worker_nodes=1, cpus_per_node=2, port_base=25000) as cluster:
        for attempt in range(2):  # interleaved, best of two, as in bench_train
            for label, (placement, nodes) in placements.items():
                name = f"bench-{label}-{attempt}"
                command = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--", "dlray", "train", TRAIN_JOB,
                           f"run.storage_path={storage}", f"run.name={name}", f"train.num_epochs={CLUSTER_EPOCHS}", "train.early_stopping_patience=null",
                           "scaling.num_workers=2", f"scaling.placement_strategy={placement}"]
                submitted_at = time.time()
                done = subprocess.run(command, env=cluster.client_env(), capture_output=True, text=True, timeout=1200)
                if done.returncode:
                    raise RuntimeError(f"benchmark job {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                epochs = [r for r in read_history(Path(storage) / name) if "train_loss" in r]
                first_step[label].append(epochs[0]["first_step_unix_time"] - submitted_at)
                if epochs[0]["num_nodes"] != nodes:
                    raise RuntimeError(f"benchmark job {name} ran on {epochs[0]['num_nodes']} node(s), not {nodes}")
                rates[label] = max(rates[label], statistics.mean(r["samples_per_sec"] for r in epochs[1:]))
    return {
        "model": f"cnn/{load_config(TRAIN_JOB).model.flavor}, 2 workers",
        "submit_to_first_step_s": first_step,
        "samples_per_sec": rates,
        "2_nodes_vs_1_node": rates["2_nodes"] / rates["1_node"],
    }


# ------------------------------------------------------------------------------------- tune


def bench_tune() -> dict:
    """Trials run one at a time, so "epochs until the target" has one meaning: the epochs of every
    trial before the first to reach it, plus that trial's own."""
    from dlray.train import fit, init_ray
    from dlray.tune import epoch_history, run_sweep

    init_ray()
    storage = tempfile.mkdtemp(prefix="dlray-bench-tune-")
    space = {"optim.lr": {"loguniform": [1e-5, 0.3]}, "model.dropout": {"uniform": [0.0, 0.3]}}
    common = [f"run.storage_path={storage}", "scaling.num_workers=1", f"train.num_epochs={TUNE_EPOCHS}"]
    search = {}
    for scheduler in ("fifo", "asha"):
        for seed in TUNE_SEEDS:
            tune = {"num_samples": TUNE_SAMPLES, "max_concurrent_trials": 1, "scheduler": {"name": scheduler},
                    "search_alg": {"name": "random", "seed": seed}, "search_space": space}
            grid = run_sweep(_sweep_config(tune, [*common, f"run.name={scheduler}-{seed}"]))
            trials = sorted(grid, key=lambda r: r.metrics.get("trial_id", ""))  # creation order = run order
            histories = [[r["val_accuracy"] for r in epoch_history(t)] for t in trials]
            search.setdefault(scheduler, []).append({"seed": seed, "epochs_to_target": _epochs_to_target(histories), "total_epochs": sum(map(len, histories)),
                                                     "best_val_accuracy": max((max(h) for h in histories if h), default=0.0)})

    # Overhead: the same fixed-length run standalone and as every trial of a FIFO sweep.
    fixed = [*common, "train.num_epochs=3", "train.early_stopping_patience=null"]
    start = time.perf_counter()
    fit(load_config(TRAIN_JOB_DEBUG, [*fixed, "run.name=standalone"]))
    standalone_s = time.perf_counter() - start
    tune = {"num_samples": TUNE_OVERHEAD_TRIALS, "max_concurrent_trials": 1, "scheduler": {"name": "fifo"},
            "search_alg": {"name": "grid"}, "search_space": {"optim.lr": {"choice": [0.01]}}}
    start = time.perf_counter()
    run_sweep(_sweep_config(tune, [*fixed, "run.name=overhead"]))
    sweep_s = time.perf_counter() - start
    ratio = lambda key: statistics.mean(r[key] for r in search["asha"]) / statistics.mean(r[key] for r in search["fifo"])  # noqa: E731
    return {
        "space": space, "num_samples": TUNE_SAMPLES, "epochs_per_trial": TUNE_EPOCHS, "target_val_accuracy": TUNE_TARGET,
        "search": search,
        "asha_vs_fifo_epochs_to_target": ratio("epochs_to_target"),
        "asha_vs_fifo_total_epochs": ratio("total_epochs"),
        "overhead_trials": TUNE_OVERHEAD_TRIALS, "standalone_run_s": standalone_s, "sweep_s": sweep_s,
        "tune_overhead": sweep_s / (TUNE_OVERHEAD_TRIALS * standalone_s),
    }


def _sweep_config(tune: dict, overrides: list[str]):
    import yaml

    from dlray.config import config_from_dict, set_dotted

    job = yaml.safe_load(Path(SWEEP_JOB).read_text()) | {"tune": tune}
    for item in overrides:
        key, _, value = item.partition("=")
        set_dotted(job, key, yaml.safe_load(value))
    return config_from_dict(job)


def _epochs_to_target(histories: list[list[float]]) -> int:
    """Epochs trained, in run order, until some trial's validation accuracy first reaches the
    target (all of them when none does: the sweep's whole cost bought nothing better)."""
    spent = 0
    for history in histories:
        for accuracy in history:
            spent += 1
            if accuracy >= TUNE_TARGET:
                return spent
    return spent


# ---------------------------------------------------------------------------------- serving


def bench_serve() -> dict:
    from ray import serve

    from dlray.export import write_artifact
    from dlray.serve.app import run
    from dlray.train import init_ray

    init_ray()
    # A model whose forward pass costs something (ResNet-18 on 32x32 RGB): batching pays off when
    # compute, not HTTP, dominates. Untrained weights serve as well as trained ones for timing.
    info = {"image_shape": [3, 32, 32], "class_names": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3}
    model_cfg = {"family": "cnn", "flavor": "resnet18", "dropout": 0.0}
    artifact = write_artifact(FAMILIES["cnn"].build(model_cfg, info), {"task": "classify", "model": model_cfg, "data_info": info, "serve": {}},
                              tempfile.mkdtemp(prefix="dlray-bench-artifact-"))
    payload = _png(torch.rand(3, 32, 32))
    port = free_port()
    results = {"model": "cnn/resnet18, 3x32x32 PNG requests", "concurrent_clients": SERVE_CLIENTS, "requests": SERVE_REQUESTS}
    for label, batch in (("unbatched", 1), ("batched", 32)):
        run(str(artifact), {"port": port, "max_batch_size": batch, "batch_wait_timeout_s": 0.01})
        asyncio.run(_load(f"http://127.0.0.1:{port}/v1/classify", payload, SERVE_CLIENTS, 2 * SERVE_CLIENTS))  # warm-up
        results[label] = asyncio.run(_load(f"http://127.0.0.1:{port}/v1/classify", payload, SERVE_CLIENTS, SERVE_REQUESTS))
        serve.delete("dlray")
    results["batched_vs_unbatched_throughput"] = results["batched"]["requests_per_sec"] / results["unbatched"]["requests_per_sec"]
    return results


async def _load(url: str, payload: bytes, clients: int, total: int, content_type: str = "image/png") -> dict:
    latencies: list[float] = []

    async def request(session, index: int):
        start = time.perf_counter()
        response = await session.post(url, content=payload, headers={"content-type": content_type})
        response.raise_for_status()
        latencies.append(time.perf_counter() - start)

    elapsed = await _drive(clients, total, request)
    latencies.sort()
    return {
        "requests_per_sec": total / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


async def _drive(clients: int, total: int, request) -> float:
    """Seconds `clients` concurrent HTTP clients take to make `total` calls of `request(session, index)` between them."""
    import httpx

    remaining = iter(range(total))

    async def client(session):
        for index in remaining:
            await request(session, index)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return time.perf_counter() - start


def _png(image: torch.Tensor) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------- diffusion


def bench_sampling() -> dict:
    """DDPM with every one of 1,000 steps vs DDIM with 50, same UNet, one image, one process."""
    cfg = load_config(DIFFUSION_JOB)
    model = _untrained(cfg, _data_info(cfg)).eval()
    seconds = {}
    with _one_thread():
        for scheduler, steps in (("ddim", 50), ("ddpm", 1000)):
            start = time.perf_counter()
            FAMILIES["diffusion"].sample(model, [torch.Generator().manual_seed(0)], num_inference_steps=steps, scheduler=scheduler)
            seconds[f"{scheduler}_{steps}_s"] = time.perf_counter() - start
    return {"model": f"diffusion/{cfg.model.flavor} 16x16, 1 image, 1 thread", **seconds,
            "ddim_50_speedup_vs_ddpm_1000": seconds["ddpm_1000_s"] / seconds["ddim_50_s"]}


def bench_image_serve() -> dict:
    """Images/s of the images endpoint at IMAGE_CLIENTS concurrent clients, each asking for one
    DDIM-IMAGE_STEPS image: @serve.batch up to 16 requests per denoising loop vs one at a time."""
    from ray import serve

    from dlray.export import write_artifact
    from dlray.serve.app import run
    from dlray.train import init_ray

    init_ray()
    cfg = load_config(DIFFUSION_JOB)
    info = _data_info(cfg)
    artifact = write_artifact(_untrained(cfg, info), {"task": "images", "model": cfg.model.model_dump(), "data_info": info, "serve": {}},
                              tempfile.mkdtemp(prefix="dlray-bench-artifact-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    body = json.dumps({"num_inference_steps": IMAGE_STEPS, "scheduler": "ddim", "seed": 0}).encode()
    results = {"model": f"diffusion/{cfg.model.flavor} 16x16, DDIM {IMAGE_STEPS} steps, 1 image per request", "concurrent_clients": IMAGE_CLIENTS, "requests": IMAGE_REQUESTS}
    for label, batch in (("unbatched", 1), ("batched", 16)):
        run(str(artifact), {"port": port, "max_batch_size": batch, "batch_wait_timeout_s": 0.01})
        asyncio.run(_load(url, body, IMAGE_CLIENTS, IMAGE_CLIENTS, "application/json"))  # warm-up
        results[label] = asyncio.run(_load(url, body, IMAGE_CLIENTS, IMAGE_REQUESTS, "application/json"))
        serve.delete("dlray")
    results["batched_vs_unbatched_throughput"] = results["batched"]["requests_per_sec"] / results["unbatched"]["requests_per_sec"]
    return results


def _data_info(cfg) -> dict:
    return build_data(cfg.data, seed=cfg.train.seed).info


def _untrained(cfg, data_info: dict):
    """Timing needs the model's shape, not trained weights."""
    torch.manual_seed(0)
    return FAMILIES[cfg.model.family].build(cfg.model.model_dump(), data_info)


# ----------------------------------------------------------------------------- language models


def bench_gpt_train() -> dict:
    """bench_train on GPT_JOB for each of GPT_TRAIN_FLAVORS, 1 worker, against the plain PyTorch +
    transformers loop (PLAIN_LOSSES["gpt"]). Tokens/s are samples/s x max_seq_len for both: every
    window is max_seq_len tokens, which is how the gpt family's tokens_per_sec counts them."""
    from dlray.data.text import bundled_documents

    seq_len = load_config(GPT_JOB).data.max_seq_len
    results = {}
    for flavor, chars in GPT_TRAIN_FLAVORS.items():
        overrides = [f"model.flavor={flavor}"]
        if chars:
            corpus = Path(tempfile.mkdtemp(prefix="dlray-bench-corpus-"), "help.txt")
            corpus.write_text("\n\n".join(bundled_documents())[:chars])
            overrides.append(f"data.path={corpus}")
        results[flavor] = bench_train(GPT_JOB, tuple(overrides), worker_counts=(1,)) | {"max_seq_len": seq_len, "corpus_chars": chars}
    return results


def bench_qlora_memory(flavor: str = QLORA_FLAVOR) -> dict:
    """Bytes of the linears QLoRA quantises (every decoder linear; the output layer stays as it is)
    loaded in 4 bits by dlray.finetune.load_options / loaded in bf16. The 4-bit side counts the packed
    weights and every tensor of their quantisation state: an absmax per 64 weights, itself quantised
    to 8 bits under a float32 absmax per 256 of them (double quantisation), and the lookup tables.
    No Ray; bitsandbytes quantises on the CPU as on a GPU."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from dlray.config import FinetuneConfig
    from dlray.finetune import load_options

    info = {"vocab_size": QLORA_VOCAB, "max_seq_len": 2048, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="dlray-bench-qlora-") as directory:
        FAMILIES["gpt"].build({"flavor": flavor, "dropout": 0.0}, info).to(torch.bfloat16).save_pretrained(directory)
        bf16 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
        qlora = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, **load_options(FinetuneConfig(finetuning_type="qlora"), "bf16", FAMILIES["gpt"]))
        quantised = {name: module for name, module in qlora.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
        states = [t for module in quantised.values() for t in _quant_state_tensors(module.weight.quant_state)]
        linears = {"bf16": _unique_bytes(bf16.get_submodule(name).weight for name in quantised),
                   "qlora": _unique_bytes([*(module.weight for module in quantised.values()), *states])}
        models = {"bf16": _unique_bytes(bf16.parameters()), "qlora": _unique_bytes([*qlora.parameters(), *states])}
        params = sum(bf16.get_submodule(name).weight.numel() for name in quantised)
        total = bf16.num_parameters()
    return {
        "model": f"gpt/{flavor} ({total / 1e6:.0f}M parameters, {QLORA_VOCAB}-token vocabulary), NF4 + double quantisation",
        "quantised_linears": len(quantised), "quantised_parameters": params,
        "linear_bytes": linears, "qlora_vs_bf16": linears["qlora"] / linears["bf16"], "bits_per_param": 8 * linears["qlora"] / params,
        "model_bytes": models, "model_qlora_vs_bf16": models["qlora"] / models["bf16"],
    }


def _quant_state_tensors(state):
    """Every tensor of a bitsandbytes QuantState, its nested state's included."""
    from bitsandbytes.functional import QuantState

    for value in vars(state).values():
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, QuantState):
            yield from _quant_state_tensors(value)


def bench_generate_engine() -> dict:
    """dlray.serve.engine alone, no Ray or HTTP: GEN_STREAMS[-1] greedy completions decoded as one
    batch / one after another, on one thread as a replica decodes."""
    from dlray.serve.engine import Engine

    artifact, model = _gpt_artifact()
    engine = Engine.from_pretrained(artifact)
    prompts = _prompts(GEN_STREAMS[-1])
    rates = {}
    with _one_thread():
        _decode(engine, prompts)  # warm-up
        for label, groups in (("one_at_a_time", [[p] for p in prompts]), ("batched", [prompts])):
            start = time.perf_counter()
            tokens = sum(_decode(engine, group) for group in groups)
            rates[label] = tokens / (time.perf_counter() - start)
    return {"model": model, "sequences": len(prompts), "tokens_per_sec": rates, "batched_vs_one_at_a_time": rates["batched"] / rates["one_at_a_time"]}


def _decode(engine, prompts: list[str]) -> int:
    """Tokens the engine generates for `prompts` decoded together: GEN_MAX_TOKENS each, unless a
    (random) model writes EOS first."""
    from dlray.serve.engine import SamplingParams, Sequence

    sequences = [Sequence(engine.tokenizer.encode(p), SamplingParams(max_tokens=GEN_MAX_TOKENS, temperature=0)) for p in prompts]
    for _ in engine.generate(sequences):
        pass
    return sum(len(s.token_ids) for s in sequences)


def bench_generate_serve() -> dict:
    """Tokens/s of the generate endpoint, streaming /v1/completions over HTTP, at each of GEN_STREAMS
    concurrent clients (GEN_ROUNDS requests each), and the time to first token; one replica with
    the default serve settings, so @serve.batch decodes up to 32 streams together."""
    from ray import serve

    from dlray.serve.app import run
    from dlray.train import init_ray

    init_ray()
    artifact, model = _gpt_artifact()
    serve.shutdown()  # Serve keeps the HTTP port it first started on; this deployment picks its own
    port = free_port()
    run(artifact, {"port": port, "chat": False})  # the trained tokenizer has no chat template
    url, prompts = f"http://127.0.0.1:{port}/v1/completions", _prompts(GEN_STREAMS[-1])
    results = {"model": model, "requests_per_client": GEN_ROUNDS, "streams": {}}
    for streams in GEN_STREAMS:
        asyncio.run(_stream_load(url, prompts, streams, streams))  # warm-up
        results["streams"][str(streams)] = asyncio.run(_stream_load(url, prompts, streams, GEN_ROUNDS * streams))
    serve.delete("dlray")
    rates = [results["streams"][str(n)]["tokens_per_sec"] for n in (GEN_STREAMS[-1], GEN_STREAMS[0])]
    results["most_vs_fewest_streams_tokens_per_sec"] = rates[0] / rates[1]
    return results


async def _stream_load(url: str, prompts: list[str], clients: int, total: int) -> dict:
    ttfts, tokens = [], []

    async def request(session, index: int):
        body = {"prompt": prompts[index % len(prompts)], "max_tokens": GEN_MAX_TOKENS, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        async with session.stream("POST", url, json=body) as response:
            response.raise_for_status()
            first, usage = await _read_events(response.aiter_lines())
        ttfts.append(first - start)
        tokens.append(usage["completion_tokens"])

    elapsed = await _drive(clients, total, request)
    return {"tokens_per_sec": sum(tokens) / elapsed, "ttft_p50_ms": 1000 * statistics.median(ttfts), "completion_tokens": sum(tokens)}


async def _read_events(lines) -> tuple[float, dict]:
    """When (time.perf_counter) the first chunk with a choice arrived, and the usage, of an OpenAI
    completion stream of server-sent events. The server sends a choice once it has text, so that
    first chunk is the first token as a client sees it."""
    first = usage = None
    async for line in lines:
        if not line.startswith("data:"):
            continue  # the blank line between events
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if first is None and chunk["choices"]:
            first = time.perf_counter()
        usage = chunk.get("usage") or usage
    if first is None or usage is None:
        raise RuntimeError(f"the stream ended without {'a choice' if first is None else 'usage (stream_options.include_usage)'}")
    return first, usage


def _gpt_artifact() -> tuple[str, str]:
    """GPT_JOB's model, untrained, with its tokenizer, laid out as `dlray export` writes a language
    model; and a description for the results."""
    from dlray.export import write_artifact

    cfg = load_config(GPT_JOB)
    data = build_data(cfg.data, seed=cfg.train.seed)
    artifact = write_artifact(_untrained(cfg, data.info), {"task": "generate", "model": cfg.model.model_dump(), "data_info": data.info, "serve": {}},
                              tempfile.mkdtemp(prefix="dlray-bench-artifact-"))
    data.tokenizer.save_pretrained(artifact)
    return str(artifact), f"gpt/{cfg.model.flavor} untrained, greedy, {GEN_MAX_TOKENS} tokens per completion"


def _prompts(count: int) -> list[str]:
    """Prompts of different lengths from the text the tokenizer learnt: the first words of Python's
    help topics (not their underlines of asterisks)."""
    from dlray.data.text import bundled_documents

    words = [[word for word in document.split() if any(c.isalpha() for c in word)] for document in bundled_documents()[:count]]
    return [" ".join(topic[:4 + i % 8]) for i, topic in enumerate(words)]


def bench_gpt_mfu() -> dict:
    """MFU of gpt/1b (TinyLlama-1.1B's shape) bf16 training on one GPU, side by side: the plain loop a
    PyTorch user writes (eager, then torch.compile), on random tokens in one process, and `dlray train`
    (Ray, FSDP2, train.compile, sdpa attention) on the bundled help texts, its last epoch's `mfu`."""
    if not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    hardware = precision.detect(torch.device("cuda"))
    plain = {}
    for mode in ("eager", "compiled"):
        plain[f"plain_{mode}"] = plain_gpt_tokens_per_sec(compiled=mode == "compiled")
        torch.cuda.empty_cache()  # the model and optimizer state of this run, for the next
    dlray = dlray_gpt_mfu()  # in a Ray worker of its own
    results = {"model": f"gpt/{MFU_FLAVOR}, bf16, AdamW (fused), batch {MFU_BATCH} x {MFU_SEQ_LEN} tokens", "gpu": hardware.name,
               "peak_flops": hardware.peak_flops, **{f"{k}_tokens_per_sec": v for k, v in plain.items()}, **dlray}
    if hardware.peak_flops:
        flops = plain_gpt_flops_per_token()
        results |= {f"{k}_mfu": v * flops / hardware.peak_flops for k, v in plain.items()}
        results["mfu"] = dlray["dlray_mfu"]
        results["dlray_vs_compiled_plain"] = dlray["dlray_mfu"] / results["plain_compiled_mfu"]
    return results


def _mfu_model():
    info = {"vocab_size": MFU_VOCAB, "max_seq_len": MFU_SEQ_LEN, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return FAMILIES["gpt"].build({"flavor": MFU_FLAVOR, "dropout": 0.0}, info)


def plain_gpt_flops_per_token() -> float:
    with torch.device("meta"):
        return FAMILIES["gpt"].flops_per_token(_mfu_model(), MFU_SEQ_LEN)


def plain_gpt_tokens_per_sec(compiled: bool) -> float:
    gpt = FAMILIES["gpt"]
    torch.manual_seed(0)
    model = _mfu_model().cuda().train()
    if compiled:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    windows = torch.randint(MFU_VOCAB, (MFU_BATCH, MFU_SEQ_LEN + 1), device="cuda")
    batch = (windows[:, :-1], windows[:, 1:])

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = gpt.compute_loss(model, batch)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # compilation, kernel selection, the optimizer's state
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(MFU_STEPS):
        step()
    torch.cuda.synchronize()
    return MFU_STEPS * MFU_BATCH * MFU_SEQ_LEN / (time.perf_counter() - start)


def dlray_gpt_mfu() -> dict:
    """`dlray train` of the same model on one GPU worker; the first epoch includes compilation, so the last one counts."""
    from dlray.tracking import read_history
    from dlray.train import fit, init_ray, run_dir

    init_ray()
    cfg = load_config(None, ["model.family=gpt", f"model.flavor={MFU_FLAVOR}", "model.dropout=0.0", "data.name=text", f"data.max_seq_len={MFU_SEQ_LEN}",
                             f"data.vocab_size={MFU_VOCAB}", "data.val_fraction=0.05", "data.test_fraction=0.0", "strategy.name=fsdp", "precision=bf16",
                             "train.compile=true", "train.num_epochs=3", f"train.micro_batch_size={MFU_BATCH}", "scaling.num_workers=1",
                             "scaling.use_gpu=true", f"run.storage_path={tempfile.mkdtemp(prefix='dlray-bench-mfu-')}", "run.name=mfu",
                             "run.checkpoint_num_to_keep=1"])
    result = fit(cfg)
    if result.error:
        raise RuntimeError(f"dlray train of gpt/{MFU_FLAVOR} failed: {result.error}")
    last = [r for r in read_history(run_dir(cfg)) if "train_loss" in r][-1]
    return {"dlray_tokens_per_sec": last["tokens_per_sec"], "dlray_mfu": last.get("mfu")}


# Targets of `dlray bench`: each names the result keys it fills.
BENCHMARKS = {
    "train": {"train": bench_train, "memory": bench_memory},
    "cluster": {"cluster": bench_cluster},
    "tune": {"tune": bench_tune},
    "serve": {"serve": bench_serve},
    "diffusion": {"diffusion_train": lambda: bench_train(DIFFUSION_JOB), "diffusion_sampling": bench_sampling, "diffusion_serve": bench_image_serve},
    "llm": {"llm_train": bench_gpt_train, "llm_qlora_memory": bench_qlora_memory, "llm_engine": bench_generate_engine,
            "llm_serve": bench_generate_serve, "llm_mfu": bench_gpt_mfu},
}


# ---------------------------------------------------------------------------------- report


def machine() -> dict:
    import ray

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__, "date": time.strftime("%Y-%m-%d")}


def render_markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# dlray benchmark results", "", f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, GPU: {m['gpu']}; "
             f"Python {m['python']}, torch {m['torch']}, Ray {m['ray']}; measured {m['date']} with `dlray bench`.", ""]
    lines += ["| benchmark | measured | goal |", "|---|---|---|"]
    if train := results.get("train"):
        lines += _train_rows(train, "train", "plain PyTorch", "samples/s")
    if memory := results.get("memory"):
        b = memory["bytes_per_rank"]
        lines += [
            f"| param+optimizer bytes per rank, FSDP / DDP ({memory['model']}) | {memory['fsdp_vs_ddp']:.2f} ({b['fsdp'] / 2**20:.0f} vs {b['ddp'] / 2**20:.0f} MiB) | <= 0.55 |",
            f"| param+optimizer bytes per rank, ZeRO-3 / DDP | {memory['zero3_vs_ddp']:.2f} ({b['zero3'] / 2**20:.0f} MiB) | <= 0.55 |",
        ]
    if cluster := results.get("cluster"):
        first, rates = cluster["submit_to_first_step_s"], cluster["samples_per_sec"]
        lines += [
            f"| `ray job submit` to first optimizer step, 1st / later jobs on a fresh cluster/local.sh cluster | "
            f"{first['1_node'][0]:.1f} / {statistics.median([*first['2_nodes'], *first['1_node'][1:]]):.1f} s | |",
            f"| train throughput, 2 workers on 2 nodes / on 1 node ({cluster['model']}) | "
            f"{cluster['2_nodes_vs_1_node']:.2f} ({rates['2_nodes']:.0f} vs {rates['1_node']:.0f} samples/s) | (cost of crossing nodes) |",
        ]
    if tune := results.get("tune"):
        runs = lambda key: " / ".join(f"{r[key]}" for r in tune["search"]["asha"]) + " vs " + " / ".join(f"{r[key]}" for r in tune["search"]["fifo"])  # noqa: E731
        lines += [
            f"| sweep epochs until a trial reaches val_accuracy {tune['target_val_accuracy']}, ASHA / FIFO (random search, {tune['num_samples']} trials x "
            f"{tune['epochs_per_trial']} epochs, seeds {', '.join(str(r['seed']) for r in tune['search']['asha'])}) | "
            f"{tune['asha_vs_fifo_epochs_to_target']:.2f} ({runs('epochs_to_target')}) | <= 0.5 |",
            f"| sweep epochs in total, ASHA / FIFO | {tune['asha_vs_fifo_total_epochs']:.2f} ({runs('total_epochs')}) | |",
            f"| Tune overhead: {tune['overhead_trials']} identical 3-epoch trials, one at a time / {tune['overhead_trials']} standalone runs | "
            f"{tune['tune_overhead']:.2f} ({tune['sweep_s']:.0f} s vs {tune['overhead_trials']} x {tune['standalone_run_s']:.0f} s) | <= 1.2 |",
        ]
    if serve := results.get("serve"):
        lines += [
            f"| serve throughput, batched / unbatched at {serve['concurrent_clients']} clients ({serve['model']}) | "
            f"{serve['batched_vs_unbatched_throughput']:.2f} ({serve['batched']['requests_per_sec']:.0f} vs {serve['unbatched']['requests_per_sec']:.0f} req/s) | >= 2 |",
            f"| serve latency p50 / p99, batched | {serve['batched']['p50_ms']:.0f} / {serve['batched']['p99_ms']:.0f} ms | |",
            f"| serve latency p50 / p99, unbatched | {serve['unbatched']['p50_ms']:.0f} / {serve['unbatched']['p99_ms']:.0f} ms | |",
        ]
    if diffusion := results.get("diffusion_train"):
        lines += _train_rows(diffusion, "diffusion train", "plain diffusers loop", "images/s")
    if sampling := results.get("diffusion_sampling"):
        lines += [f"| sampling latency, DDPM 1000 steps / DDIM 50 steps ({sampling['model']}) | "
                  f"{sampling['ddim_50_speedup_vs_ddpm_1000']:.1f}x ({sampling['ddpm_1000_s']:.2f} vs {sampling['ddim_50_s']:.2f} s) | >= 15x |"]
    if images := results.get("diffusion_serve"):
        lines += [
            f"| images endpoint throughput, batched / unbatched at {images['concurrent_clients']} clients ({images['model']}) | "
            f"{images['batched_vs_unbatched_throughput']:.2f} ({images['batched']['requests_per_sec']:.1f} vs {images['unbatched']['requests_per_sec']:.1f} images/s) | > 1 |",
            f"| images endpoint latency p50 / p99, batched | {images['batched']['p50_ms']:.0f} / {images['batched']['p99_ms']:.0f} ms | |",
        ]
    lines += _llm_rows(results)
    return "\n".join(lines) + "\n"


def _train_rows(train: dict, label: str, baseline: str, unit: str, per_sample: int = 1) -> list[str]:
    """bench_train's rows, in units of `per_sample` per sample (tokens of a text window)."""
    rows = [f"| {label} throughput, dlray 1 worker / {baseline} ({train['model']}, batch {train['micro_batch_size']}) | {train['ratio_1_worker_vs_plain']:.2f} "
            f"({train['dlray_1_worker_samples_per_sec'] * per_sample:.0f} vs {train['plain_pytorch_samples_per_sec'] * per_sample:.0f} {unit}) | >= 0.90 |"]
    if "scaling_2_vs_1_workers" in train:
        rows.append(f"| {label} scaling, 2 workers / 1 worker | {train['scaling_2_vs_1_workers']:.2f} "
                    f"({train['dlray_2_workers_samples_per_sec'] * per_sample:.0f} {unit}) | (2 cores) |")
    return rows


def _llm_rows(results: dict) -> list[str]:
    lines = []
    for train in results.get("llm_train", {}).values():
        corpus = f", the corpus' first {train['corpus_chars'] // 1000} KB" if train.get("corpus_chars") else ""
        lines += _train_rows(train, f"LLM train ({train['max_seq_len']}-token windows{corpus})", "plain PyTorch + transformers loop", "tokens/s", train["max_seq_len"])
    if memory := results.get("llm_qlora_memory"):
        linear, model = memory["linear_bytes"], memory["model_bytes"]
        lines.append(_row(f"QLoRA weight bytes / bf16, the {memory['quantised_linears']} quantised linears ({memory['model']})",
                          f"{memory['qlora_vs_bf16']:.3f} ({memory['bits_per_param']:.3f} bits/param; {linear['qlora'] / 2**20:.1f} vs {linear['bf16'] / 2**20:.1f} MiB)",
                          "<= 0.27"))
        lines.append(_row("QLoRA weight bytes / bf16, whole model (embedding and output layer stay bf16)",
                          f"{memory['model_qlora_vs_bf16']:.2f} ({model['qlora'] / 2**20:.0f} vs {model['bf16'] / 2**20:.0f} MiB)"))
    if engine := results.get("llm_engine"):
        rates = engine["tokens_per_sec"]
        lines.append(_row(f"generation engine alone, {engine['sequences']} sequences batched / one at a time ({engine['model']}, 1 thread)",
                          f"{engine['batched_vs_one_at_a_time']:.2f} ({rates['batched']:.0f} vs {rates['one_at_a_time']:.0f} tokens/s)", "> 1"))
    if serve := results.get("llm_serve"):
        (few, low), (most, high) = list(serve["streams"].items())[0], list(serve["streams"].items())[-1]
        lines.append(_row(f"generate endpoint throughput, {most} / {few} streaming clients ({serve['model']})",
                          f"{serve['most_vs_fewest_streams_tokens_per_sec']:.2f} ({high['tokens_per_sec']:.0f} vs {low['tokens_per_sec']:.0f} tokens/s)", "> 1"))
        lines.append(_row(f"generate endpoint time to first token p50, {few} / {most} streams", f"{low['ttft_p50_ms']:.0f} / {high['ttft_p50_ms']:.0f} ms"))
    if mfu := results.get("llm_mfu"):
        title = f"MFU of gpt/{MFU_FLAVOR} bf16 training, FLOPs/token = 6N + 12·L·H·T"
        if "skipped" in mfu:
            lines.append(_row(title, f"skipped: {mfu['skipped']}", ">= 45% through dlray train (H100-class GPU)"))
        else:
            for key, name in (("plain_eager", "plain loop, eager"), ("plain_compiled", "plain loop, torch.compile"), ("dlray", "dlray train (FSDP2, compile)")):
                rate = f"{mfu[f'{key}_tokens_per_sec']:.0f} tokens/s on {mfu['gpu']}"
                share = mfu.get(f"{key}_mfu")
                measured = f"{100 * share:.1f}% ({rate})" if share is not None else f"{rate} (peak FLOPs unknown)"
                goal = ">= 45%, >= 0.95 of the compiled plain loop" if key == "dlray" else ""
                if key == "dlray" and "dlray_vs_compiled_plain" in mfu:
                    measured += f", {mfu['dlray_vs_compiled_plain']:.2f} of the compiled plain loop"
                lines.append(_row(f"{title}: {name}", measured, goal))
    return lines


def _row(benchmark: str, measured: str, goal: str = "") -> str:
    return f"| {benchmark} | {measured} | {goal} |"
