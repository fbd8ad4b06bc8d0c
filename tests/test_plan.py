"""`dlray plan`: the plan's numbers against measurements on this CPU.

State bytes (parameters, ZeRO's master weights, optimizer state) against each rank's measured state
after a step in a plain gloo group of 2 (dlray.bench.train.state_bytes_per_rank); activations against
the peak that torch's memory profiler measures for one real forward and backward; QLoRA's 4-bit
weights against bitsandbytes' own; and the refusal of a GPU job larger than its device.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category, MemoryProfileTimeline
from typer.testing import CliRunner

from dlray.bench.common import unique_bytes
from dlray.bench.llm import _quant_state_tensors
from dlray.bench.train import state_bytes_per_rank
from dlray.cli import app
from dlray.config import config_from_dict, load_config
from dlray.loop import build_model
from dlray.models import FAMILIES
from dlray.plan import fake_batch, plan, planned_data_info, unique
from dlray.precision import DEVICE_MEMORY_GIB

IMAGE_FAMILIES = ("cnn", "vit", "gan", "vae")
# The small flavours the test profiles (gpt's and diffusion's small profile in 10-20 s on this CPU; their debug ones here).
CASES = [(family, "debug") for family in FAMILIES] + [(family, "small") for family in (*IMAGE_FAMILIES, "bert")]


def job(family: str, flavor: str, micro_batch_size: int = 16) -> dict:
    config = yaml.safe_load(open(f"jobs/debug/{family}_cpu.yaml"))
    config.pop("tune", None)
    config["model"] |= {"flavor": flavor, "dropout": 0.0}
    config["precision"] = "fp32"
    config.setdefault("train", {})["micro_batch_size"] = micro_batch_size
    if flavor == "small" and family in IMAGE_FAMILIES:
        config.setdefault("data", {})["image_size"] = 32  # the small flavours' size (vit's patches are 16 px)
    return config


def profiled_activation_peak(cfg) -> int:
    """The most memory one real forward and backward of the micro batch held at once beyond parameters and
    their gradients, from torch's memory profiler (its categories over time)."""
    family = FAMILIES[cfg.model.family]
    info, _ = planned_data_info(cfg)
    torch.manual_seed(0)
    model = build_model(family, cfg, info).train()
    batch = fake_batch(cfg, info)  # real tensors outside the fake mode
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        for phase in family.optimizers:
            family.training_loss(model, batch, phase).backward()
            model.zero_grad(set_to_none=True)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    sizes = torch.tensor(sizes, dtype=torch.float64)
    held = sum(sizes[:, _CATEGORY_TO_INDEX[kind] + 1] for kind in (Category.PARAMETER, Category.GRADIENT, Category.OPTIMIZER_STATE))
    return int((sizes.sum(dim=1) - held).max())


