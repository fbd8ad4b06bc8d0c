"""`precision: auto` picks what the hardware computes natively, and says why; explicit bf16 on a CPU
that can only emulate it still runs, with a warning. The speed switches' config checks."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from dlray.config import ConfigError, load_config
from dlray.precision import Hardware, choose, choose_tf32, cpu_hardware, detect, peak_bf16_flops, serve_dtype, slowdown_warning

from helpers import REPO

H100 = Hardware("cuda", "NVIDIA H100 80GB HBM3", native_bf16=True, peak_flops=989e12, tf32=True)
V100 = Hardware("cuda", "Tesla V100-SXM2-16GB", native_bf16=False)
SAPPHIRE_RAPIDS = Hardware("cpu", "this CPU (AVX512)", native_bf16=True)  # AMX
ZEN3 = Hardware("cpu", "this CPU (AVX2)", native_bf16=False)


@pytest.mark.parametrize("hardware, strategy, expected", [
    (H100, "fsdp", "bf16"),
    (V100, "ddp", "fp16"),  # with GradScaler (DeepSpeed: ZeRO with the strategy's loss scale, tests/test_deepspeed_fp16.py)
    (V100, "deepspeed", "fp16"),
    (V100, "fsdp", "fp32"),  # FSDP here has no loss scaler, so fp16 is refused
    (SAPPHIRE_RAPIDS, "ddp", "bf16"),
    (ZEN3, "ddp", "fp32"),
    (ZEN3, "deepspeed", "fp32"),
])
def test_auto_picks_what_the_hardware_computes_natively(hardware, strategy, expected):
    chosen, why = choose("auto", hardware, strategy)
    assert chosen == expected
    assert why.startswith("precision auto: ") and hardware.name in why


@pytest.mark.parametrize("capability, bf16_instructions, native, auto", [
    ("AVX512", True, True, "bf16"),  # Sapphire Rapids and later (AMX), Zen 4 and later (AVX512-BF16)
    ("AVX512", False, False, "fp32"),  # Skylake-SP to Ice Lake Xeons: AVX512 without bf16
    ("AVX2", False, False, "fp32"),  # Zen 2 / Zen 3, older Xeons
    ("AVX2", True, False, "fp32"),  # a bf16 CPU that ATen dispatches at AVX2 (ATEN_CPU_CAPABILITY=avx2)
])
def test_each_cpu_kind_gets_its_precision(capability, bf16_instructions, native, auto):
    """Every CPU kind's branch, whichever kind this machine is."""
    hardware = cpu_hardware(capability, bf16_instructions)
    assert hardware.native_bf16 is native
    assert choose("auto", hardware, "deepspeed")[0] == choose("auto", hardware, "ddp")[0] == auto
    assert (slowdown_warning("bf16", hardware) is None) is native


def test_an_explicit_precision_is_kept_and_emulated_bf16_warns():
    assert choose("bf16", ZEN3, "ddp") == ("bf16", "set in the job config")
    assert "emulated" in slowdown_warning("bf16", ZEN3) and "~20x" in slowdown_warning("bf16", ZEN3)
    assert slowdown_warning("bf16", SAPPHIRE_RAPIDS) is None
    assert slowdown_warning("fp32", ZEN3) is None
    assert slowdown_warning("bf16", V100) is None  # GPUs without bf16 are CUDA's business, not an emulation


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H20", 148e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12),  # not an L4
    ("NVIDIA L4", 121e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("Tesla V100-SXM2-16GB", None),  # no bf16 tensor cores: no mfu
])
def test_a_gpu_gets_the_dense_bf16_peak_of_its_own_model(name, peak):
    assert peak_bf16_flops(name) == peak


@pytest.mark.parametrize("hardware, precision, enabled, on, says", [
    (H100, "fp32", True, True, "TF32 matmuls and convolutions on (train.tf32 false for full fp32)"),
    (H100, "fp32", False, False, "TF32 off (train.tf32 false): full fp32 matmuls"),
    (H100, "bf16", True, True, ""),  # autocast computes matmuls in bf16; what it leaves in fp32 uses TF32: nothing to say
    (H100, "bf16", False, False, ""),
    (V100, "fp32", True, False, "Tesla V100-SXM2-16GB has no TF32: full fp32 matmuls"),
    (V100, "fp16", True, False, ""),
    (ZEN3, "fp32", True, False, ""),  # CPUs: torch's flags are left alone
    (SAPPHIRE_RAPIDS, "fp32", True, False, ""),
])
def test_tf32_on_gpus_that_have_it_unless_the_job_turns_it_off(hardware, precision, enabled, on, says):
    assert choose_tf32(hardware, precision, enabled) == (on, says)


