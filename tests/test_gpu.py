"""The GPU tier: the real `dlray.train.fit` on the session's local Ray with `scaling.use_gpu: true`.

Everything else in the suite runs on CPUs (gloo, autocast on the CPU, DeepSpeed's CPU accelerator);
this module checks what only a CUDA device exercises: NCCL, CUDA autocast and fp16 loss scaling,
DeepSpeed's CUDA engine, bitsandbytes' 4-bit kernels, torch.compile on the GPU, `precision: auto`,
TF32 and the MFU metric on real hardware, a GPU worker lost mid-run, and Serve replicas computing on a GPU.

    make test-gpu-smoke   # pytest tests/test_gpu.py -m gpu_smoke: sized for 5 minutes on one H100
    make test-gpu         # pytest tests/test_gpu.py -m gpu: the whole tier, ~15-20 minutes on one H100

Both fail, not skip, where torch sees no CUDA device (tests/conftest.py); in a run of the whole suite
on a CPU these tests are skipped. Times are estimates (no run on a GPU yet): each fit starts a Ray Train
worker group and trains two epochs, ~20-30 s. The smoke tier (marker `gpu_smoke`) trains 8 debug jobs:
every family once, each strategy once (ddp, fsdp, DeepSpeed ZeRO-3), fp16 and bf16, and serves one
endpoint (classify, in the replica's default bf16). The whole tier adds every family under each
strategy, ZeRO-2, QLoRA, torch.compile, a killed worker, the other endpoints, and with 2+ GPUs runs on two.
Collecting this module needs pytest and dlray's runtime dependencies (httpx among them), no dev extras.
"""

import base64
import functools
import io
import json
import math
from contextlib import contextmanager

import httpx
import pytest
import torch
from torch.utils.data import default_collate

from dlray import precision, reports
from dlray.artifact import load_artifact
from dlray.config import ConfigError, data_config, load_config
from dlray.console import Console
from dlray.data import build_data
from dlray.export import export
from dlray.local_cluster import free_port
from dlray.models import FAMILIES
from dlray.png import png_bytes
from dlray.runfiles import read_history
from dlray.train import fit, run_dir

from helpers import REPO, decode_png, fit_losing_a_worker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,  # end-to-end fits: `make test-fast` leaves them out on a GPU machine too
    # Where the GPU tier alone was asked for, conftest fails the run instead.
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")

