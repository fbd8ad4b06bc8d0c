"""Data larger than memory: a source's own functions (dlray.data.spec) run by Ray Data, into Ray Train.

    driver:  prepare_data(cfg.data, seed, num_workers) -> PreparedData     (TorchTrainer's datasets and the workers' config)
               streamed: build_streamed_data(...) -> StreamedData;  else dlray.data.build_data, put in the object store
    worker:  dlray.batches.worker_data(...) -> batches, info, tokenizer    (1/N of the rows)

The source lists its rows (or files) on the driver, each row's split a hash of its key, so nothing
is read to split. Reading files, and the source's `preprocess` (decode, resize, augment, tokenize,
pack), run as Ray Data tasks with their own CPU budget (`data.preprocess_num_cpus`,
`data.preprocess_concurrency`): on whichever nodes have free CPUs, which on a GPU cluster are the
CPU nodes and the CPUs the training workers leave. The source is fitted (tokenizer, image
statistics) in this process on the first training rows, as dlray.data.build_data fits it: both
modes give the same splits, tokenizer and samples.

Exactly once: each split is padded with `(-rows) % num_workers` copies of its first rows that carry
weight 0, so that Ray's equal streaming split hands every worker the same number of rows (the
lockstep FSDP and ZeRO-3 need) and drops none; the loop trains and evaluates on weight-1 rows only.
With `execution_options.preserve_order` the split is deterministic, and each epoch's order comes
from a shuffle buffer on the worker seeded by (train.seed, epoch): a run resumed at an epoch
boundary sees what the uninterrupted run saw. `data.shuffle: full` adds Ray Data's global
`random_shuffle`, reseeded by Ray every epoch (exactly once still, but a resumed run's order differs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import ray
import ray.data
import ray.train

from dlray.data import DataConfig, DataSource, Fitted, build_data, source_of, streamed, with_weights
from dlray.data.rows import SPLITS

# Listed rows (image paths, bundled texts) per block of the source dataset, so a preprocessing task's:
# Ray Data's executor notices a finished task up to 0.1 s late, which for 256 images (0.25 s) idled
# a CPU a third of the time (2 tasks at once decoded 1.1x the images of one; 1.4x at 1024).
ROWS_PER_BLOCK = 1024


@dataclass
class PreparedData:
    worker_config: dict  # {"streamed": StreamedData.worker_spec() or None, "in_memory": a reference to InMemoryData or None}
    datasets: dict[str, ray.data.Dataset] | None  # TorchTrainer's, when streamed


def prepare_data(cfg: DataConfig, seed: int, num_workers: int) -> PreparedData:
    """The data as the training workers take it, made once, here: streamed pipelines, or every split built in
    this process and put in Ray's object store. A bad row is named here (or by the preprocessing task that
    meets it), once, not by each worker."""
    if streamed(cfg):
        data = build_streamed_data(cfg, seed, num_workers)
        return PreparedData({"streamed": data.worker_spec(), "in_memory": None}, data.datasets)
    in_memory = build_data(cfg, seed)
    if in_memory.skipped_rows:
        print(f"[dlray] warning: {in_memory.skipped_rows} bad rows left out (data.bad_rows: skip)", flush=True)
    return PreparedData({"streamed": None, "in_memory": ray.put(in_memory)}, None)


@dataclass
class StreamedData:
    datasets: dict[str, ray.data.Dataset]  # train / val / test, each padded to a multiple of the worker count
    rows: dict[str, int]  # real rows per split
    columns: tuple[str, ...]  # the batch fields, in the order the model family's compute_loss takes them
    info: dict
    tokenizer: object | None = None

    def worker_spec(self) -> dict:
        """What a training worker needs besides its dataset shards."""
        return {"rows": self.rows, "columns": self.columns, "info": self.info, "tokenizer": self.tokenizer}


def build_streamed_data(cfg: DataConfig, seed: int, num_workers: int) -> StreamedData:
    # In order, in this process: samples taken here (the rows the source is fitted on, the padding rows)
    # are then the same first rows in every run, not whichever tasks finish first.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    source = source_of(cfg)
    listing = source.list_rows(cfg, seed)
    if listing.rows is not None:
        rows = items_dataset(listing.rows)
    else:  # one task per file, streamed through it: Ray Data cuts what it yields into blocks as they fill
        read = functools.partial(source.read, listing.filesystem, cfg=cfg, seed=seed)
        rows = items_dataset([{"path": path} for path in listing.files], rows_per_block=1).flat_map(
            lambda file: read(file["path"]), num_cpus=cfg.preprocess_num_cpus)
    splits = {split: rows.filter(lambda row, i=i: row["split"] == i) for i, split in enumerate(SPLITS)}
    classes = rows.unique(source.classes_from) if source.classes_from else None
    fitted = source.fit(cfg, listing, splits["train"].take(source.fit_rows), classes)
    # The fitted state (a tokenizer) travels inside the operator (pickled once with it), not rebuilt per block.
    datasets = {split: ds.map_batches(functools.partial(preprocess_task, source=source, cfg=cfg, fitted=fitted,
                                                        augment=split == "train" and getattr(cfg, "augment", False)),
                                      batch_size=source.batch_rows, batch_format="numpy",
                                      num_cpus=cfg.preprocess_num_cpus, concurrency=cfg.preprocess_concurrency)
                for split, ds in splits.items()}
    if source.one_sample_per_row and listing.rows is not None:
        counts = {split: sum(1 for row in listing.rows if row["split"] == i) for i, split in enumerate(SPLITS)}
    else:  # packed samples, or rows inside files: counted by running the pipeline once
        counts = {split: ds.count() for split, ds in datasets.items()}
    datasets = {split: padded(ds, counts[split], num_workers) for split, ds in datasets.items()}
    if cfg.shuffle == "full":
        datasets["train"] = datasets["train"].random_shuffle(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return StreamedData(datasets, counts, source.columns(cfg), fitted.info, fitted.tokenizer)


def preprocess_task(batch: dict, source: DataSource, cfg: DataConfig, fitted: Fitted, augment: bool) -> dict:
    """A Ray Data operator: the source's preprocess, with the weight and skipped columns the loop reads."""
    return with_weights(source.preprocess({key: value for key, value in batch.items() if key != "split"}, cfg, fitted, augment))


def train_data_config() -> ray.train.DataConfig:
    """How Ray Train splits the streamed datasets: ordered, and without locality hints (where blocks
    land varies from run to run), so that the equal split gives each worker the same rows in every run."""
    return ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True), enable_shard_locality=False)


def padded(ds: ray.data.Dataset, rows: int, num_workers: int) -> ray.data.Dataset:
    """`ds` and (-rows) % num_workers copies of its first rows with weight 0 (and nothing skipped)."""
    missing = -rows % num_workers
    if missing == 0 or rows == 0:
        return ds
    return ds.union(ds.limit(missing).map_batches(lambda batch: {**batch, "weight": np.zeros_like(batch["weight"]), "skipped": np.zeros_like(batch["skipped"])},
                                                  batch_format="numpy"))


def items_dataset(items: list[dict], rows_per_block: int = ROWS_PER_BLOCK) -> ray.data.Dataset:
    """A dataset of rows listed on the driver, in blocks of a fixed size: by default Ray sizes them by
    the CPUs free at the time, and the equal split's assignment of rows to workers follows the blocks."""
    return ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // rows_per_block)))
