"""What a model family is, in one place: every other module asks a `ModelFamily`, never the module.

Each `dlray/models/<family>.py` ends with `FAMILY = ModelFamily(...)`, and `dlray.models.FAMILIES`
maps names to them. Config checks (flavors, metrics, data, fine-tuning methods), the loop, export
and the generic tests all derive from these fields, so adding a family is one file, one registry
line and one `jobs/debug/<family>_cpu.yaml`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def no_blocks() -> tuple[type[nn.Module], ...]:
    return ()


def no_derived_metrics(metrics: dict[str, float], data_info: dict) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class ModelFamily:
    name: str
    build: Callable[..., nn.Module]  # build(model_cfg: dict, data_info: dict, **load_options) -> model
    # Per-sample values, {"loss": [B], <each of metrics>: [B]}; with several optimizers it also takes the phase.
    compute_loss: Callable[..., dict[str, torch.Tensor]]
    flavors: dict[str, dict[str, Any]]  # named sizes; every family has `debug` (seconds on CPU)
    # The kinds of data it trains on, as data sources name theirs (dlray.data.spec.DataSource.kind): "image",
    # "text" (documents or conversations, for a causal LM), "labelled text", "sequence" (labelled sequences of numbers);
    # any source of such a kind will do.
    data: tuple[str, ...]
    task: str  # the serving endpoint its export gets (dlray.serve.app.ENDPOINTS): classify, images or generate
    inputs: str = "image"  # what its model takes, "image" (pixels), "text" (token ids) or "sequence" (steps of numbers): what a classify request carries
    metrics: tuple[str, ...] = ()  # what compute_loss returns besides "loss" (reported as val_<name>, test_<name>)
    # Blocks FSDP shards one by one; a function, so that transformers loads only when FSDP asks.
    shard_classes: Callable[[], tuple[type[nn.Module], ...]] = no_blocks
    optimizers: tuple[str, ...] = ("model",)  # one name per optimizer (a GAN's discriminator and generator)
    # One parameter list per optimizer; families with one optimizer train every parameter.
    param_groups: Callable[[nn.Module], list] | None = None
    sample: Callable[..., torch.Tensor] | None = None  # generative: sample(model, generators, **options) -> images in [-1, 1]
    sample_options: tuple[str, ...] = ()  # the options `sample` takes, which image requests may set (diffusion: steps, scheduler)
    derived_metrics: Callable[[dict, dict], dict] = no_derived_metrics  # more metrics from the reported ones (gpt: perplexity)
    derived_metric_names: tuple[str, ...] = ()  # what derived_metrics adds to every epoch (train.metric may be one)
    enable_gradient_checkpointing: Callable[[nn.Module], None] | None = None  # train.gradient_checkpointing
    flops_per_token: Callable[[nn.Module, int], float] | None = None  # training FLOPs per token, for `mfu` on GPUs
    # The family's own library layout for `dlray export` instead of model.safetensors (artifact_index marks it complete).
    save_pretrained: Callable[[nn.Module, Any], None] | None = None
    from_pretrained: Callable[..., nn.Module] | None = None
    artifact_index: str = "model.safetensors"
    pretrained: bool = False  # builds from model.name_or_path (a Hugging Face directory or hub id); transformers families
    finetuning_types: tuple[str, ...] = ("full",)  # the finetune.finetuning_type values it takes
    head_modules: tuple[str, ...] = ()  # what trains under `freeze` (and stays unquantised beside qlora's adapters)
    peft_task_type: str | None = None  # PEFT's task type for lora / qlora / prompt_tuning
    extra_model_keys: tuple[str, ...] = field(default=())  # model.* keys only this family reads (beside family, flavor, dropout)

    def training_loss(self, model: nn.Module, batch, phase: str) -> torch.Tensor:
        """The mean loss the optimizer of `phase` minimises (a family with one optimizer has one phase)."""
        values = self.compute_loss(model, batch, phase) if len(self.optimizers) > 1 else self.compute_loss(model, batch)
        return values["loss"].mean()

    def optimizer_params(self, model: nn.Module) -> list:
        """One parameter collection per optimizer, in the order of `optimizers`."""
        return self.param_groups(model) if self.param_groups else [model.parameters()]

    def epoch_metrics(self) -> list[str]:
        """What every epoch reports that train.metric may name."""
        return ["train_loss", "val_loss", "epoch"] + [f"val_{name}" for name in self.metrics] + list(self.derived_metric_names)
