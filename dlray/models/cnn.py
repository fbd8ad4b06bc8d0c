"""ResNet-style image classifier: residual blocks, BatchNorm, dropout, He initialisation.

Small inputs (the 8x8 digits, 32x32) get a 3x3 stride-1 stem; large ones (>= 64 px) the
ImageNet 7x7 stride-2 stem with max-pooling, so `resnet18`/`resnet50` match the paper's shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlray.models.classification import classification_losses
from dlray.models.family import ModelFamily

FLAVORS = {
    "debug": {"block": "basic", "widths": (16, 32), "depths": (1, 1)},
    "small": {"block": "basic", "widths": (32, 64, 128), "depths": (1, 1, 1)},
    "resnet18": {"block": "basic", "widths": (64, 128, 256, 512), "depths": (2, 2, 2, 2)},
    "resnet50": {"block": "bottleneck", "widths": (64, 128, 256, 512), "depths": (3, 4, 6, 3)},
}
METRICS = ("accuracy",)  # besides "loss", what compute_loss returns per sample
OPTIMIZERS = ("model",)
LARGE_INPUT = 64  # from this size on, use the ImageNet stem


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose affine parameters follow its running statistics' dtype.

    FSDP2's MixedPrecisionPolicy and DeepSpeed's bf16 mode cast parameters but not buffers, and
    batch_norm accepts a bf16 input with fp32 parameters and statistics (what autocast does) but
    not bf16 parameters with fp32 statistics. Normalising with fp32 statistics is also the
    numerically safe choice.
    """

    def forward(self, x):
        dtype = self.running_mean.dtype
        if self.weight.dtype == dtype:
            return super().forward(x)
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight.to(dtype), self.bias.to(dtype), self.training, self.momentum, self.eps)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_ch, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), BatchNorm2d(out_ch))


SHARD_CLASSES = (BasicBlock, Bottleneck)


class ResNet(nn.Module):
    def __init__(self, *, block: str, widths, depths, in_channels: int, image_size: int, num_classes: int, dropout: float, mean, std):
        super().__init__()
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        # Normalisation lives in the model so the served artifact takes raw [0, 1] pixels.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        if image_size >= LARGE_INPUT:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), BatchNorm2d(widths[0]), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), BatchNorm2d(widths[0]), nn.ReLU())
        layers, in_ch = [], widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                layers.append(block_cls(in_ch, width, stride=2 if stage > 0 and i == 0 else 1))
                in_ch = width * block_cls.expansion
        self.blocks = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero the last BN of each residual branch: every block starts as the identity,
        # which trains deeper nets faster (Goyal et al., 2017).
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def forward(self, x):
        # In the input's dtype: FSDP's mixed precision hands us bf16 inputs but leaves buffers fp32.
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        x = self.blocks(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(self.dropout(x))


def build(model_cfg, data_info) -> ResNet:
    """`data_info` needs image_shape, class_names, mean and std (see dlray.data.ImageData)."""
    channels, height, _ = data_info["image_shape"]
    return ResNet(
        **FLAVORS[model_cfg["flavor"]],
        in_channels=channels,
        image_size=height,
        num_classes=len(data_info["class_names"]),
        dropout=model_cfg["dropout"],
        mean=data_info["mean"],
        std=data_info["std"],
    )


def compute_loss(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    images, labels = batch
    return classification_losses(model(images), labels)


FAMILY = ModelFamily(name="cnn", build=build, compute_loss=compute_loss, flavors=FLAVORS, data=("image",), task="classify",
                     metrics=METRICS, shard_classes=lambda: SHARD_CLASSES)