ON_ONE_GPU = ["scaling.use_gpu=true", "scaling.num_workers=1"]
STRATEGIES = {
    "ddp": ["strategy.name=ddp"],
    "fsdp": ["strategy.name=fsdp"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
}
# Every family under ddp, fsdp and ZeRO-3 in bf16; ZeRO-2 (the same engine path as ZeRO-3 but for the
# parameter partitioning) and fp16 with loss scaling for one image and one text family, to keep the tier
# within ~8 minutes. Combinations the config refuses (a GAN's two optimizers under DeepSpeed) are
# skipped with the config's reason, not listed here.
MATRIX = [(family, strategy, "bf16") for family in FAMILIES for strategy in ("ddp", "fsdp", "zero3")]
MATRIX += [("cnn", "zero2", "bf16"), ("gpt", "zero2", "bf16"), ("cnn", "ddp", "fp16"), ("cnn", "zero2", "fp16")]
# The smoke tier's share: each family but the CNN once (it trains for the served endpoint), the CNN in fp16,
# and each strategy at least once.
SMOKE = {("cnn", "ddp", "fp16"), ("gpt", "fsdp", "bf16"), ("vit", "zero3", "bf16"), ("bert", "ddp", "bf16"),
         ("diffusion", "fsdp", "bf16"), ("gan", "ddp", "bf16"), ("vae", "zero3", "bf16"), ("rnn", "fsdp", "bf16")}


def gpu_job(family: str, storage, name: str, *overrides: str):
    """The family's debug job on one GPU, two epochs (enough to see the loss fall); `overrides` win."""
    return load_config(REPO / f"jobs/debug/{family}_cpu.yaml",
                       [f"run.storage_path={storage}", f"run.name={name}", *ON_ONE_GPU, "train.num_epochs=2", *overrides])


def fit_and_check(cfg) -> list[dict]:
    """Fit; the run succeeded, every loss of every epoch is finite, and (but for a GAN, whose two
    losses pull against each other) the training loss fell. The epochs' records."""
    result = fit(cfg)
    assert result.error is None, result.error
    history = reports.epochs(read_history(run_dir(cfg)))
    assert [r["epoch"] for r in history] == list(range(cfg.train.num_epochs))
    losses = [(r["epoch"], k, v) for r in history for k, v in r.items() if "loss" in k]
    assert all(math.isfinite(v) for _, _, v in losses), losses
    if len(FAMILIES[cfg.model.family].optimizers) == 1:
        train_losses = [r["train_loss"] for r in history]
        assert train_losses[-1] < train_losses[0], train_losses
    return history


@functools.cache
def _data(data_config_json: str, seed: int):
    return build_data(data_config(json.loads(data_config_json)), seed=seed)


def job_data(cfg):
    """The run's data as its workers build it (the same split; text data's tokenizer is trained
    deterministically), built once per data config: a tokenizer takes seconds to train."""
    return _data(cfg.data.model_dump_json(), cfg.train.seed)


def check_export(cfg, artifact) -> None:
    """The artifact loads and is the trained model: a classifier or LM scores the validation split
    (in fp32, on this process's CPU) as its checkpoint did on the GPU; a generator draws finite images."""
    model, config = load_artifact(artifact)
    family = FAMILIES[cfg.model.family]
    if family.sample:  # diffusion, vae, gan: their losses draw noise, so no loss to reproduce
        options = {"num_inference_steps": 2} if cfg.model.family == "diffusion" else {}
        images = family.sample(model, [torch.Generator().manual_seed(0)], **options)
        assert images.isfinite().all() and images.abs().max() <= 1 + 1e-6
        return
    val = job_data(cfg).val
    with torch.no_grad():
        loss = family.compute_loss(model, default_collate([val[i] for i in range(len(val))]))["loss"].double().mean().item()
    # The checkpoint scored under bf16/fp16 autocast; a lost or mis-mapped weight would be far off.
    assert loss == pytest.approx(config["metrics"]["val_loss"], rel=0.05, abs=0.01), (loss, config["metrics"])


# ---------------------------------------------------------------------------------------------
# Every family x strategy x precision, one GPU


@pytest.mark.parametrize("family, strategy, dtype", [pytest.param(*case, marks=[pytest.mark.gpu_smoke] if case in SMOKE else [], id="-".join(case))
                                                     for case in MATRIX])
def test_debug_job_trains_on_one_gpu_and_exports(ray_cluster, storage, tmp_path, family, strategy, dtype):
    try:
        cfg = gpu_job(family, storage, f"{family}-{strategy}-{dtype}", *STRATEGIES[strategy], f"precision={dtype}")
    except ConfigError as err:  # the matrix follows the config: what it refuses is not a run
        pytest.skip(f"the config refuses it: {err}")
    fit_and_check(cfg)
    check_export(cfg, export(run_dir(cfg), tmp_path / "artifact"))


# ---------------------------------------------------------------------------------------------
# Runs other tests read: each family's debug job once per module, ddp, precision as the job says


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """family -> (cfg, artifact): its debug job trained once on one GPU under ddp with the job's own
    precision (auto: the worker resolves it, and the checkpoint, hence the export, records the result)."""
    runs = {}

    def train(family: str):
        if family not in runs:
            storage = tmp_path_factory.mktemp(family)
            cfg = gpu_job(family, storage, f"{family}-gpu")
            fit_and_check(cfg)
            runs[family] = cfg, export(run_dir(cfg), storage / "artifact")
        return runs[family]

    return train


def test_precision_auto_on_the_gpu_and_the_peak_of_an_h100_or_h200(trained):
    hardware = precision.detect(torch.device("cuda"))
    # bf16 tensor cores came with Ampere (compute capability 8.0); older GPUs get fp16 with loss scaling.
    expected = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    assert precision.choose("auto", hardware, "ddp")[0] == expected, hardware
    _, artifact = trained("gpt")  # jobs/debug/gpt_cpu.yaml leaves precision at auto
    assert load_artifact(artifact)[1]["precision"] == expected, "the worker resolved `auto` differently from this process"
    if any(part in hardware.name for part in ("H100", "H200")):
        # Dense bf16: 756 TFLOP/s for an H100 PCIe, 989 for the SXM parts; an "H200" must not be read as an "H20" (148).
        assert hardware.peak_flops is not None and hardware.peak_flops >= 750e12, hardware


def test_gpt_run_reports_mfu_when_the_gpu_peak_is_known(trained):
    if precision.detect(torch.device("cuda")).peak_flops is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in dlray.precision.PEAK_BF16_FLOPS: no MFU to report")
    cfg, _ = trained("gpt")
    mfu = [r.get("mfu") for r in reports.epochs(read_history(run_dir(cfg)))]
    assert all(value is not None and 0 < value < 1 for value in mfu), mfu


# ---------------------------------------------------------------------------------------------
# QLoRA, torch.compile, a lost worker


def test_qlora_finetune_on_a_gpu_exports_an_adapter_peft_loads(ray_cluster, tmp_path):
    """jobs/llm_qlora.yaml (4-bit NF4 base, LoRA on every linear layer, chat data) on one GPU:
    bitsandbytes' CUDA kernels, where the CPU tests run its CPU backend."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strategy_worker import make_llm_base  # here: it imports bitsandbytes, seconds that collecting the tier need not wait

    base = make_llm_base(tmp_path / "base")
    cfg = load_config(REPO / "jobs/llm_qlora.yaml", [f"model.name_or_path={base}", f"run.storage_path={tmp_path}", "run.name=qlora",
                                                     *ON_ONE_GPU, "precision=bf16"])
    fit_and_check(cfg)
    adapter = export(run_dir(cfg), tmp_path / "adapter")
    merged = export(run_dir(cfg), tmp_path / "merged", merge_lora=True)
    model, _ = load_artifact(adapter)  # transformers + peft: the 4-bit base, quantised as in training, plus the adapter
    assert isinstance(model, PeftModel)
    prompt = AutoTokenizer.from_pretrained(merged)("The with statement", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the adapter's model may sit on the GPU (transformers places a 4-bit model there), the merged one on the CPU
        with torch.autocast(model.device.type, dtype=torch.bfloat16):
            adapter_logits = model(input_ids=prompt.to(model.device)).logits.float().cpu()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            merged_logits = AutoModelForCausalLM.from_pretrained(merged)(input_ids=prompt).logits.float()
    # As in test_llm_finetune: the merge is exact but for the 4-bit base's dequantisation and bf16.
    assert torch.allclose(adapter_logits, merged_logits, atol=0.1), (adapter_logits - merged_logits).abs().max()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_gpt_trains_and_exports(ray_cluster, storage, tmp_path, strategy):
    """train.compile: the whole model under ddp, block by block under fsdp. The checkpoint keeps
    the uncompiled names, so the export loads (and scores as the checkpoint did)."""
    cfg = gpu_job("gpt", storage, f"compiled-{strategy}", *STRATEGIES[strategy], "precision=bf16", "train.compile=true")
    fit_and_check(cfg)
    check_export(cfg, export(run_dir(cfg), tmp_path / "artifact"))


def test_killed_gpu_worker_restarts_from_checkpoint_and_matches_uninterrupted_run(ray_cluster, storage):
    """test_train's killed-worker test, with the worker on a GPU. Small batches make the epochs
    long enough (~1 s each) that the kill lands mid-run; fp32 keeps the two runs within GPU
    non-determinism (atomics in cuDNN's backward) of each other rather than bf16 rounding's.
    An fp32 run on an Ampere or newer GPU computes with TF32 (train.tf32), as its precision line says."""
    common = ["train.num_epochs=8", "train.micro_batch_size=8", "run.max_failures=1", "optim.lr=0.003",
              "scheduler.name=constant", "precision=fp32"]
    reference = gpu_job("cnn", storage, "uninterrupted", *common)
    printed = io.StringIO()
    with Console(reference, stream=printed) as console:
        assert fit(reference, console=console).error is None
    line = next(line for line in printed.getvalue().splitlines() if line.startswith("[dlray] precision "))
    if torch.cuda.get_device_capability() >= (8, 0):
        assert line == "[dlray] precision fp32: set in the job config; TF32 matmuls and convolutions on (train.tf32 false for full fp32)"

    history = fit_losing_a_worker(gpu_job("cnn", storage, "killed", *common))
    expected = reports.epochs(read_history(run_dir(reference)))
    for got, want in zip(history, expected):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=5e-3, abs=1e-4), (got, want)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=5e-3, abs=1e-4), (got, want)


# ---------------------------------------------------------------------------------------------
# Serve replicas on the GPU answer as the exported model does on this process's CPU


@contextmanager
def served_on_gpu(artifact, **overrides):
    """The artifact's endpoint, its replica holding one GPU (serve.num_gpus_per_replica); the base URL.
    The replica's model is in serve.dtype: `auto` (bf16 where the GPU has it) unless `overrides` say."""
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from dlray.serve.app import run

    serve.shutdown()  # Serve keeps the port it first started on; each app here picks its own
    port = free_port()
    run(str(artifact), {"num_gpus_per_replica": 1, "port": port, **overrides})
    try:
        # This session's Ray by its address: the state API refuses to guess when a machine runs several.
        alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], detail=True)
        replicas = [a for a in alive if a.class_name.startswith("ServeReplica:dlray:")]
        assert replicas and all(a.required_resources.get("GPU") == 1 for a in replicas), replicas
        base = f"http://127.0.0.1:{port}"
        expected = overrides.get("dtype", "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")
        assert httpx.get(f"{base}/healthz", timeout=30).json()["dtype"] == expected
        yield base
    finally:
        serve.shutdown()


