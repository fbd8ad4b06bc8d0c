"""The GPU jobs users start from (jobs/gpu/): each validates on a CPU-only machine, without its data,
opens with its launch commands, and is what its name says. No Ray, no GPU, no download."""

import re

import pytest
import torch
from typer.testing import CliRunner

from dlray.cli import app
from dlray.config import ConfigError, job_files, load_config

from helpers import REPO

GPU_JOBS = job_files(REPO / "jobs/gpu")
EXPECTED = {"gpt_1b_fsdp.yaml", "llm_qlora_8b.yaml", "resnet50_imagefolder.yaml"}


def job(name: str):
    return load_config(REPO / "jobs/gpu" / name)


def test_the_gpu_jobs_are_there():
    assert EXPECTED <= {p.name for p in GPU_JOBS}


@pytest.mark.parametrize("path", GPU_JOBS, ids=lambda p: p.name)
def test_gpu_job_opens_with_its_launch_commands(path):
    relative = str(path.relative_to(REPO))
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header[0] == f"# dlray train {relative}", "the first line is the local launch command"
    submit = [line for line in header if "ray job submit" in line]
    assert submit, "the opening comment has a `ray job submit` line for clusters"
    assert re.search(rf"ray job submit .*--working-dir \. .*-- dlray train {re.escape(relative)}(\s|$)", submit[0]), submit[0]


@pytest.mark.parametrize("path", GPU_JOBS, ids=lambda p: p.name)
def test_gpu_job_is_a_multi_gpu_run_on_shared_storage(path, tmp_path):
    cfg = load_config(path)
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8
    assert cfg.precision == "auto"
    assert cfg.run.storage_path.startswith(("/mnt/", "s3://", "gs://")), "checkpoints must land on storage every node sees"
    assert cfg.run.max_failures >= 1
    # Large data streams (decoded / tokenised on the cluster's CPUs, never whole in a worker); small SFT data loads with loader processes.
    assert cfg.data.path and (cfg.data.streaming or cfg.data.dataloader_num_workers > 0)
    # The data path is a placeholder: validating does not open it (as `dlray validate` does not).
    assert load_config(path, [f"data.path={tmp_path / 'missing'}"]).data.path == str(tmp_path / "missing")


@pytest.mark.parametrize("path", GPU_JOBS, ids=lambda p: p.name)
def test_dlray_validate_accepts_gpu_job(path):
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "is a valid job config" in result.output


def test_gpt_1b_fsdp_is_a_1b_pretrain():
    cfg = job("gpt_1b_fsdp.yaml")
    assert (cfg.model.family, cfg.model.flavor, cfg.model.name_or_path) == ("gpt", "1b", None)
    assert cfg.finetune.finetuning_type == "full"
    assert cfg.strategy.name == "fsdp" and cfg.train.compile
    assert cfg.model.attn_implementation == "sdpa"
    assert (cfg.data.name, cfg.data.type, cfg.data.max_seq_len) == ("text", "completion", 2048)
    assert cfg.scheduler.name == "cosine" and cfg.scheduler.warmup_steps > 0
    assert cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * cfg.scaling.num_workers * cfg.data.max_seq_len >= 2**20  # ~1M tokens a step
    from dlray.models import gpt

    # TinyLlama-1.1B's shape with the job's vocabulary, built without allocating any weights.
    data_info = {"vocab_size": cfg.data.vocab_size, "max_seq_len": cfg.data.max_seq_len, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    with torch.device("meta"):
        model = gpt.build(cfg.model.model_dump(), data_info)
    assert model.config._attn_implementation == "sdpa"
    assert 1.05e9 < model.num_parameters() < 1.15e9, model.num_parameters()


def test_llm_qlora_8b_is_a_qlora_of_a_hub_model_under_ddp():
    cfg = job("llm_qlora_8b.yaml")
    assert cfg.model.family == "gpt" and cfg.model.name_or_path
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.model.name_or_path), "a Hugging Face hub id"
    assert "8b" in cfg.model.name_or_path.lower()
    assert cfg.data.tokenizer == cfg.model.name_or_path  # the base's own tokenizer
    ft = cfg.finetune
    assert (ft.finetuning_type, ft.lora_target_modules, ft.bnb_4bit_quant_type) == ("qlora", "all-linear", "nf4")
    assert ft.lora_r >= 8 and ft.lora_alpha >= ft.lora_r
    assert cfg.strategy.name == "ddp"  # qlora is refused under fsdp
    with pytest.raises(ConfigError, match="'qlora' keeps the base weights as packed 4-bit integers"):
        load_config(REPO / "jobs/gpu/llm_qlora_8b.yaml", ["strategy.name=fsdp"])
    assert (cfg.data.name, cfg.data.type) == ("text", "chat_template")
    assert cfg.train.gradient_checkpointing


def test_resnet50_imagefolder_is_resnet50_at_224():
    cfg = job("resnet50_imagefolder.yaml")
    assert (cfg.model.family, cfg.model.flavor) == ("cnn", "resnet50")
    assert (cfg.data.name, cfg.data.image_size, cfg.data.channels) == ("image_folder", 224, 3)
    assert cfg.strategy.name in ("ddp", "fsdp") and cfg.train.compile
    assert cfg.data.streaming and cfg.data.preprocess_num_cpus == 1
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9
    from dlray.models import cnn

    # The paper's ResNet-50 at 224 px: torchvision's 25,557,032 parameters with 1,000 classes.
    data_info = {"image_shape": (cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                 "class_names": [str(i) for i in range(1000)], "mean": [0.5] * 3, "std": [0.25] * 3}
    with torch.device("meta"):
        model = cnn.build(cfg.model.model_dump(), data_info)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
