"""In-memory image datasets with light augmentation, and stratified splits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class ImageTensorDataset(Dataset):
    """(image, label) pairs from tensors; `augment` adds a small random affine (shift, rotate, scale).

    Digits are not mirror-symmetric, so there is no flip. Randomness comes from torch's global
    generator, which the training loop seeds and checkpoints, so a resumed run replays it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]):
        """A DataLoader's whole batch at once (torch's fetcher calls this when it exists): one augmentation call."""
        images = self.images[indices]
        if self.augment:
            images = random_affine(images)
        return list(zip(images, self.labels[indices]))


def random_affine(images: torch.Tensor, max_degrees: float = 10.0, max_shift: float = 0.125, max_scale: float = 0.1) -> torch.Tensor:
    """Each image of a batch (N, C, H, W) rotated, scaled and shifted at random, all in one grid sample
    (a Ray Data operator augments a batch at once: ~20x less CPU than image by image)."""
    n = len(images)
    limits = torch.tensor([[math.radians(max_degrees)], [max_scale], [max_shift * 2], [max_shift * 2]], device=images.device)
    angle, scale, tx, ty = (torch.rand(4, n, device=images.device) * 2 - 1) * limits
    cos, sin = angle.cos() / (1 + scale), angle.sin() / (1 + scale)  # shifts in grid units, which span [-1, 1]
    theta = torch.stack([cos, -sin, tx, sin, cos, ty], 1).view(n, 2, 3).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def resize_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """A batch (N, C, H, W) at size x size (antialiased bilinear) with `channels` channels (grey repeated for RGB)."""
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    if channels == 3 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return images


def split_indices(labels: torch.Tensor, val_fraction: float, test_fraction: float, seed: int):
    """Stratified train/val/test split, the same on every worker for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    train, val, test = [], [], []
    for cls in labels.unique().tolist():
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)].tolist()
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        test += idx[:n_test]
        val += idx[n_test : n_test + n_val]
        train += idx[n_test + n_val :]
    return sorted(train), sorted(val), sorted(test)