@pytest.mark.gpu_smoke  # the smoke tier's served endpoint (and its CNN's training in the default precision)
def test_classify_replica_on_the_gpu_gives_the_exported_models_probabilities(trained):
    cfg, artifact = trained("cnn")
    test = job_data(cfg).test
    images = torch.stack([test[i][0] for i in range(64)])
    with served_on_gpu(artifact) as base:
        served = [httpx.post(f"{base}/v1/classify", json={"image": image.tolist()}, timeout=60).json() for image in images]
    model, config = load_artifact(artifact)
    with torch.no_grad():
        expected = torch.softmax(model(images), -1)
    names = config["data_info"]["class_names"]
    served_probs = torch.tensor([[r["probabilities"][name] for name in names] for r in served])
    # The replica computes in bf16 (serve.dtype auto): on the CPU, bf16 moved this CNN's probabilities by up to 0.007.
    assert torch.allclose(served_probs, expected, atol=0.03), (served_probs - expected).abs().max()
    clear = (expected.topk(2).values[:, 0] - expected.topk(2).values[:, 1]) > 0.05  # no near-ties, whose order rounding may flip
    assert [r["label_index"] for r, keep in zip(served, clear) if keep] == expected.argmax(-1)[clear].tolist()


def test_images_replica_on_the_gpu_draws_the_exported_models_images(trained):
    """The VAE: one decoder pass per image, so GPU (in bf16) and CPU (in fp32) differ by rounding alone. The
    replica draws each seed's latent with a CPU generator, so a seed means the same image on either device."""
    _, artifact = trained("vae")
    seeds = [3, 4, 5, 6]
    with served_on_gpu(artifact) as base:
        response = httpx.post(f"{base}/v1/images/generations", json={"n": len(seeds), "seed": seeds[0]}, timeout=120)
    assert response.status_code == 200, response.text
    served = [decode_png(base64.b64decode(item["b64_json"])) for item in response.json()["data"]]
    model, _ = load_artifact(artifact)
    expected = FAMILIES["vae"].sample(model, [torch.Generator().manual_seed(s) for s in seeds])
    for image, want in zip(served, expected):
        difference = abs(image.astype(int) - decode_png(png_bytes(want)).astype(int)).max()
        assert difference <= 4, f"pixels differ by up to {difference} of 255"  # bf16 against fp32 on the CPU: up to 2


