"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, 10 classes, no download.

    data: {name: digits}                  # 8x8 grey; data.image_size / data.channels resize them
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dlray.data.images import ImageConfig, augment_images, fit_images, image_columns, preprocess_images
from dlray.data.rows import split_indices
from dlray.data.spec import DataSource, Fitted, Listing

DIGITS_MAX = 16.0  # pixel intensities in the dataset run 0..16
MEAN_STD_SAMPLE = 1024  # training images the per-channel mean and std are estimated from


class DigitsConfig(ImageConfig):
    name: Literal["digits"] = "digits"
    image_size: int = Field(8, ge=4)  # the native size


def list_rows(cfg: DigitsConfig, seed: int) -> Listing:
    """Every image with its label and split, stratified by label (exact: the rows are all here)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = torch.tensor(digits.target, dtype=torch.long)
    split = {i: index for index, rows in enumerate(split_indices(labels, cfg.val_fraction, cfg.test_fraction, seed)) for i in rows}
    pixels = (digits.images / DIGITS_MAX).astype("float32")[:, None]  # (N, 1, 8, 8)
    return Listing(rows=[{"pixels": pixels[i], "label": int(labels[i]), "split": split[i]} for i in range(len(labels))])


def fit(cfg: DigitsConfig, listing: Listing, sample: list[dict], classes: list | None) -> Fitted:
    return fit_images(cfg, listing, sample, classes, [str(c) for c in range(10)])


SOURCE = DataSource(name="digits", config=DigitsConfig, kind="image", list_rows=list_rows, fit=fit, preprocess=preprocess_images,
                    columns=image_columns, augment=augment_images, fit_rows=MEAN_STD_SAMPLE)
