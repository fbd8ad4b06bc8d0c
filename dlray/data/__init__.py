"""Dataset builders. No Ray here: the training loop shards what these return.

`build_data(cfg.data, seed)` gives train/val/test datasets and an `info` dict, which the model
family's build() takes (and checkpoints keep, for export). Image data: (image, label) with images
as float tensors in [0, 1], shape (C, H, W); the model normalises. The same [0, 1] convention is
what the served model accepts, so serving needs no copy of the training preprocessing. Text data
(data.name 'text'): (input_ids, labels) token windows, see dlray.data.text; labelled texts
(data.name 'text_classification'): (input_ids, attention_mask, label), see dlray.data.text_classification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from dlray.config import DataConfig
from dlray.data.images import ImageTensorDataset, resize_images, split_indices

if TYPE_CHECKING:
    from dlray.data.text import TextData
    from dlray.data.text_classification import TextClassificationData


@dataclass
class ImageData:
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: list[float]  # per channel, over the training split
    std: list[float]

    @property
    def info(self) -> dict:
        return {"image_shape": self.image_shape, "class_names": self.class_names, "mean": self.mean, "std": self.std}


def build_data(cfg: DataConfig, seed: int) -> ImageData | TextData | TextClassificationData:
    # Imported when needed: image jobs never load transformers.
    if cfg.name == "text" and cfg.type == "chat_template":
        from dlray.data.chat import build_chat_data

        return build_chat_data(cfg, seed)
    if cfg.name == "text":
        from dlray.data.text import build_text_data

        return build_text_data(cfg, seed)
    if cfg.name == "text_classification":
        from dlray.data.text_classification import build_text_classification_data

        return build_text_classification_data(cfg, seed)
    if cfg.name == "digits":
        from dlray.data.digits import load_digits_images

        images, labels, class_names = load_digits_images()
    else:
        from dlray.data.image_folder import load_image_folder

        images, labels, class_names = load_image_folder(cfg.path, cfg.image_size or 32, cfg.channels)
    images = resize_images(images, cfg.image_size or images.shape[-1], cfg.channels)
    train_idx, val_idx, test_idx = split_indices(labels, cfg.val_fraction, cfg.test_fraction, seed)
    train_images = images[train_idx]
    return ImageData(
        train=ImageTensorDataset(train_images, labels[train_idx], augment=cfg.augment),
        val=ImageTensorDataset(images[val_idx], labels[val_idx]),
        test=ImageTensorDataset(images[test_idx], labels[test_idx]),
        class_names=class_names,
        image_shape=tuple(images.shape[1:]),
        mean=train_images.mean(dim=(0, 2, 3)).tolist(),
        std=train_images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist(),
    )
