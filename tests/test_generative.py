"""Generative families end to end on the session's local Ray.

The README's diffusion job (jobs/diffusion_digits.yaml) trains once per module, for 2 of its 24
epochs: its loss falls, each epoch leaves a sample grid, its export loads with plain diffusers and
gives the server's images, and the images endpoint answers over real HTTP. The VAE and GAN debug
jobs train too. Whether the fully trained job's samples look like digits, and how much faster DDIM
samples than DDPM, `dlray bench diffusion` measures (benchmarks/results.md).
"""

import asyncio
import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dlray import reports
from dlray.artifact import load_artifact
from dlray.checkpoint import checkpoint_name
from dlray.config import load_config
from dlray.export import export
from dlray.models import diffusion
from dlray.runfiles import read_history
from dlray.train import fit, run_dir

from helpers import REPO, decode_png

pytestmark = pytest.mark.slow


def train_job(job: str, storage, *overrides):
    cfg = load_config(REPO / job, [f"run.storage_path={storage}", f"run.name={Path(job).stem}", *overrides])
    result = fit(cfg)
    assert result.error is None, result.error
    return cfg, run_dir(cfg), reports.epochs(read_history(run_dir(cfg)))


@pytest.fixture(scope="module")
def diffusion_run(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("diffusion")
    # 2 epochs: its loss falls from ~0.4 to under half of it (the shipped 24 take ~4 min on 2 cores)
    cfg, directory, history = train_job("jobs/diffusion_digits.yaml", storage, "train.num_epochs=2")
    return cfg, directory, history, export(directory, storage / "artifact")


@pytest.fixture(scope="module")
def server(diffusion_run, serve_artifact):
    return serve_artifact(diffusion_run[3], name="diffusion", max_images_per_request=4, max_inference_steps=200)


def test_diffusion_loss_falls_and_every_epoch_leaves_a_sample_grid(diffusion_run):
    cfg, directory, history, artifact = diffusion_run
    losses = [r["train_loss"] for r in history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    grids = sorted(Path(directory, "samples").glob("epoch_*.png"))
    assert [g.name for g in grids] == [f"epoch_{e:04d}.png" for e in range(cfg.train.num_epochs)]
    first, last = decode_png(grids[0].read_bytes()), decode_png(grids[-1].read_bytes())
    assert first.shape == last.shape and first.shape[0] > 64  # 4x4 images of 16x16, shown 4x
    assert load_artifact(artifact)[1]["weights"] == "ema"


def test_exported_pipeline_gives_the_servers_image_for_the_same_seed(diffusion_run, server):
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(diffusion_run[3])  # plain diffusers, no dlray
    expected = pipeline(generator=torch.Generator().manual_seed(11), num_inference_steps=100, output_type="np").images[0]
    response = httpx.post(f"{server}/v1/images/generations", json={"seed": 11, "num_inference_steps": 100, "scheduler": "ddpm"}, timeout=120)
    assert response.status_code == 200, response.text
    served = decode_png(base64.b64decode(response.json()["data"][0]["b64_json"]))
    assert served.shape == (16, 16)
    assert np.abs(served.astype(int) - (expected[..., 0] * 255).round().astype(int)).max() <= 1


def test_images_endpoint_returns_pngs_and_batches_without_changing_them(server):
    async def generate_all(bodies):
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{server}/v1/images/generations", json=b) for b in bodies))

    bodies = [{"n": 2, "seed": 100 + 2 * i, "num_inference_steps": 10} for i in range(4)]
    together = asyncio.run(generate_all(bodies))  # concurrent: batched into one denoising loop
    alone = [httpx.post(f"{server}/v1/images/generations", json={"n": 1, "seed": s, "num_inference_steps": 10}, timeout=120) for s in (100, 105)]
    images = {item["seed"]: decode_png(base64.b64decode(item["b64_json"])) for r in together for item in r.json()["data"]}
    assert sorted(images) == list(range(100, 108))
    assert all(image.shape == (16, 16) and image.dtype == np.uint8 for image in images.values())
    for response, seed in zip(alone, (100, 105)):
        assert np.array_equal(decode_png(base64.b64decode(response.json()["data"][0]["b64_json"])), images[seed])
    assert not np.array_equal(images[100], images[101])

    raw = httpx.post(f"{server}/v1/images/generations", json={"seed": 1, "num_inference_steps": 5}, headers={"Accept": "image/png"}, timeout=60)
    assert raw.headers["content-type"] == "image/png" and decode_png(raw.content).shape == (16, 16)


@pytest.mark.parametrize("body, param", [
    ({"n": 5}, "n"),  # above this server's max_images_per_request of 4
    ({"num_inference_steps": 201}, "num_inference_steps"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"scheduler": "euler"}, "scheduler"),
    ({"response_format": "url"}, "response_format"),
    ({"size": "64x64"}, "size"),
    ({"class_label": 3}, "class_label"),  # the model is unconditional
    ({"steps": 10}, "steps"),
    ("not json", "body"),
])
def test_bad_image_requests_get_a_400_and_the_replica_keeps_serving(server, body, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    response = httpx.post(f"{server}/v1/images/generations", timeout=60, **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["param"] or "body"), error
    ok = httpx.post(f"{server}/v1/images/generations", json={"seed": 0, "num_inference_steps": 2}, timeout=60)
    assert ok.status_code == 200


def test_class_conditional_model_takes_a_class_label_or_a_class_name(serve_artifact, tmp_path):
    """An untrained class-conditional UNet, served as a second app beside the module's server."""

    from dlray.artifact import write_artifact

    cfg = load_config(REPO / "jobs/debug/diffusion_cpu.yaml", ["model.class_conditional=true"])
    info = {"image_shape": [1, 16, 16], "class_names": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25]}
    model_cfg = cfg.model.model_dump()
    artifact = write_artifact(diffusion.build(model_cfg, info), {"task": "images", "model": model_cfg, "data_info": info, "serve": {}}, tmp_path / "cond")
    base = serve_artifact(artifact, name="conditional")

    def generate(**body):
        return httpx.post(f"{base}/v1/images/generations", json={"seed": 3, "num_inference_steps": 3, **body}, timeout=60)

    three, seven = generate(class_label=3), generate(prompt="7")
    assert three.status_code == seven.status_code == 200, (three.text, seven.text)
    assert three.json()["data"][0]["b64_json"] != seven.json()["data"][0]["b64_json"]  # same seed, other class
    assert generate(class_label="3").json()["data"][0]["b64_json"] == three.json()["data"][0]["b64_json"]
    for bad in ({}, {"class_label": 10}, {"prompt": "a cat"}):
        response = generate(**bad)
        assert response.status_code == 400 and response.json()["error"]["param"] == "class_label", response.text


def test_vae_debug_job_improves_its_elbo_and_resumes_with_its_ema(ray_cluster, tmp_path):
    """Two epochs, then the same run asked for a third: it resumes from its checkpoint, EMA included."""
    keep_all = ["train.ema_decay=0.9", "run.checkpoint_num_to_keep=null"]
    train_job("jobs/debug/vae_cpu.yaml", tmp_path, "train.num_epochs=2", *keep_all)
    cfg, directory, history = train_job("jobs/debug/vae_cpu.yaml", tmp_path, "train.num_epochs=3", *keep_all)
    assert history[-1]["val_loss"] < history[0]["val_loss"], history  # the negative ELBO
    assert all(np.isfinite([r["val_recon_loss"], r["val_kl"]]).all() for r in history)
    assert [r["resumed_from_step"] for r in history] == [0, 0] + [history[1]["global_step"]]
    assert len(list(Path(directory, "samples").glob("epoch_*.png"))) == 3
    ema = load_file(Path(directory, checkpoint_name(history[-1]["global_step"]), "ema.safetensors"))
    assert int(ema["__ema_updates__"]) == history[-1]["global_step"]  # averaged over every step, across the restart


def test_gan_debug_job_updates_both_networks_with_finite_losses(ray_cluster, tmp_path):
    cfg, directory, history = train_job("jobs/debug/gan_cpu.yaml", tmp_path, "run.checkpoint_num_to_keep=null")
    for record in history:
        assert np.isfinite([record["train_generator_loss"], record["train_discriminator_loss"], record["val_d_loss"], record["val_g_loss"]]).all()
        assert record["generator_grad_norm"] > 0 and record["discriminator_grad_norm"] > 0, record  # each optimizer's own
    first, _ = load_artifact(export(Path(directory, checkpoint_name(history[0]["global_step"])), tmp_path / "first"))
    last, _ = load_artifact(export(directory, tmp_path / "last"))  # the newest: train.metric is epoch
    for network in ("generator", "discriminator"):
        before, after = getattr(first, network).state_dict(), getattr(last, network).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"the {network} did not change after epoch 0"
