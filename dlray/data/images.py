"""What the image sources (dlray.data.digits, dlray.data.image_folder) share: their keys, their
preprocessing (decode, resize, augment) and the statistics the model normalises with.

A sample is (image, label): a float tensor in [0, 1], shape (C, H, W), and the class index. The same
[0, 1] convention is what the served model accepts, so serving needs no copy of the preprocessing.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from dlray.data.spec import DataConfig, Fitted, Listing
from dlray.png import decode_image


class ImageConfig(DataConfig):
    image_size: int = Field(32, ge=4)  # every image is resized to a square of this side
    channels: Literal[1, 3] = 1  # grey, or RGB (grey repeated)
    augment: bool = True  # a small random affine (shift, rotate, scale) of each training image, each epoch


def image_columns(cfg: ImageConfig) -> tuple[str, ...]:
    return ("image", "label")


def preprocess_images(batch: dict, cfg: ImageConfig, fitted: Fitted, augment: bool) -> dict:
    """Rows of `pixels` (arrays in [0, 1]) or of `path` (image files) -> images (N, C, H, W) in [0, 1] at
    data.image_size. A file that does not decode is an error naming it, or with `data.bad_rows: skip` a
    weight-0 row (zeros) counted in the epoch's `skipped_rows`."""
    size, channels = cfg.image_size, cfg.channels
    weight = np.ones(len(batch["label"]), dtype=np.float32)
    if "pixels" in batch:
        images = resize_images(torch.from_numpy(np.stack(list(batch["pixels"]))).float(), size, channels)
    else:
        decoded = [read_image(fitted.state, path, size, channels, getattr(cfg, "bad_rows", "error")) for path in batch["path"]]
        images = torch.stack([image for image, _ in decoded])
        weight = np.array([w for _, w in decoded], dtype=np.float32)
    columns = {"image": images, "label": torch.as_tensor(np.asarray(batch["label"], dtype=np.int64))}
    if augment:
        columns = augment_images(columns)  # a skipped row's zeros stay zeros
    return {name: value.numpy() for name, value in columns.items()} | {"weight": weight}


def read_image(filesystem, path: str, size: int, channels: int, bad_rows: str) -> tuple[torch.Tensor, float]:
    try:
        with filesystem.open_input_stream(path) as stream:
            return decode_image(stream.read(), size, channels), 1.0
    except Exception as err:  # PIL raises several kinds for a file that is not an image
        if bad_rows == "error":
            raise ValueError(f"{path}: not a readable image ({err}); set data.bad_rows: skip to train without such files") from None
        return torch.zeros(channels, size, size), 0.0


def fit_images(cfg: ImageConfig, listing: Listing, sample: list[dict], classes: list | None, class_names: list[str]) -> Fitted:
    """The per-channel mean and std the model normalises with, over the first training images."""
    if not sample:
        raise ValueError("the training split holds no images: lower data.val_fraction and data.test_fraction, or add images")
    fitted = Fitted(info={}, state=listing.filesystem)
    images = preprocess_images({key: [row[key] for row in sample] for key in sample[0]}, cfg, fitted, augment=False)
    kept = images["image"][images["weight"] > 0]
    fitted.info = {"image_shape": (cfg.channels, cfg.image_size, cfg.image_size), "class_names": class_names,
                   "mean": kept.mean(axis=(0, 2, 3)).tolist(), "std": kept.std(axis=(0, 2, 3), ddof=1).clip(1e-3).tolist()}
    return fitted


def augment_images(columns: dict) -> dict:
    """Each image of a batch rotated, scaled and shifted at random. Randomness comes from torch's global
    generator, which the training loop seeds and checkpoints, so a resumed run replays it."""
    return {**columns, "image": random_affine(columns["image"])}


def random_affine(images: torch.Tensor, max_degrees: float = 10.0, max_shift: float = 0.125, max_scale: float = 0.1) -> torch.Tensor:
    """Each image of a batch (N, C, H, W) rotated, scaled and shifted at random, all in one grid sample
    (a batch at once: ~20x less CPU than image by image). No flip: digits are not mirror-symmetric."""
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
