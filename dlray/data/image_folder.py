"""Users' own images: one sub-folder per class (the torchvision ImageFolder layout).

    data: {name: image_folder, path: photos/, image_size: 64, channels: 3}   # a folder, a glob or a URI

Files are listed on the driver; each one's split is a hash of its class and file name, so nothing is
read to split and a file never moves between splits. Decoding happens in `preprocess`.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from pydantic import model_validator

from dlray.data.images import ImageConfig, augment_images, fit_images, image_columns, preprocess_images
from dlray.data.rows import list_files, split_of
from dlray.data.spec import DataSource, Fitted, Listing

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
MEAN_STD_SAMPLE = 1024  # training images the per-channel mean and std are estimated from


class ImageFolderConfig(ImageConfig):
    name: Literal["image_folder"] = "image_folder"
    # A folder with one sub-folder per class, a glob of such files, or (streamed) a URI (s3://bucket/images).
    path: str | None = None
    # An image that does not decode: `error` stops with its path; `skip` trains without it (streamed: counted
    # in each epoch's `skipped_rows`).
    bad_rows: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _has_a_path(self):
        if not self.path:
            raise ValueError("data.path is required when data.name is 'image_folder'")
        return self


def list_rows(cfg: ImageFolderConfig, seed: int) -> Listing:
    filesystem, files = list_files(cfg.path, IMAGE_SUFFIXES)
    class_names = sorted({PurePosixPath(f.path).parent.name for f in files})
    if len(class_names) < 2:
        raise ValueError(f"data.path {cfg.path!r} needs at least two class sub-folders, found {class_names}")
    index = {name: i for i, name in enumerate(class_names)}
    rows = []
    for f in files:
        path = PurePosixPath(f.path)
        rows.append({"path": f.path, "label": index[path.parent.name],
                     "split": split_of(f"{path.parent.name}/{path.name}", cfg.val_fraction, cfg.test_fraction, seed)})
    return Listing(rows=rows, filesystem=filesystem)


def fit(cfg: ImageFolderConfig, listing: Listing, sample: list[dict], classes: list | None) -> Fitted:
    class_names = sorted({PurePosixPath(row["path"]).parent.name for row in listing.rows})
    return fit_images(cfg, listing, sample, classes, class_names)


SOURCE = DataSource(name="image_folder", config=ImageFolderConfig, kind="image", list_rows=list_rows, fit=fit, preprocess=preprocess_images,
                    columns=image_columns, suffixes=IMAGE_SUFFIXES, augment=augment_images, fit_rows=MEAN_STD_SAMPLE, batch_rows=64)