def test_train_tf32_is_a_checked_key_on_by_default():
    assert load_config(REPO / "jobs/debug/cnn_cpu.yaml").train.tf32 is True
    assert load_config(REPO / "jobs/debug/cnn_cpu.yaml", ["train.tf32=false"]).train.tf32 is False
    with pytest.raises(ConfigError, match="train.tf32"):
        load_config(REPO / "jobs/debug/cnn_cpu.yaml", ["train.tf32=fast"])


@pytest.mark.parametrize("requested, hardware, expected", [
    ("auto", H100, "bf16"),
    ("auto", V100, "fp16"),
    ("auto", ZEN3, "fp32"),
    ("auto", SAPPHIRE_RAPIDS, "fp32"),  # a CPU replica stays in the export's fp32, even where bf16 is native
    ("fp32", H100, "fp32"),
    ("bf16", ZEN3, "bf16"),
    ("fp16", H100, "fp16"),
])
def test_serve_dtype_is_low_precision_on_gpus_and_fp32_on_cpus_unless_set(requested, hardware, expected):
    assert serve_dtype(requested, hardware) == expected


def test_serve_dtype_is_a_checked_key():
    assert load_config(REPO / "jobs/debug/cnn_cpu.yaml").serve.dtype == "auto"
    with pytest.raises(ConfigError, match="serve.dtype"):
        load_config(REPO / "jobs/debug/cnn_cpu.yaml", ["serve.dtype=fp8"])


CPU_KIND = """
import torch
from dlray.precision import choose, detect
hardware = detect(torch.device("cpu"))
print(hardware.native_bf16, choose("auto", hardware, "ddp")[0])
"""


def test_an_avx2_only_cpu_is_detected_as_emulating_bf16():
    """ATEN_CPU_CAPABILITY=avx2 makes torch dispatch as on an AVX2-only CPU (where bf16 runs ~20x slower)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", CPU_KIND], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "fp32"]
    native = detect(torch.device("cpu")).native_bf16
    expected = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert native == expected


def test_every_shipped_job_defaults_to_auto():
    for job in sorted((REPO / "jobs").rglob("*.yaml")):
        assert load_config(job).precision == "auto", job


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=deepspeed", "train.compile=true"], "train.compile is supported with strategy.name 'ddp' or 'fsdp', got 'deepspeed'"),
    (["model.attn_implementation=eager"], "model.attn_implementation applies only to model.family 'gpt' or 'vit' or 'bert'"),
])
def test_speed_switches_are_checked_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO / "jobs/debug/cnn_cpu.yaml", overrides)


def test_flash_attention_needs_gpu_workers():
    with pytest.raises(ConfigError, match="'flash_attention_2' runs on CUDA only"):
        load_config(REPO / "jobs/debug/gpt_cpu.yaml", ["model.attn_implementation=flash_attention_2"])


FLASH_ON_GPUS = ["model.attn_implementation=flash_attention_2", "scaling.use_gpu=true"]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_flash_attn_is_refused_by_dlray_validate_with_how_to_get_it():
    from typer.testing import CliRunner

    from dlray.cli import app

    result = CliRunner().invoke(app, ["validate", str(REPO / "jobs/debug/gpt_cpu.yaml"), *FLASH_ON_GPUS])
    assert result.exit_code == 2, result.output
    assert "model.attn_implementation 'flash_attention_2' needs the flash-attn package, which is not installed here" in result.output
    assert "pip install flash-attn --no-build-isolation" in result.output


def test_flash_attention_is_accepted_where_flash_attn_is_installed(tmp_path, monkeypatch):
    (tmp_path / "flash_attn").mkdir()  # an importable package of that name: what the check looks for
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(tmp_path)
    assert load_config(REPO / "jobs/debug/gpt_cpu.yaml", FLASH_ON_GPUS).model.attn_implementation == "flash_attention_2"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_transformers_model(implementation):
    from dlray.models import gpt

    info = {"vocab_size": 64, "max_seq_len": 16, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    model = gpt.build({"flavor": "debug", "dropout": 0.0, "attn_implementation": implementation}, info)
    assert model.config._attn_implementation == implementation


@pytest.mark.parametrize("use_gpu, accelerator", [(False, "cpu"), (True, "cuda")])
def test_deepspeed_follows_the_workers_device_not_the_submitting_environment(use_gpu, accelerator, monkeypatch):
    from dlray.train import worker_env

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as a laptop run (or this test session) leaves it
    cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml", [f"scaling.use_gpu={str(use_gpu).lower()}"])
    assert worker_env(cfg)["DS_ACCELERATOR"] == accelerator
