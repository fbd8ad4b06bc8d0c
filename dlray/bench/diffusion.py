"""`dlray bench diffusion`: jobs/diffusion_digits.yaml: dlray (1 worker) images/s / the plain diffusers
training loop on the same UNet; DDPM-1000 vs DDIM-50 sampling latency; the images endpoint's images/s
batched / unbatched at 16 concurrent clients; how much the job's samples look like digits, once trained
in full (the suite trains it for 3 epochs: a model-quality run of 24 is a benchmark's work).
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
QUALITY_SAMPLES = 256


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


def bench_sample_quality() -> dict:
    """The README's diffusion job trained as shipped, judged by the CNN of the README's digits job on
    QUALITY_SAMPLES DDIM-50 samples, as many images of uniform noise and the job's own 16x16 test
    digits, each reduced to the CNN's native 8x8 the same way.

    Confidence alone does not separate samples from noise: the CNN is overconfident on noise (87% of
    noise images got >= 0.9 for one class, nearly all "8"). What does is the classifier score (the
    Inception Score with this classifier): exp of the mean KL between each image's class distribution
    and the average one, high when images are confidently labelled AND spread over the classes.
    """
    import torch.nn.functional as F

    from dlray.export import export, load_artifact
    from dlray.local_cluster import init_ray
    from dlray.train import fit, run_dir

    init_ray()
    storage = tempfile.mkdtemp(prefix="dlray-bench-quality-")
    artifacts = {}
    for job in (DIFFUSION_JOB, "jobs/cnn_digits.yaml"):
        cfg = load_config(job, [f"run.storage_path={storage}", f"run.name={job.split('/')[-1].removesuffix('.yaml')}"])
        if (error := fit(cfg).error) is not None:
            raise RuntimeError(f"{job} failed: {error}")
        artifacts[job] = export(run_dir(cfg), f"{run_dir(cfg)}-artifact")
    model, _ = load_artifact(artifacts[DIFFUSION_JOB])
    classifier, _ = load_artifact(artifacts["jobs/cnn_digits.yaml"])
    cfg = load_config(DIFFUSION_JOB)
    real = build_data(cfg.data, seed=cfg.train.seed).test.columns["image"] * 2 - 1  # the job's held-out digits, in [0, 1]

    def judge(images_in_minus1_1: torch.Tensor) -> dict:
        pixels = F.interpolate((images_in_minus1_1 + 1) / 2, size=(8, 8), mode="area")  # the CNN's native 8x8 digits
        with torch.no_grad():
            p = torch.softmax(classifier(pixels), -1)
        score = torch.exp((p * (p.clamp_min(1e-12).log() - p.mean(0).log())).sum(-1).mean()).item()
        confident = p.max(-1).values >= 0.9
        return {"classifier_score": score, "confident_fraction": confident.float().mean().item(),
                "confident_classes": len(p.argmax(-1)[confident].unique())}

    samples = FAMILIES["diffusion"].sample(model, [torch.Generator().manual_seed(i) for i in range(QUALITY_SAMPLES)], num_inference_steps=50, scheduler="ddim")
    noise = torch.rand(QUALITY_SAMPLES, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"model": f"diffusion/{cfg.model.flavor} 16x16, {cfg.train.num_epochs} epochs, DDIM 50 steps", "samples": QUALITY_SAMPLES,
            "real_digits": len(real), "generated": judge(samples), "noise": judge(noise), "real": judge(real)}


def bench_image_serve() -> dict:
    """Images/s of the images endpoint at IMAGE_CLIENTS concurrent clients, each asking for one
    DDIM-IMAGE_STEPS image: @serve.batch up to 16 requests per denoising loop vs one at a time."""
    from ray import serve

    from dlray.artifact import write_artifact
    from dlray.local_cluster import init_ray
    from dlray.serve.app import run

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
