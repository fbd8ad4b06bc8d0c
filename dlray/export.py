"""Turn a training checkpoint (any strategy, sharded or not) into a servable artifact.

    dlray export ~/dlray_runs/<run>            out/cnn   # the run's best checkpoint
    dlray export ~/dlray_runs/<run>/checkpoint_epoch0007 out/cnn
    dlray export ~/dlray_runs/<sweep>          out/cnn   # the best checkpoint of all its trials

An artifact is `dlray.json` (model config, data info such as class names and input shape,
serving defaults) plus the weights: `model.safetensors`, or for families with their own library
layout that layout (diffusion: a diffusers pipeline, loadable by `DDPMPipeline.from_pretrained`;
gpt: a transformers model with its tokenizer, loadable by `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained`, whose `config.json` is why dlray's file has a name of its
own). Runs that kept an EMA of the weights (`train.ema_decay`) export the EMA weights. Adapter
fine-tunes (lora, qlora, prompt_tuning) export the adapter in PEFT's layout (adapter_config.json,
adapter_model.safetensors: `PeftModel.from_pretrained(base, artifact)`), or with `merge_lora` the
base with the adapters merged in (`AutoModelForCausalLM.from_pretrained`). Loading an
artifact never unpickles anything. (Export itself reads your own training checkpoints; DeepSpeed's format is
torch.save-based, DCP's metadata too.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dlray import finetune, reports
from dlray.checkpoint import EMA_FILE, META_FILE, TOKENIZER_DIR, read_meta
from dlray.config import FinetuneConfig, JobConfig
from dlray.ema import STEP_KEY
from dlray.models import FAMILIES
from dlray.runfiles import read_history

WEIGHTS_FILE = "model.safetensors"
ADAPTER_INDEX = "adapter_config.json"  # PEFT's, in an adapter artifact
CONFIG_FILE = "dlray.json"


def export(source: str | Path, out_dir: str | Path, merge_lora: bool = False) -> Path:
    checkpoint_dir = resolve_checkpoint(Path(source).expanduser())
    meta = read_meta(checkpoint_dir)
    config = meta["config"]
    cfg = JobConfig.model_validate(config)
    if merge_lora and not cfg.finetune.adapter:
        raise ValueError(f"--merge-lora merges adapters, but {checkpoint_dir} is a finetuning_type {cfg.finetune.finetuning_type!r} run: export it without")
    family = FAMILIES[cfg.model.family]
    model = finetune.rebuild(family, cfg, meta["data_info"])
    trainable_only = cfg.finetune.trainable_only
    ema_file = checkpoint_dir / EMA_FILE
    if ema_file.exists():  # every weight, complete (train.ema_decay trains them all): the strategy's (sharded) files are not read
        weights = {k: v for k, v in load_file(ema_file).items() if k != STEP_KEY}
    elif meta["format"] == "deepspeed":
        from dlray.strategies.deepspeed import load_weights_offline

        weights = load_weights_offline(str(checkpoint_dir), trainable_only)  # parameters and buffers, fp32
    else:
        from dlray.strategies.dcp import load_weights_offline

        weights = load_weights_offline(str(checkpoint_dir), model, trainable_only)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, strict=not trainable_only)
    if merge_lora:
        model = finetune.merge(model, cfg.finetune)

    artifact_config = {
        "task": family.task,
        "model": config["model"],
        "data_info": meta["data_info"],
        "serve": config["serve"],
        "source_checkpoint": str(checkpoint_dir),
        "weights": "ema" if ema_file.exists() else "trained",
        "finetune": config["finetune"],
        "precision": config["precision"],
        "adapter": cfg.finetune.adapter and not merge_lora,  # PEFT's layout: the base is model.name_or_path
        "metrics": meta["metrics"],
    }
    out = write_artifact(model, artifact_config, out_dir)
    if (checkpoint_dir / TOKENIZER_DIR).is_dir():  # text models: the tokenizer beside the weights, as transformers keeps it
        shutil.copytree(checkpoint_dir / TOKENIZER_DIR, out, dirs_exist_ok=True)
    from dlray import trackers  # here: Serve replicas import this module for load_artifact

    trackers.log_export(cfg, out)  # to the run's MLflow / W&B run, where its job tracked one
    return out


def write_artifact(model: torch.nn.Module, artifact_config: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    family = FAMILIES[artifact_config["model"]["family"]]
    if family.save_pretrained:  # a PEFT model saves its adapter
        family.save_pretrained(model, out)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(artifact_config, indent=2))
    return out


def load_artifact(directory: str | Path) -> tuple[torch.nn.Module, dict]:
    """The exported model in eval mode, and its dlray.json."""
    directory = Path(directory)
    config = read_artifact_config(directory)
    family = FAMILIES[config["model"]["family"]]
    if family.from_pretrained:
        # transformers loads an adapter directory's base (model.name_or_path) and attaches the adapter;
        # a QLoRA adapter's base is quantised as it was in training, so it computes what was trained.
        options = finetune.load_options(FinetuneConfig(**config["finetune"]), config["precision"], family) if config.get("adapter") else {}
        return family.from_pretrained(directory, **options).eval(), config
    model = family.build(config["model"], config["data_info"])
    model.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=True)
    return model.eval(), config


def read_artifact_config(directory: str | Path) -> dict:
    path = Path(directory, CONFIG_FILE)
    config = json.loads(path.read_text()) if path.exists() else None
    weights = WEIGHTS_FILE
    if config:
        weights = ADAPTER_INDEX if config.get("adapter") else FAMILIES[config["model"]["family"]].artifact_index
    if config is None or not Path(directory, weights).exists():
        raise FileNotFoundError(f"{directory} is not a dlray artifact (needs {CONFIG_FILE} and its weights, {weights}); create one with `dlray export`")
    return config


def resolve_checkpoint(source: Path) -> Path:
    """A checkpoint directory as given, or the best checkpoint by the run's own metric in a run
    directory, or in a sweep directory (every trial's run)."""
    if (source / META_FILE).exists():
        return source
    candidates = sorted(p.parent for p in source.glob(f"**/{META_FILE}"))
    if not candidates:
        raise FileNotFoundError(f"no dlray checkpoint in {source} (expected {META_FILE} in it or in its sub-directories)")
    metas = {c: read_meta(c) for c in candidates}
    # Only checkpoints their run's history (metrics.csv beside them) lists: a trial that ASHA stops after a
    # report can write one more checkpoint before the stop reaches its workers, which Tune and results.csv
    # never saw. A run with no history keeps them all.
    reported = {run: {r["global_step"] for r in reports.epochs(read_history(run))} for run in {c.parent for c in metas}}
    metas = {c: meta for c, meta in metas.items() if not reported[c.parent] or meta["progress"]["global_step"] in reported[c.parent]} or metas
    train_cfg = next(iter(metas.values()))["config"]["train"]
    metric, sign = train_cfg["metric"], (1 if train_cfg["mode"] == "max" else -1)
    return max(metas, key=lambda c: (sign * metas[c]["metrics"][metric], metas[c]["progress"]["global_step"]))

