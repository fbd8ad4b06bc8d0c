"""What a data source is, in one place: every other module asks a `DataSource`, never the source's module.

Each source module (`dlray/data/<source>.py`) ends with `SOURCE = DataSource(...)`, and
`dlray.data.SOURCES` maps names to them. A source is its config class (its keys, and only its), the
kind of data it gives (what model families name in `ModelFamily.data`), its rows listed on the driver
with their splits, what it learns from training rows (a tokenizer, statistics: the model's `info`),
and one Ray-free `preprocess(batch)`. Data in memory runs `preprocess` in this process
(dlray.data.build_data); streamed data runs the same function as Ray Data's `map_batches`
(dlray.streaming), so the two modes give the same splits, tokenizer and samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DataConfig(BaseModel):
    """The keys every source takes; each source's config class adds its own and fixes `name`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.2, ge=0.0, lt=0.5)
    dataloader_num_workers: int = Field(0, ge=0)  # in-memory data: DataLoader processes per training worker
    # Stream through Ray Data (dlray.streaming) rather than hold in every worker's memory. None: a
    # URI streams, a local path streams when its files hold more than 1 GiB, bundled data is held.
    streaming: bool | None = None
    # Streamed data's shuffle: `local`, a buffer of local_shuffle_buffer_size rows on each worker,
    # seeded per epoch (a resumed run replays the order); `full` adds Ray Data's random_shuffle.
    shuffle: Literal["local", "full"] = "local"
    local_shuffle_buffer_size: int = Field(1024, ge=1)
    preprocess_num_cpus: float = Field(1.0, gt=0)  # per streamed preprocessing task (decode, augment, tokenize, pack)
    preprocess_concurrency: int | None = Field(None, ge=1)  # at most this many such tasks at once; None: as many as CPUs allow

    @model_validator(mode="after")
    def _uri_streams(self):
        path = getattr(self, "path", None)
        if path and "://" in path and self.streaming is False:
            raise ValueError(f"data.path {path!r} is a URI, which only streams: drop data.streaming: false")
        return self


@dataclass
class Listing:
    """A source's rows as the driver lists them: the rows themselves (each with its "split", an index
    into SPLITS), or the files that `DataSource.read` turns into such rows."""

    rows: list[dict] | None = None
    files: list[str] = field(default_factory=list)
    filesystem: Any = None  # pyarrow's, for the files (and for rows that name files)


@dataclass
class Fitted:
    """What a source learnt from its training rows: what the model is built from (`info`), the
    tokenizer a checkpoint and an export keep, and whatever else `preprocess` needs (`state`)."""

    info: dict
    tokenizer: Any = None
    state: Any = None


@dataclass(frozen=True)
class DataSource:
    name: str  # data.name
    config: type[DataConfig]  # its keys; `name` a Literal of its own name
    kind: str  # what it gives, as families name it in ModelFamily.data: "image", "text", "labelled text", "sequence"
    # Driver side, no Ray: list_rows(cfg, seed) -> Listing; read(listing.filesystem, path, cfg, seed) -> a file's rows,
    # each with its split (a hash of a document or file name: no pass over the data), and errors naming file and line.
    list_rows: Callable[[Any, int], Listing]
    # fit(cfg, listing, sample, classes) -> Fitted: `sample` the first `fit_rows` training rows, `classes` the
    # distinct values of the `classes_from` column over every row (None without one).
    fit: Callable[[Any, Listing, list[dict], list | None], Fitted]
    # preprocess(batch, cfg, fitted, augment) -> the family's columns as arrays (decode, resize, augment,
    # tokenize, pack), plus "weight" 0 for a bad row it skips. `batch` maps each row key to a sequence.
    preprocess: Callable[..., dict]
    columns: Callable[[Any], tuple[str, ...]]  # columns(cfg): the batch fields, in the order the family's compute_loss takes them
    suffixes: frozenset[str] = frozenset()  # of the files it reads
    read: Callable[..., Iterator[dict]] | None = None
    classes_from: str | None = None
    # Training-time randomness over a batch of torch tensors (by column), applied at each epoch: in memory by the
    # DataLoader, streamed inside `preprocess` (which calls it when asked to augment).
    augment: Callable[[dict], dict] | None = None
    batch_rows: int = 256  # rows per preprocess call, in both modes (text windows are packed within one)
    fit_rows: int = 20_000  # training rows `fit` sees
    one_sample_per_row: bool = True  # False: preprocess packs rows into other counts of samples (text windows)
