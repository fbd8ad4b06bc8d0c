"""Job configs: every shipped YAML validates; bad ones fail before any Ray process, naming the key."""

import subprocess
import sys

import pytest

from dlray.config import ConfigError, JobConfig, apply_override, job_files, load_config

from helpers import REPO


@pytest.mark.parametrize("path", job_files(REPO / "jobs"), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_job_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    verb = "tune" if cfg.tune else "train"  # a sweep is a job file with a `tune:` section
    assert path.read_text().startswith(f"# dlray {verb} {path.relative_to(REPO)}\n"), "a job file opens with its launch command"


def test_jobs_folder_is_not_empty():
    assert len(job_files(REPO / "jobs")) >= 2


@pytest.mark.parametrize(
    "override, expected",
    [
        ("strategy.name=deepspeed strategy.zero_stage=4", "strategy.zero_stage: must be 1, 2 or 3, got 4"),
        ("strategy.name=horovod", "strategy.name: must be 'ddp', 'fsdp' or 'deepspeed', got 'horovod'"),
        ("precision=fp8", "precision: must be 'auto', 'fp32', 'bf16' or 'fp16', got 'fp8'"),
        ("strategy.name=deepspeed strategy.zro_stage=2", "unknown key 'strategy.zro_stage'; allowed keys here: name, zero_stage, offload_optimizer"),
        ("strategy.name=fsdp strategy.offload_param=true", "strategy.offload_param applies only to strategy.name 'deepspeed', got strategy.name 'fsdp'"),
        ("trian.num_epochs=2", "unknown key 'trian'; allowed keys here: model, data, train, finetune, optim"),
        ("optim.name=lion", "optim.name: must be 'sgd', 'adam', 'adamw' or 'rmsprop', got 'lion'"),
        ("run.checkpoint_upload=later", "run.checkpoint_upload: must be 'async' or 'sync', got 'later'"),
        ("model.flavor=huge", "model.flavor must be one of ['debug', 'resnet18', 'resnet50', 'small'] for family 'cnn', got 'huge'"),
        ("train.micro_batch_size=0", "train.micro_batch_size: must be greater than or equal to 1, got 0"),
        ("train.metric=val_f1", "train.metric must be one of ['train_loss', 'val_loss', 'epoch', 'val_accuracy'] for model.family 'cnn', got 'val_f1'"),
        ("strategy.zero_stage=3", "strategy.zero_stage applies only to strategy.name 'deepspeed', got strategy.name 'ddp'"),
        ("precision=fp16 strategy.name=fsdp", "precision 'fp16' is not supported with strategy.name 'fsdp'"),
        ("strategy.name=deepspeed strategy.offload_param=true", "strategy.offload_param needs strategy.zero_stage 3, got 2"),
        ("scheduler.name=plateau scheduler.warmup_steps=10", "scheduler.warmup_steps is not supported with scheduler.name 'plateau'"),
        ("data.name=image_folder", "data.path is required when data.name is 'image_folder'"),
        ("train.max_steps=0", "train.max_steps: must be greater than or equal to 1, got 0"),
        ("train.max_tokens=1000000", "train.max_tokens counts tokens, but data.name 'digits' is not text (no data.max_seq_len): use train.max_steps"),
        ("train.val_every_n_steps=-5", "train.val_every_n_steps: must be greater than or equal to 1, got -5"),
        ("run.checkpoint_interval_s=0", "run.checkpoint_interval_s: must be greater than 0, got 0"),
    ],
)
def test_bad_config_names_key_and_allowed_values(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "jobs/debug/cnn_cpu.yaml", override.split())
    assert expected in str(err.value)


def test_a_sweep_over_a_step_budget_says_how_many_validations_asha_may_count():
    with pytest.raises(ConfigError, match="tune.scheduler.max_t must be set for tune.scheduler.name 'asha' with train.max_steps"):
        load_config(REPO / "jobs/sweep_cnn_asha.yaml", ["train.max_steps=100"])
    cfg = load_config(REPO / "jobs/sweep_cnn_asha.yaml", ["train.max_steps=100", "train.val_every_n_steps=20", "tune.scheduler.max_t=5"])
    assert cfg.sweep_max_t() == 5
    assert load_config(REPO / "jobs/sweep_cnn_asha.yaml").sweep_max_t() == load_config(REPO / "jobs/sweep_cnn_asha.yaml").train.num_epochs


def test_overrides_are_typed_and_nested():
    cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml",
                      ["strategy.name=deepspeed", "strategy.zero_stage=3", "precision=bf16", "optim.betas=[0.8, 0.95]", "train.max_grad_norm=null"])
    assert (cfg.strategy.name, cfg.strategy.zero_stage, cfg.precision) == ("deepspeed", 3, "bf16")
    assert cfg.optim.betas == (0.8, 0.95) and cfg.train.max_grad_norm is None
    assert cfg.run.name.startswith("cnn_cpu-"), "runs are named after their job file"


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="precision is a value, not a section"):
        apply_override({"precision": "bf16"}, "precision.x=1")


def test_dumped_config_reloads_unchanged():
    cfg = load_config(REPO / "jobs/cnn_digits.yaml", ["strategy.name=deepspeed", "strategy.zero_stage=3"])
    assert JobConfig.model_validate(cfg.model_dump(mode="json")) == cfg


VALIDATE_PROBE = """
import sys
from dlray.cli import app
try:
    app(["validate", "jobs/cnn_digits.yaml", "strategy.zero_stage=4"])
except SystemExit:
    pass
print("ray" in sys.modules)
"""


def test_cli_validate_fails_before_any_ray_process():
    bad = subprocess.run([sys.executable, "-m", "dlray.cli", "validate", "jobs/cnn_digits.yaml", "strategy.zero_stage=4", "strategy.name=deepspeed"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "strategy.zero_stage: must be 1, 2 or 3, got 4" in bad.stderr
    not_even_imported = subprocess.run([sys.executable, "-c", VALIDATE_PROBE], cwd=REPO, capture_output=True, text=True)
    assert not_even_imported.stdout.strip() == "False", not_even_imported.stdout + not_even_imported.stderr
    good = subprocess.run([sys.executable, "-m", "dlray.cli", "validate", "jobs/cnn_digits.yaml", "strategy.name=fsdp", "precision=bf16"], cwd=REPO, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "name: fsdp" in good.stdout
