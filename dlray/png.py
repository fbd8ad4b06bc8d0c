"""Images in [-1, 1] as PNG bytes, quantised as diffusers' pipelines do: what the images endpoint
answers and what a run's sample grids (dlray.tracking) are made of. A leaf: numpy and PIL only."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(image) -> bytes:
    """One image in [-1, 1], shape (C, H, W), as a PNG."""
    return encode_png(to_pixels(image[None])[0])


def to_pixels(images) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), quantised exactly as diffusers' pipelines do."""
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (array * 255).round().astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, C) pixels, C 1 or 3, as a PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()
