"""Data sources: one file each, ending in `SOURCE = DataSource(...)` (dlray.data.spec says what each
field means); `SOURCES` maps their names to them. No Ray here.

    build_data(cfg.data, seed) -> InMemoryData     # a source's rows listed, split, fitted and preprocessed here
    dlray.streaming.build_streamed_data(...)        # the same functions run by Ray Data, for data larger than memory

Adding a source: one file here and one line in SOURCES; the config, the families that take its kind
of data, the loop and both modes derive from the spec (tests/toy_source.py is such a source).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dlray.data import digits, image_folder, preference, sequences, text, text_classification
from dlray.data.rows import SPLITS, streams
from dlray.data.spec import DataConfig, DataSource, Fitted, Listing

SOURCES: dict[str, DataSource] = {module.SOURCE.name: module.SOURCE for module in (digits, image_folder, text, text_classification, sequences, preference)}


def data_config(keys: dict | None = None, /, **more) -> DataConfig:
    """The `data` section `keys` (and `more`) validated by its source's own config class (data.name's; default digits).
    Errors name the dotted key and what is allowed: the key's sources for a key of another source's."""
    keys = {**(keys or {}), **more}
    name = keys.get("name", "digits")
    if name not in SOURCES:
        raise ValueError(f"data.name must be one of {list(SOURCES)}, got {name!r}")
    config = SOURCES[name].config
    for key in keys:
        if key not in config.model_fields:
            owners = [source for source in SOURCES.values() if key in source.config.model_fields]
            if not owners:
                raise ValueError(f"unknown key 'data.{key}'; allowed keys here: {', '.join(config.model_fields)}")
            kinds = " or ".join(dict.fromkeys(f"{source.kind} data" for source in owners))
            raise ValueError(f"data.{key} applies only to {kinds} (data.name {' or '.join(repr(source.name) for source in owners)}), got data.name {name!r}")
    return config.model_validate(keys)


def source_of(cfg: DataConfig) -> DataSource:
    return SOURCES[cfg.name]


def streamed(cfg: DataConfig) -> bool:
    """Whether the source streams through Ray Data: data.streaming, else the rule in dlray.data.rows.streams."""
    return streams(getattr(cfg, "path", None), cfg.streaming, source_of(cfg).suffixes)


@dataclass
class InMemoryData:
    train: ColumnsDataset
    val: ColumnsDataset
    test: ColumnsDataset
    info: dict  # what the model family's build takes (checkpoints keep it, for export)
    tokenizer: Any = None  # text sources': checkpoints and exports keep it
    columns: tuple[str, ...] = ()
    skipped_rows: int = 0  # bad rows left out (data.bad_rows: skip)


class ColumnsDataset(Dataset):
    """Samples as tuples of the source's columns, in the order the family's compute_loss takes them.
    `augment` (the source's) is applied to each batch a DataLoader takes, so a new draw each epoch."""

    def __init__(self, columns: dict[str, torch.Tensor], names: tuple[str, ...], augment=None):
        self.columns, self.names, self.augment = columns, names, augment

    def __len__(self) -> int:
        return len(self.columns[self.names[0]])

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]):
        """A DataLoader's whole batch at once (torch's fetcher calls this when it exists): one augmentation call."""
        batch = {name: self.columns[name][indices] for name in self.names}
        if self.augment:
            batch = self.augment(batch)
        return list(zip(*(batch[name] for name in self.names)))


def build_data(cfg: DataConfig, seed: int) -> InMemoryData:
    """Every split in memory: the rows listed (and read), split, the source fitted on the first training
    rows, and each split preprocessed batch_rows rows at a time, as streamed data's tasks do."""
    source = source_of(cfg)
    listing = source.list_rows(cfg, seed)
    rows = listing.rows if listing.rows is not None else list(read_files(source, listing, cfg, seed))
    by_split = {split: [row for row in rows if row["split"] == i] for i, split in enumerate(SPLITS)}
    fitted = source.fit(cfg, listing, by_split["train"][: source.fit_rows], distinct(rows, source.classes_from))
    names = source.columns(cfg)
    datasets, skipped = {}, 0
    for split, split_rows in by_split.items():
        columns = preprocess_rows(source, cfg, fitted, split_rows, names)
        keep = columns.pop("weight") > 0
        skipped += int((~keep).sum())
        datasets[split] = ColumnsDataset({name: value[keep] for name, value in columns.items()}, names,
                                         source.augment if split == "train" and getattr(cfg, "augment", False) else None)
    if len(datasets["train"]) == 0:
        raise ValueError(f"data.name {cfg.name!r} gives no training samples (data.path {getattr(cfg, 'path', None)!r})")
    return InMemoryData(datasets["train"], datasets["val"], datasets["test"], fitted.info, fitted.tokenizer, names, skipped)


def read_files(source: DataSource, listing: Listing, cfg: DataConfig, seed: int) -> Iterator[dict]:
    for path in listing.files:
        yield from source.read(listing.filesystem, path, cfg, seed)


def distinct(rows: Iterable[dict], column: str | None) -> list | None:
    return None if column is None else list(dict.fromkeys(row[column] for row in rows))


def preprocess_rows(source: DataSource, cfg: DataConfig, fitted: Fitted, rows: list[dict], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """`rows` through the source's preprocess, batch_rows at a time, unaugmented: tensors by column, and "weight"."""
    parts = []
    for start in range(0, len(rows), source.batch_rows):
        chunk = rows[start : start + source.batch_rows]
        out = source.preprocess({key: [row[key] for row in chunk] for key in chunk[0] if key != "split"}, cfg, fitted, augment=False)
        parts.append(with_weights(out))
    if not parts:  # an empty split: no rows, each column still shaped as the model takes it
        return {name: torch.zeros(0, dtype=torch.long) for name in names} | {"weight": torch.zeros(0)}
    return {key: torch.from_numpy(np.concatenate([part[key] for part in parts])) for key in (*names, "weight")}


def with_weights(columns: dict) -> dict:
    """A preprocess batch with `weight` (1 unless the source skipped the row) and `skipped`, which streamed training counts."""
    rows = len(next(iter(columns.values())))
    weight = columns.get("weight", np.ones(rows, dtype=np.float32))
    return {**columns, "weight": weight, "skipped": (weight == 0).astype(np.int64)}


__all__ = ["SOURCES", "ColumnsDataset", "DataConfig", "DataSource", "Fitted", "InMemoryData", "Listing", "build_data", "data_config",
           "source_of", "streamed", "with_weights"]
