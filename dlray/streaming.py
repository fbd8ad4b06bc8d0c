"""Data larger than memory: Ray Data pipelines into Ray Train.

    driver:  build_streamed_data(cfg.data, seed, num_workers) -> StreamedData   (TorchTrainer(datasets=...))
    worker:  streamed_batches(ray.train.get_dataset_shard("train"), ...)        (1/N of the rows)

Files are listed on the driver (local paths, globs and URIs alike, through pyarrow's filesystems)
and each row's split is a hash of its key (a file path, a text), so nothing is read to split.
Reading, decoding, resizing, augmenting, tokenizing and packing run as Ray Data tasks with their
own CPU budget (`data.preprocess_num_cpus`, `data.preprocess_concurrency`): on whichever nodes
have free CPUs, which on a GPU cluster are the CPU nodes and the CPUs the training workers leave.

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
import json
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import ray
import ray.data
import ray.train
import torch

from dlray.config import DataConfig
from dlray.data.image_folder import IMAGE_SUFFIXES, decode_image
from dlray.data.images import random_affine, resize_images, split_indices
from dlray.data.sources import FORMATS, SPLITS, list_files, read_rows, split_of

MEAN_STD_SAMPLE = 1024  # training images the per-channel mean and std are estimated from
TOKENIZER_SAMPLE = 20_000  # training texts a tokenizer is trained on when data.tokenizer is not given
# Listed rows (image paths, bundled texts) per block of the source dataset, so a preprocessing task's:
# Ray Data's executor notices a finished task up to 0.1 s late, which for 256 images (0.25 s) idled
# a CPU a third of the time (2 tasks at once decoded 1.1x the images of one; 1.4x at 1024).
ROWS_PER_BLOCK = 1024
TEXTS_PER_TASK = 256  # documents a packing task tokenizes together (windows cross documents within it)


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
    # In order, in this process: samples taken here (the image statistics, the tokenizer's texts, the
    # padding rows) are then the same first rows in every run, not whichever tasks finish first.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if cfg.name in ("digits", "image_folder"):
        data = image_pipeline(cfg, seed)
    elif cfg.name == "text_classification":
        data = classification_pipeline(cfg, seed)
    else:
        data = text_pipeline(cfg, seed)
    data.datasets = {split: padded(ds, data.rows[split], num_workers) for split, ds in data.datasets.items()}
    if cfg.shuffle == "full":
        data.datasets["train"] = data.datasets["train"].random_shuffle(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return data


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


def preprocess_options(cfg: DataConfig) -> dict:
    return {"num_cpus": cfg.preprocess_num_cpus, "concurrency": cfg.preprocess_concurrency}


# --- images -------------------------------------------------------------------------------------


def image_pipeline(cfg: DataConfig, seed: int) -> StreamedData:
    """Image folders (a class per sub-folder) read and decoded by tasks; the bundled digits as arrays."""
    if cfg.name == "digits":
        from dlray.data.digits import load_digits_images

        images, labels, class_names = load_digits_images()
        # The in-memory path's stratified split, so that both paths train on the same images.
        splits = split_indices(labels, cfg.val_fraction, cfg.test_fraction, seed)
        items = {name: [{"pixels": images[i].numpy(), "label": int(labels[i])} for i in idx] for name, idx in zip(SPLITS, splits)}
        filesystem, train_images = None, resize_images(images[splits[0]], cfg.image_size or 8, cfg.channels)
    else:
        filesystem, files = list_files(cfg.path, IMAGE_SUFFIXES)
        class_names = sorted({PurePosixPath(f.path).parent.name for f in files})
        if len(class_names) < 2:
            raise ValueError(f"data.path {cfg.path!r} needs at least two class sub-folders, found {class_names}")
        index = {name: i for i, name in enumerate(class_names)}
        items = {name: [] for name in SPLITS}
        for f in files:
            name = PurePosixPath(f.path).parent.name
            items[SPLITS[split_of(f"{name}/{PurePosixPath(f.path).name}", cfg.val_fraction, cfg.test_fraction, seed)]].append({"path": f.path, "label": index[name]})
        train_images = None
    size = cfg.image_size or (8 if cfg.name == "digits" else 32)
    datasets = {
        split: items_dataset(rows).map_batches(
            functools.partial(preprocess_images, filesystem=filesystem, size=size, channels=cfg.channels, augment=cfg.augment and split == "train",
                              bad_rows=cfg.bad_rows), batch_size=64, **preprocess_options(cfg))
        for split, rows in items.items()
    }
    # The per-channel statistics the model normalises with: the in-memory path's for the digits, a sample's for files.
    sample = train_images.numpy() if train_images is not None else datasets["train"].take_batch(MEAN_STD_SAMPLE, batch_format="numpy")["image"]
    info = {"image_shape": (cfg.channels, size, size), "class_names": class_names,
            "mean": sample.mean(axis=(0, 2, 3)).tolist(), "std": sample.std(axis=(0, 2, 3), ddof=1).clip(1e-3).tolist()}
    return StreamedData(datasets, {split: len(rows) for split, rows in items.items()}, ("image", "label"), info)


def preprocess_images(batch: dict, filesystem, size: int, channels: int, augment: bool, bad_rows: str) -> dict:
    """A Ray Data operator: file paths (or arrays) -> float images in [0, 1], (C, H, W) at `size`,
    the model's input convention. A file that does not decode is an error naming it, or with
    `data.bad_rows: skip` a weight-0 row counted in the epoch's `skipped_rows`."""
    if "pixels" in batch:
        images, weight = resize_images(torch.from_numpy(np.stack(batch["pixels"])), size, channels), np.ones(len(batch["label"]), dtype=np.float32)
    else:
        decoded = [read_image(filesystem, path, size, channels, bad_rows) for path in batch["path"]]
        images, weight = torch.stack([image for image, _ in decoded]), np.array([w for _, w in decoded], dtype=np.float32)
    if augment:
        images = random_affine(images)  # a skipped row's zeros stay zeros
    return {"image": images.numpy(), "label": batch["label"], "weight": weight, "skipped": (weight == 0).astype(np.int64)}


