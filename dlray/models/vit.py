"""Vision Transformer image classifier (Dosovitskiy et al., 2021): `transformers`'
ViTForImageClassification, trained from scratch on a flavor's sizes or fine-tuned from a pretrained
base (`model.name_or_path`).

The model takes [0, 1] pixels and returns logits, as the cnn does, so the classify endpoint
serves either. An exported model is a plain transformers directory: the ViT's config.json and
model.safetensors, with a preprocessor_config.json that holds the normalisation, so
`ViTForImageClassification.from_pretrained(dir)` with `AutoImageProcessor.from_pretrained(dir)`
classifies without dlray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dlray.models.classification import classification_losses, head_config
from dlray.models.family import ModelFamily

# transformers takes seconds to import: it is imported where a model is built or loaded, so that
# checking a config (`dlray validate`, every CLI command) does not pay for it.
if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Parameter counts for 10 classes: debug 0.07M (8x8 digits), small 21.7M and base 85.8M (224 px, 3 channels).
# The debug flavor initialises with std 0.1 (about 1/sqrt(64)) instead of transformers' 0.02, sized
# for 768-wide models: at 0.02 its loss on digits hardly fell in the first dozen steps (-5%, against
# -35% at 0.1), and 400 steps reached 94% validation accuracy, against 98%.
FLAVORS = {
    "debug": {"patch_size": 2, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "initializer_range": 0.1},  # 16 patches of 8x8 digits, seconds on CPU
    "small": {"patch_size": 16, "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},  # ViT-S/16 (DeiT-S)
    "base": {"patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},  # ViT-B/16
}
METRICS = ("accuracy",)
OPTIMIZERS = ("model",)
HEAD_MODULES = ("model.classifier",)  # what stays trainable when only the head is fine-tuned (relative to build's module)
FINETUNING_TYPES = ("full", "freeze")  # finetune.finetuning_type values


def shard_classes() -> tuple[type[nn.Module], ...]:
    """The blocks FSDP shards one by one (imported here, so transformers loads only when FSDP asks)."""
    from transformers.models.vit.modeling_vit import ViTLayer

    return (ViTLayer,)


class ViTClassifier(nn.Module):
    """A transformers image classifier behind dlray's image convention: [0, 1] pixels in, logits out."""

    def __init__(self, model: PreTrainedModel, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # In the input's dtype: FSDP's mixed precision hands us bf16 inputs but leaves buffers fp32.
        pixel_values = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self.model(pixel_values=pixel_values).logits


def build(model_cfg, data_info) -> ViTClassifier:
    """`data_info` needs image_shape, class_names, mean and std (see dlray.data.ImageData)."""
    from transformers import AutoConfig, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    channels, height, _ = data_info["image_shape"]
    base = model_cfg.get("name_or_path")
    if not base:
        patch_size = FLAVORS[model_cfg["flavor"]]["patch_size"]
        if height < patch_size:
            raise ValueError(f"model.flavor {model_cfg['flavor']!r} cuts images into {patch_size}x{patch_size} patches: "
                             f"the data's {height} px images need data.image_size >= {patch_size}")
        config = ViTConfig(image_size=height, num_channels=channels, attn_implementation=model_cfg.get("attn_implementation"),
                           **FLAVORS[model_cfg["flavor"]], **head_config(model_cfg, data_info))
        return ViTClassifier(ViTForImageClassification(config), data_info["mean"], data_info["std"])
    config = AutoConfig.from_pretrained(base, **head_config(model_cfg, data_info))
    expected = (getattr(config, "num_channels", channels), getattr(config, "image_size", height))
    if expected != (channels, height):
        raise ValueError(f"model.name_or_path {base!r} takes {expected[0]}-channel {expected[1]} px images, the data has {channels}-channel "
                         f"{height} px ones: set data.channels {expected[0]} and data.image_size {expected[1]}")
    # ignore_mismatched_sizes: a base that is itself a classifier gets a new head for these classes.
    model = AutoModelForImageClassification.from_pretrained(base, config=config, ignore_mismatched_sizes=True,
                                                            attn_implementation=model_cfg.get("attn_implementation"))
    # The normalisation the base was pretrained with, where it ships one.
    mean, std = image_statistics(base) or (data_info["mean"], data_info["std"])
    return ViTClassifier(model, mean, std)


def compute_loss(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    images, labels = batch
    return classification_losses(model(images), labels)


def enable_gradient_checkpointing(model: ViTClassifier) -> None:
    # transformers' default is non-reentrant torch.utils.checkpoint, which DDP, FSDP2 and ZeRO-3 all accept.
    model.model.gradient_checkpointing_enable()


def save_pretrained(model: ViTClassifier, directory) -> None:
    """The inner transformers model, and an image processor that resizes, scales to [0, 1] and
    normalises as the wrapper does."""
    from transformers import ViTImageProcessorPil  # the default ViTImageProcessor needs torchvision; both write the same file

    size = model.model.config.image_size
    mean, std = model.mean.flatten().tolist(), model.std.flatten().tolist()
    model.model.save_pretrained(directory)
    ViTImageProcessorPil(do_resize=True, size={"height": size, "width": size}, image_mean=mean, image_std=std).save_pretrained(directory)


def from_pretrained(directory) -> ViTClassifier:
    from transformers import AutoModelForImageClassification

    return ViTClassifier(AutoModelForImageClassification.from_pretrained(directory), *image_statistics(directory))


def image_statistics(name_or_path: str) -> tuple[list[float], list[float]] | None:
    """The image_mean and image_std of a transformers directory's (or Hub model's) image processor; None without one."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):  # no preprocessor_config.json
        return None
    return processor.image_mean, processor.image_std


FAMILY = ModelFamily(name="vit", build=build, compute_loss=compute_loss, flavors=FLAVORS, data=("image",), task="classify",
                     metrics=METRICS, shard_classes=shard_classes, enable_gradient_checkpointing=enable_gradient_checkpointing,
                     save_pretrained=save_pretrained, from_pretrained=from_pretrained, pretrained=True,
                     finetuning_types=FINETUNING_TYPES, head_modules=HEAD_MODULES)
