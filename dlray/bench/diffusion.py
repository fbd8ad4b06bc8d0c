"""`dlray bench diffusion`: jobs/diffusion_digits.yaml: dlray (1 worker) images/s / the plain diffusers
training loop on the same UNet; DDPM-1000 vs DDIM-50 sampling latency; the images endpoint's images/s
batched / unbatched at 16 concurrent clients.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time

import torch

from dlray.bench.common import http_load, one_thread, untrained
from dlray.bench.train import bench_train
from dlray.config import load_config
from dlray.data import build_data
from dlray.local_cluster import free_port
from dlray.models import FAMILIES

DIFFUSION_JOB = "jobs/diffusion_digits.yaml"
IMAGE_CLIENTS, IMAGE_REQUESTS, IMAGE_STEPS = 16, 96, 20


def bench_diffusion_train() -> dict:
    """bench_train on DIFFUSION_JOB, against the plain diffusers loop (PLAIN_LOSSES["diffusion"])."""
    return bench_train(DIFFUSION_JOB)


def bench_sampling() -> dict:
    """DDPM with every one of 1,000 steps vs DDIM with 50, same UNet, one image, one process."""
    cfg = load_config(DIFFUSION_JOB)
    model = untrained(cfg, _data_info(cfg)).eval()
    seconds = {}
    with one_thread():
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

    from dlray.artifact import write_artifact
    from dlray.serve.app import run
    from dlray.train import init_ray

    init_ray()
    cfg = load_config(DIFFUSION_JOB)
    info = _data_info(cfg)
    artifact = write_artifact(untrained(cfg, info), {"task": "images", "model": cfg.model.model_dump(), "data_info": info, "serve": {}},
                              tempfile.mkdtemp(prefix="dlray-bench-artifact-"))
    serve.shutdown()  # Serve keeps the HTTP port it first started on; this deployment picks its own
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    body = json.dumps({"num_inference_steps": IMAGE_STEPS, "scheduler": "ddim", "seed": 0}).encode()
    results = {"model": f"diffusion/{cfg.model.flavor} 16x16, DDIM {IMAGE_STEPS} steps, 1 image per request", "concurrent_clients": IMAGE_CLIENTS, "requests": IMAGE_REQUESTS}
    for label, batch in (("unbatched", 1), ("batched", 16)):
        run(str(artifact), {"port": port, "max_batch_size": batch, "batch_wait_timeout_s": 0.01})
        asyncio.run(http_load(url, body, IMAGE_CLIENTS, IMAGE_CLIENTS, "application/json"))  # warm-up
        results[label] = asyncio.run(http_load(url, body, IMAGE_CLIENTS, IMAGE_REQUESTS, "application/json"))
        serve.delete("dlray")
    results["batched_vs_unbatched_throughput"] = results["batched"]["requests_per_sec"] / results["unbatched"]["requests_per_sec"]
    return results


def _data_info(cfg) -> dict:
    return build_data(cfg.data, seed=cfg.train.seed).info