def test_generate_replica_on_the_gpu_decodes_greedily_as_transformers_does_on_cpu(trained):
    """Continuous batching with the KV cache, logits and sampling on the replica's GPU: greedy text and
    logprobs as plain transformers gives them on this process's CPU, and seeded samples the same
    alone and among 8 concurrent streams (each sequence's generator lives on the GPU). In serve.dtype
    fp32 (full fp32, no TF32), so that the two devices differ by summation order alone; the classify
    and images tests serve in the default bf16."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, artifact = trained("gpt")
    prompt = "The with statement"
    with served_on_gpu(artifact, chat=False, dtype="fp32") as base:  # a tokenizer trained from scratch has no chat template
        def complete(body: dict) -> dict:
            response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()

        greedy = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2}
        seeded = [{"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": seed} for seed in range(8)]
        first, second = complete(greedy), complete(greedy)
        alone = [complete(body)["choices"][0]["text"] for body in seeded]
        with ThreadPoolExecutor(8) as pool:
            together = [reply["choices"][0]["text"] for reply in pool.map(complete, seeded)]
        scored = complete({"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert first["choices"][0]["text"] == second["choices"][0]["text"], "greedy decoding is deterministic"
    assert together == alone and len(set(alone)) > 1

    # Plain transformers on this process's CPU, in fp32: no dlray in the reference.
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    model = AutoModelForCausalLM.from_pretrained(artifact).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    assert first["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert first["choices"][0]["text"] == tokenizer.decode(new_tokens, skip_special_tokens=True)
    with torch.no_grad():
        logprobs = model(output).logits[0].log_softmax(-1)
    ids = output[0].tolist()
    expected = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    prompt_length = inputs["input_ids"].shape[1]
    # fp32 on both devices, summed in different orders: agreement to about 1e-3
    assert first["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(expected[prompt_length - 1:], abs=2e-3)
    assert scored["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(expected[: prompt_length - 1], abs=2e-3)


# ---------------------------------------------------------------------------------------------
# Two GPUs: NCCL between two workers


@needs_two_gpus
@pytest.mark.parametrize("family", ["cnn", "gpt"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_debug_job_on_two_gpus_splits_the_data_and_exports(ray_cluster, storage, tmp_path, family, strategy):
    cfg = gpu_job(family, storage, f"{family}-{strategy}-2gpu", *STRATEGIES[strategy], "precision=bf16", "scaling.num_workers=2")
    history = fit_and_check(cfg)
    # Each rank trains on its own half of the data: an epoch is that many micro-batches, not twice as many.
    train_size = len(job_data(cfg).train)
    assert history[0]["global_step"] == math.ceil(math.ceil(train_size / 2) / cfg.train.micro_batch_size)
    check_export(cfg, export(run_dir(cfg), tmp_path / "artifact"))