@pytest.mark.parametrize("family, flavor", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_activation_estimate_within_25_percent_of_the_profiled_peak(family, flavor):
    config = job(family, flavor)
    if family == "rnn":  # the GRU: the LSTM's oneDNN backward scratch is unseen by fake tensors (the next test)
        config["model"]["cell"] = "gru"
    cfg = config_from_dict(config)
    estimate, measured = plan(cfg).per_device["activations"], profiled_activation_peak(cfg)
    assert abs(estimate / measured - 1) < 0.25, f"{family}/{flavor}: planned {estimate / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"


def test_an_lstm_plan_counts_the_onednn_workspace():
    """torch's fake oneDNN LSTM layer returns an empty workspace (the plan then saw 12% of the peak); the plan sizes the real one,
    and says that its backward's scratch is left out (measured: 68% of the debug LSTM's peak, 86% of the small one's)."""
    cfg = config_from_dict(job("rnn", "small"))
    result = plan(cfg)
    assert 0.6 < result.per_device["activations"] / profiled_activation_peak(cfg) <= 1.0
    assert any("oneDNN's LSTM workspace" in note for note in result.notes)


STRATEGIES = {"ddp": {"name": "ddp"}, "fsdp": {"name": "fsdp"}, "zero1": {"name": "deepspeed", "zero_stage": 1},
              "zero2": {"name": "deepspeed", "zero_stage": 2}, "zero3": {"name": "deepspeed", "zero_stage": 3}}


def test_state_bytes_equal_each_ranks_measured_state():
    """Parameters + optimizer (ZeRO's fp32 partition included) per rank, as the bench measures them."""
    configs = [{"model": {"flavor": "resnet18"}, "strategy": strategy, "precision": "fp32", "scaling": {"num_workers": 2}}
               for strategy in STRATEGIES.values()]
    measured = state_bytes_per_rank(configs)
    for name, config, ranks in zip(STRATEGIES, configs, measured):
        planned = plan(config_from_dict(config), activations=0).per_device
        state = planned["params"] + planned["optimizer"]
        assert abs(state / max(ranks) - 1) < 0.01, f"{name}: planned {state:,} bytes, measured {ranks}"


def test_qlora_plans_four_bit_weights_and_trains_only_the_adapters(tmp_path):
    from strategy_worker import LLM_JOB, make_llm_base

    base = make_llm_base(tmp_path / "base", steps=0)
    config = {**LLM_JOB, "model": {**LLM_JOB["model"], "name_or_path": str(base)}, "finetune": {"finetuning_type": "qlora"},
              "precision": "fp32", "train": {"micro_batch_size": 4}}
    cfg = config_from_dict(config)
    planned = plan(cfg)
    model = build_model(FAMILIES["gpt"], cfg, {})
    states = [t for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state") for t in _quant_state_tensors(m.weight.quant_state)]
    assert planned.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    measured = unique_bytes([*model.parameters(), *states])
    assert abs(planned.per_device["params"] / measured - 1) < 0.01, (planned.per_device["params"], measured)


def test_plan_json_gives_each_part_per_device():
    result = CliRunner().invoke(app, ["plan", "jobs/debug/gpt_cpu.yaml", "--json"])
    assert result.exit_code == 0, result.output
    plan_json = json.loads(result.stdout)
    cfg = load_config("jobs/debug/gpt_cpu.yaml")
    model = build_model(FAMILIES["gpt"], cfg, planned_data_info(cfg)[0])
    num_params = sum(p.numel() for p in unique(model.parameters()))
    assert plan_json["num_params"] == num_params and plan_json["world_size"] == cfg.scaling.num_workers
    per_device = plan_json["per_device"]
    parts = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "temporary_bytes")
    assert all(per_device[part] > 0 for part in parts) and per_device["total_bytes"] == sum(per_device[part] for part in parts)
    assert per_device["params_bytes"] == 4 * num_params and per_device["optimizer_bytes"] == 8 * num_params  # fp32, AdamW's two moments


def test_a_gpu_job_larger_than_its_device_is_refused_with_what_would_fit():
    """gpt/small at 1024 sequences per micro batch needs ~20 GiB of activations: more than a T4's 16."""
    overrides = ["scaling.use_gpu=true", "scaling.accelerator_type=T4", "model.flavor=small", "train.micro_batch_size=1024"]
    result = CliRunner().invoke(app, ["validate", "jobs/debug/gpt_cpu.yaml", *overrides])
    assert result.exit_code == 2, result.output
    assert "more than a T4's 16.00 GiB" in result.output and "activations" in result.output
    assert "train.gradient_checkpointing=true" in result.output and "fits)" in result.output
    fits = CliRunner().invoke(app, ["validate", "jobs/debug/gpt_cpu.yaml", *overrides[:3], "train.micro_batch_size=16"])
    assert fits.exit_code == 0, fits.output


def test_accelerator_types_are_rays_names():
    import ray.util.accelerators.accelerators as ray_names

    names = {value for name, value in vars(ray_names).items() if name.isupper() and isinstance(value, str)}
    assert set(DEVICE_MEMORY_GIB) <= names
    with pytest.raises(ValueError, match="scaling.accelerator_type must be one of"):
        config_from_dict({"scaling": {"use_gpu": True, "accelerator_type": "A100-80GB"}})
