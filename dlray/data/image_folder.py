"""Users' own images: one sub-folder per class (the torchvision ImageFolder layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image_folder(root: str, image_size: int, channels: int):
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(f"data.path {root!r} is not a directory")
    class_names = sorted(p.name for p in root_path.iterdir() if p.is_dir())
    if len(class_names) < 2:
        raise ValueError(f"data.path {root!r} needs at least two class sub-folders, found {class_names}")
    images, labels = [], []
    for label, name in enumerate(class_names):
        for file in sorted((root_path / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(decode_image(file.read_bytes(), image_size, channels))
                labels.append(label)
    if not images:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root!r}")
    return torch.stack(images), torch.tensor(labels), class_names


def decode_image(data: bytes, image_size: int, channels: int) -> torch.Tensor:
    """Encoded image bytes -> float tensor (C, H, W) in [0, 1]. Shared with serving."""
    import io

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB").resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(img, dtype=np.float32) / 255.0
    if channels == 1:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())
