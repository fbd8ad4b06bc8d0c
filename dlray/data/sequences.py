"""Labelled sequences of numbers from files, for sequence classifiers (the rnn family). No Ray here.

    data: {name: sequences, path: ecg.jsonl}                           # a file or a folder of .jsonl / .json / .parquet / .csv
    data: {name: sequences, path: shards/*.parquet, sequence_field: values, label_field: rhythm}

Each row holds a sequence (a list of numbers: one feature per step, or a list of lists: steps of
features; in a .csv cell, that list written as JSON) and a label (a string or an integer). Every
sequence has the shape of the first training one, (steps, features): a row of another shape is an
error naming file and row. A sample is (sequence, label): the sequence as float32 (steps, features),
the label the index of its class among the sorted labels. Rows are split by a hash of their values.
The model normalises each feature with the mean and std of the first FIT_ROWS training sequences.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
from pydantic import Field

from dlray.data.rows import TEXT_SUFFIXES, list_files, split_of
from dlray.data.spec import DataConfig, DataSource, Fitted, Listing
from dlray.data.text_classification import class_indices, labelled_rows

SUFFIXES = TEXT_SUFFIXES - {".txt"}
FIT_ROWS = 20_000  # training sequences the class-free statistics (mean, std, shape) come from


class SequencesConfig(DataConfig):
    name: Literal["sequences"] = "sequences"
    path: str = Field(min_length=1)  # a file, a folder or a glob, local or a URI
    sequence_field: str = "sequence"  # the column holding each row's sequence
    label_field: str = "label"  # the column holding each row's class (strings or integers)


def list_rows(cfg: SequencesConfig, seed: int) -> Listing:
    filesystem, files = list_files(cfg.path, SUFFIXES)
    return Listing(files=[f.path for f in files], filesystem=filesystem)


def read(filesystem, path: str, cfg: SequencesConfig, seed: int):
    """One file's labelled sequences, each as a (steps, features) list of lists with its split; a bad row is named."""
    for number, value, label in labelled_rows(filesystem, path, "data.sequence_field", cfg.sequence_field, cfg.label_field):
        sequence = steps_of(value, f"{path}, row {number}: data.sequence_field {cfg.sequence_field!r}")
        yield {"sequence": sequence, "label": label, "split": split_of(json.dumps(sequence), cfg.val_fraction, cfg.test_fraction, seed),
               "where": f"{path}, row {number}"}


def steps_of(value, where: str) -> list[list[float]]:
    """A row's sequence as steps of features: numbers (one feature) or lists of numbers, or that list as JSON text (a .csv cell)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{where} holds {value!r:.80}, not a JSON list of numbers") from None
    try:
        steps = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{where} holds {value!r:.80}, not a list of numbers or of equal-length lists of numbers") from None
    if steps.ndim == 1:
        steps = steps[:, None]
    if steps.ndim != 2 or len(steps) == 0 or not np.isfinite(steps).all():
        raise ValueError(f"{where} holds {value!r:.80}, not a non-empty list of finite numbers or of equal-length lists of them")
    return steps.tolist()


def fit(cfg: SequencesConfig, listing: Listing, sample: list[dict], classes: list | None) -> Fitted:
    """The class names (over every row's label), the sequences' shape and each feature's mean and std, over the first training rows."""
    if not sample:
        raise ValueError(f"data.path {cfg.path!r}: the training split holds no sequences; lower data.val_fraction and data.test_fraction, or add rows")
    class_names = class_indices(classes)[0]
    shape = np.asarray(sample[0]["sequence"]).shape
    values = stacked([row["sequence"] for row in sample], [row["where"] for row in sample], shape)
    info = {"sequence_shape": list(shape), "class_names": class_names, "mean": values.mean(axis=(0, 1)).tolist(),
            "std": values.std(axis=(0, 1), ddof=1).clip(1e-3).tolist() if values.size > 1 else [1.0] * shape[1]}
    return Fitted(info=info, state=class_names)


def stacked(sequences, where, shape) -> np.ndarray:
    for sequence, place in zip(sequences, where):
        if np.shape(sequence) != shape:
            raise ValueError(f"{place}: a sequence of shape {list(np.shape(sequence))}; every sequence must have the first training one's, {list(shape)}")
    return np.stack([np.asarray(sequence, dtype=np.float32) for sequence in sequences])


def columns(cfg: SequencesConfig) -> tuple[str, ...]:
    return ("sequence", "label")


def preprocess(batch: dict, cfg: SequencesConfig, fitted: Fitted, augment: bool) -> dict:
    # Streamed, Ray Data hands each sequence over as an array of per-step arrays: back to nested lists for one shape check.
    sequences = [np.asarray([np.asarray(step, dtype=np.float32) for step in sequence]) for sequence in batch["sequence"]]
    _, labels = class_indices(list(batch["label"]), fitted.state)
    return {"sequence": stacked(sequences, batch["where"], tuple(fitted.info["sequence_shape"])), "label": labels.numpy()}


SOURCE = DataSource(name="sequences", config=SequencesConfig, kind="sequence", list_rows=list_rows, fit=fit, preprocess=preprocess,
                    columns=columns, suffixes=SUFFIXES, read=read, classes_from="label", fit_rows=FIT_ROWS)
