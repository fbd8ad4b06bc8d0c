"""Turn a training checkpoint (any strategy, sharded or not) into a servable artifact.

    dlray export ~/dlray_runs/<run>            out/cnn   # the run's best checkpoint
    dlray export ~/dlray_runs/<run>/checkpoint_step00000336 out/cnn
    dlray export ~/dlray_runs/<sweep>          out/cnn   # the best checkpoint of all its trials

The artifact's files, and loading one back, are dlray.artifact's (what serving imports). Runs that
kept an EMA of the weights (`train.ema_decay`) export the EMA weights. Adapter fine-tunes (lora,
qlora, prompt_tuning) export the adapter, or with `merge_lora` the base with the adapters merged in
(`AutoModelForCausalLM.from_pretrained`). (Export reads your own training checkpoints; DeepSpeed's
format is torch.save-based, DCP's metadata too.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file

from dlray import finetune, reports, trackers
from dlray.artifact import write_artifact
from dlray.checkpoint import EMA_FILE, META_FILE, TOKENIZER_DIR, read_meta
from dlray.config import JobConfig
from dlray.ema import STEP_KEY
from dlray.models import FAMILIES
from dlray.runfiles import read_history


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
    trackers.log_export(cfg, out)  # to the run's MLflow / W&B run, where its job tracked one
    return out


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
    # A checkpoint between validations (no metric) ranks below every validated one, the latest first.
    return max(metas, key=lambda c: (metric in metas[c]["metrics"], sign * metas[c]["metrics"].get(metric, 0), metas[c]["progress"]["global_step"]))

