"""A data source added the way the README's recipe says, to show the recipe works: this file and one
registry entry (made by the tests, where dlray/data/__init__.py would hold the line in SOURCES). Its
kind is "image", so every image family trains on it; in memory and streamed alike, from one preprocess.

Stripes: 8x8 grey images of horizontal or vertical stripes (the two classes) at a random phase, with noise.
"""

from typing import Literal

import numpy as np
from pydantic import Field

from dlray.data.rows import split_of
from dlray.data.spec import DataConfig, DataSource, Fitted, Listing

SIZE = 8


class StripesConfig(DataConfig):
    name: Literal["stripes"] = "stripes"
    num_images: int = Field(400, ge=10)
    noise: float = Field(0.2, ge=0)


def list_rows(cfg: StripesConfig, seed: int) -> Listing:
    return Listing(rows=[{"id": i, "label": i % 2, "split": split_of(str(i), cfg.val_fraction, cfg.test_fraction, seed)}
                         for i in range(cfg.num_images)])


def fit(cfg: StripesConfig, listing: Listing, sample: list[dict], classes: list | None) -> Fitted:
    return Fitted(info={"image_shape": (1, SIZE, SIZE), "class_names": ["horizontal", "vertical"], "mean": [0.5], "std": [0.5]})


def preprocess(batch: dict, cfg: StripesConfig, fitted: Fitted, augment: bool) -> dict:
    """Each image drawn from its row id alone, so the same in every process and mode."""
    images = []
    for row_id, label in zip(batch["id"], batch["label"]):
        rng = np.random.default_rng(int(row_id))
        stripes = (np.arange(SIZE) + rng.integers(2)) % 2 * np.ones((SIZE, 1))
        image = stripes if label == 0 else stripes.T
        images.append(np.clip(image + rng.normal(0, cfg.noise, image.shape), 0, 1)[None])
    return {"image": np.stack(images).astype(np.float32), "label": np.asarray(batch["label"], dtype=np.int64)}


# `SOURCE` in a source module; here TOY_SOURCE, so that nothing but the tests that want it registers it.
TOY_SOURCE = DataSource(name="stripes", config=StripesConfig, kind="image", list_rows=list_rows, fit=fit, preprocess=preprocess,
                        columns=lambda cfg: ("image", "label"))
