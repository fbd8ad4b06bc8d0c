"""DCGAN-style convolutional stacks shared by the `vae` and `gan` families (not a family itself).

An Encoder halves the resolution once per width with 4x4 stride-2 convolutions and ends in one
linear layer; a Decoder mirrors it, from a latent vector up to a tanh image in [-1, 1] (Radford
et al., 2016). GroupNorm rather than DCGAN's BatchNorm: it normalises each sample on its own, so a
discriminator scores a batch of real and generated images as it would each alone, train and eval
modes compute the same thing, and bf16 parameters need no special care.
"""

from __future__ import annotations

import torch
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


class Down(nn.Sequential):
    """Half the resolution. LeakyReLU, as in DCGAN's discriminator: no dead units to starve G's gradient."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=False), group_norm(out_ch), nn.LeakyReLU(0.2))


class Up(nn.Sequential):
    """Double the resolution."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False), group_norm(out_ch), nn.ReLU())


class Encoder(nn.Module):
    """(B, C, side, side) image -> (B, out_features)."""

    def __init__(self, channels: int, side: int, widths, out_features: int):
        super().__init__()
        self.blocks = nn.Sequential(*(Down(a, b) for a, b in zip((channels, *widths), widths)))
        self.head = nn.Linear(widths[-1] * (side >> len(widths)) ** 2, out_features)

    def forward(self, x):
        return self.head(torch.flatten(self.blocks(x), 1))


class Decoder(nn.Module):
    """(B, latent_dim) -> (B, C, side, side) image in [-1, 1]; `widths` as the Encoder's, read backwards."""

    def __init__(self, latent_dim: int, channels: int, side: int, widths):
        super().__init__()
        bottom = side >> len(widths)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, widths[-1] * bottom**2), nn.Unflatten(1, (widths[-1], bottom, bottom)), group_norm(widths[-1]), nn.ReLU()
        )
        self.blocks = nn.Sequential(*(Up(a, b) for a, b in zip(widths[:0:-1], widths[-2::-1])))
        # The last upsampling produces the image itself: no normalisation, tanh into [-1, 1].
        self.out = nn.ConvTranspose2d(widths[0], channels, 4, 2, 1)

    def forward(self, z):
        return torch.tanh(self.out(self.blocks(self.project(z))))


def image_side(model_cfg, image_shape, levels: int) -> int:
    """The side of the square images these stacks take, checked: it must halve `levels` times."""
    _, height, width = image_shape
    if height != width or height % 2**levels:
        raise ValueError(f"model.flavor {model_cfg['flavor']!r} of model.family {model_cfg['family']!r} needs square images whose side "
                         f"divides by {2**levels}; got {height}x{width} (set data.image_size)")
    return height


def latents(generators: list[torch.Generator], latent_dim: int, like: torch.Tensor) -> torch.Tensor:
    """z ~ N(0, I), one row per generator: each image depends only on its own seed (drawn in fp32 on the
    generator's device, computed with on the device and in the dtype of `like`, a weight of the model)."""
    return torch.stack([torch.randn(latent_dim, generator=g, device=g.device) for g in generators]).to(like.device, like.dtype)