def read_image(filesystem, path: str, size: int, channels: int, bad_rows: str) -> tuple[torch.Tensor, float]:
    try:
        with filesystem.open_input_stream(path) as stream:
            return decode_image(stream.read(), size, channels), 1.0
    except Exception as err:  # PIL raises several kinds for a file that is not an image
        if bad_rows == "error":
            raise ValueError(f"{path}: not a readable image ({err}); set data.bad_rows: skip to train without such files") from None
        return torch.zeros(channels, size, size), 0.0


# --- text ---------------------------------------------------------------------------------------


def source_rows(cfg: DataConfig, fields: tuple[str, ...], described: str, suffixes, bundled) -> ray.data.Dataset:
    """The source's rows: read from its files by tasks (one file each, streamed through the task: Ray
    Data cuts what it yields into blocks as they fill), or the bundled rows."""
    if not cfg.path:
        return items_dataset(bundled())
    filesystem, files = list_files(cfg.path, suffixes)
    return items_dataset([{"path": f.path} for f in files], rows_per_block=1).flat_map(
        lambda file: read_rows(filesystem, file["path"], fields, described), num_cpus=cfg.preprocess_num_cpus)


def text_pipeline(cfg: DataConfig, seed: int) -> StreamedData:
    """Completion text (tokenized and packed into windows) or conversations (chat template, prompt masked)."""
    from dlray.data import chat, text

    if cfg.type == "chat_template":
        rows = source_rows(cfg, chat.ROW_FIELDS, "`messages` (or `prompt` and `response`)", FORMATS,
                           lambda: [{"messages": messages} for messages in chat.bundled_conversations()])
        rows = rows.map(lambda row: {"messages": chat.to_messages(row)})
        key = lambda row: json.dumps(row["messages"], sort_keys=True)  # noqa: E731
        tokenizer_texts = lambda rows: [m["content"] for row in rows for m in row["messages"]]  # noqa: E731
    else:
        rows = source_rows(cfg, (cfg.text_field,), f"data.text_field {cfg.text_field!r}", FORMATS,
                           lambda: [{cfg.text_field: document} for document in text.bundled_documents()])
        rows = rows.map(lambda row: {"text": row[cfg.text_field] or ""}).filter(lambda row: bool(row["text"]))
        key = lambda row: row["text"]  # noqa: E731
        tokenizer_texts = lambda rows: [row["text"] for row in rows]  # noqa: E731
    splits = {split: rows.filter(lambda row, i=i: split_of(key(row), cfg.val_fraction, cfg.test_fraction, seed) == i) for i, split in enumerate(SPLITS)}
    if cfg.tokenizer:
        tokenizer = text.load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = text.train_tokenizer(tokenizer_texts(splits["train"].take(TOKENIZER_SAMPLE)), cfg.vocab_size)
    if cfg.type == "chat_template" and cfg.chat_template:
        tokenizer.chat_template = chat.CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template)
    # The tokenizer travels inside the operator (pickled once with it), not rebuilt per block.
    to_samples = functools.partial(conversations if cfg.type == "chat_template" else windows, tokenizer=tokenizer, cfg=cfg)
    datasets = {split: ds.map_batches(to_samples, batch_size=TEXTS_PER_TASK, batch_format="pandas", **preprocess_options(cfg))
                for split, ds in splits.items()}
    columns = ("input_ids", "position_ids", "labels") if cfg.type == "chat_template" and cfg.sample_packing else ("input_ids", "labels")
    info = text.language_model_info(tokenizer, cfg.max_seq_len)
    return StreamedData(datasets, {split: ds.count() for split, ds in datasets.items()}, columns, info, tokenizer)


