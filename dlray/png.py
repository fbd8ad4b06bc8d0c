"""Images as bytes and back, for everything that writes or reads one: the sample grids of generative
runs, served images, image files of a data source. A leaf: numpy, PIL and torch only."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def png_grid(images: torch.Tensor, columns: int = 4, scale: int = 4) -> bytes:
    """Images in [-1, 1], shape (N, C, H, W), as one PNG grid, each pixel shown `scale` x `scale`."""
    n, channels, height, width = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * (height + 1) + 1, columns * (width + 1) + 1, channels), dtype=np.uint8)
    for i, image in enumerate(to_pixels(images)):
        r, c = divmod(i, columns)
        grid[1 + r * (height + 1) : 1 + r * (height + 1) + height, 1 + c * (width + 1) : 1 + c * (width + 1) + width] = image
    return encode_png(grid.repeat(scale, axis=0).repeat(scale, axis=1))


def png_bytes(image: torch.Tensor) -> bytes:
    """One image in [-1, 1], shape (C, H, W), as a PNG."""
    return encode_png(to_pixels(image[None])[0])


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), quantised exactly as diffusers' pipelines do."""
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (array * 255).round().astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes, image_size: int, channels: int) -> torch.Tensor:
    """Encoded image bytes (any format PIL reads) -> float tensor (C, H, W) in [0, 1], resized to a square."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB").resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(img, dtype=np.float32) / 255.0
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())