def windows(batch, tokenizer, cfg: DataConfig) -> dict:
    """A Ray Data operator: documents -> tokens, each document ended by EOS, packed into windows of
    max_seq_len + 1 tokens (dlray.data.text.pack) within each batch of TEXTS_PER_TASK documents."""
    from dlray.data.text import pack, tokenize

    packed = pack(tokenize(tokenizer, list(batch["text"])), tokenizer.eos_token_id, cfg.max_seq_len).numpy()
    return with_weights({"input_ids": packed[:, :-1], "labels": packed[:, 1:]})


def conversations(batch, tokenizer, cfg: DataConfig) -> dict:
    """A Ray Data operator: conversations -> (input_ids, [position_ids,] labels), only the assistant's tokens trained on."""
    from dlray.data import chat

    examples = [chat.tokenize_conversation(tokenizer, list(messages), cfg.max_seq_len) for messages in batch["messages"]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = (chat.pack if cfg.sample_packing else chat.pad)(examples, pad_id, cfg.max_seq_len).tensors
    names = ("input_ids", "position_ids", "labels") if cfg.sample_packing else ("input_ids", "labels")
    return with_weights({name: tensor.numpy() for name, tensor in zip(names, samples)})


def classification_pipeline(cfg: DataConfig, seed: int) -> StreamedData:
    """Labelled texts: class names from one pass over the labels, then WordPiece tokens padded to max_seq_len."""
    from dlray.data import text_classification as tc

    fields = (cfg.text_field, cfg.label_field)
    rows = source_rows(cfg, fields, f"data.text_field {cfg.text_field!r}", tc.TABLE_FORMATS,
                       lambda: [{cfg.text_field: t, cfg.label_field: label} for t, label in zip(*tc.stdlib_docstrings())])
    rows = rows.map(lambda row: {"text": row[cfg.text_field], "label": row[cfg.label_field]})
    class_names, _ = tc.class_indices(rows.unique("label"))
    index = {name: i for i, name in enumerate(class_names)}
    rows = rows.map(lambda row: {"text": row["text"], "label": index[str(row["label"])]})
    splits = {split: rows.filter(lambda row, i=i: split_of(row["text"], cfg.val_fraction, cfg.test_fraction, seed) == i) for i, split in enumerate(SPLITS)}
    tokenizer = (tc.load_tokenizer(cfg.tokenizer, "pad_token", "to pad texts with") if cfg.tokenizer
                 else tc.train_tokenizer([row["text"] for row in splits["train"].take(TOKENIZER_SAMPLE)], cfg.vocab_size))
    tokenizer.model_max_length = cfg.max_seq_len

    def encode(batch) -> dict:
        encoded = tokenizer(list(batch["text"]), padding="max_length", truncation=True, max_length=cfg.max_seq_len, return_tensors="np")
        return with_weights({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "label": np.asarray(batch["label"])})

    datasets = {split: ds.map_batches(encode, batch_format="pandas", **preprocess_options(cfg)) for split, ds in splits.items()}
    info = tc.classifier_info(tokenizer, class_names, cfg.max_seq_len)
    return StreamedData(datasets, {split: ds.count() for split, ds in datasets.items()}, ("input_ids", "attention_mask", "label"), info, tokenizer)


def with_weights(columns: dict) -> dict:
    rows = len(next(iter(columns.values())))
    return {**columns, "weight": np.ones(rows, dtype=np.float32), "skipped": np.zeros(rows, dtype=np.int64)}


# --- worker side --------------------------------------------------------------------------------


def streamed_batches(shard, columns: tuple[str, ...], batch_size: int, shuffle_seed: int | None, buffer_size: int, pin_memory: bool = False):
    """This worker's batches of a split: (fields in `columns` order, weight, skipped), on the CPU."""
    for batch in shard.iter_torch_batches(batch_size=batch_size, device="cpu", pin_memory=pin_memory, drop_last=False,
                                          local_shuffle_buffer_size=buffer_size if shuffle_seed is not None else None,
                                          local_shuffle_seed=shuffle_seed):
        yield [batch[name] for name in columns], batch["weight"], batch["skipped"]
