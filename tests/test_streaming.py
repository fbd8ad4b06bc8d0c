"""Streamed data (dlray.streaming) on the session's local Ray: sharding, sources, bad data.

Ray Train runs of streamed data are in test_train (the resume and in-memory comparisons).
"""

import json
import math
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from dlray.batches import StreamedBatches, streamed_batches
from dlray.config import load_config
from dlray.data import data_config
from dlray.data.rows import list_files, read_rows, streams
from dlray.streaming import build_streamed_data, padded

from helpers import REPO


def on_every_rank(ds, world: int, consume) -> list:
    """consume(rank, shard) -> what that rank took of one epoch, for every rank at once, as Ray Train's workers consume their shards."""
    ds.context.execution_options = ray.data.ExecutionOptions(preserve_order=True)  # as dlray.train's DataConfig asks
    shards = ds.streaming_split(world, equal=True)
    out = [None] * world

    def run(rank):
        out[rank] = consume(rank, shards[rank])

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def epoch_of_every_rank(ds, world: int, batch_size: int, seed: int) -> list[list[tuple[list[int], list[float]]]]:
    """Each rank's batches (row ids, weights) of one epoch."""
    return on_every_rank(ds, world, lambda rank, shard: [(ids.tolist(), weight.tolist())
                                                         for (ids,), weight, _ in streamed_batches(shard, ("id",), batch_size, seed, 8)])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_is_seen_exactly_once_per_epoch_in_the_same_order_on_every_run(ray_cluster, world):
    rows, batch_size = 23, 4  # neither divides: padding and a last partial batch
    ds = ray.data.range(rows, override_num_blocks=5).map_batches(
        lambda b: {"id": b["id"], "weight": np.ones(len(b["id"]), np.float32), "skipped": np.zeros(len(b["id"]), np.int64)})
    ds = padded(ds, rows, world)
    epoch = epoch_of_every_rank(ds, world, batch_size, seed=0)
    seen = [i for rank in epoch for ids, weights in rank for i, w in zip(ids, weights) if w > 0]
    assert sorted(seen) == list(range(rows))
    assert len({len(rank) for rank in epoch}) == 1, "ranks took different numbers of steps"
    padding = [w for rank in epoch for _, weights in rank for w in weights if w == 0]
    assert len(padding) == -rows % world
    assert epoch_of_every_rank(ds, world, batch_size, seed=0) == epoch  # a resumed run replays the epoch
    assert epoch_of_every_rank(ds, world, batch_size, seed=1) != epoch  # the next epoch is another shuffle


@pytest.mark.parametrize("world", [1, 2])
def test_a_streamed_epoch_resumed_after_some_micro_batches_trains_every_row_once(ray_cluster, world):
    """What a run resumed mid-epoch takes (dlray.batches.StreamedBatches.train with `done`): the rest of the
    interrupted epoch's order on every rank, so the rows trained before and after the failure are the epoch's, each once."""
    rows, done = 45, 3

    def epoch(done: int) -> list[list[list[int]]]:
        ds = padded(ray.data.range(rows, override_num_blocks=5).map_batches(
            lambda b: {"id": b["id"], "weight": np.ones(len(b["id"]), np.float32), "skipped": np.zeros(len(b["id"]), np.int64)}), rows, world)
        cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml", ["train.micro_batch_size=4", "data.local_shuffle_buffer_size=8"])

        def consume(rank, shard):
            batches = StreamedBatches({"rows": {"train": rows}, "columns": ("id",)}, cfg, world, torch.device("cpu"), shard=lambda split: shard)
            return [[i for i, w in zip(ids.tolist(), weight.tolist()) if w > 0] for (ids,), weight, _ in batches.train(epoch=1, done=done)]

        return on_every_rank(ds, world, consume)

    whole, resumed = epoch(done=0), epoch(done=done)
    assert resumed == [rank[done:] for rank in whole], "the next micro-batches of the interrupted order, on every rank"
    before = [i for rank in whole for batch in rank[:done] for i in batch]
    after = [i for rank in resumed for batch in rank for i in batch]
    assert sorted(before + after) == list(range(rows)), "every row once across the failure (padding rows, weight 0, left out)"


def write_image_folder(root, per_class=12, size=10):
    rng = np.random.default_rng(0)
    for name in ("circle", "square"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_image_folder_streams_every_split_and_names_a_corrupt_file(ray_cluster, tmp_path):
    write_image_folder(tmp_path / "images")
    (tmp_path / "images/square/broken.png").write_bytes(b"not a png")
    cfg = data_config(name="image_folder", path=str(tmp_path / "images"), image_size=8, channels=3, val_fraction=0.2, test_fraction=0.2, streaming=True)
    data = build_streamed_data(cfg.model_copy(update={"bad_rows": "skip"}), seed=0, num_workers=2)
    assert data.info["class_names"] == ["circle", "square"] and data.info["image_shape"] == (3, 8, 8)
    assert sum(data.rows.values()) == 25 and all(data.rows.values())
    batches = [data.datasets[split].take_batch(100) for split in ("train", "val", "test")]
    assert sum(int(b["skipped"].sum()) for b in batches) == 1  # the broken file: a weight-0 row, counted
    assert all(b["image"].shape[1:] == (3, 8, 8) and 0 <= b["image"].min() and b["image"].max() <= 1 for b in batches)
    with pytest.raises(Exception, match="broken.png: not a readable image"):
        for split in ("train", "val", "test"):
            build_streamed_data(cfg, seed=0, num_workers=2).datasets[split].materialize()


def test_parquet_shards_stream_as_packed_token_windows(ray_cluster, tmp_path):
    from dlray.data.text import bundled_documents

    documents = bundled_documents()
    (tmp_path / "shards").mkdir()
    for shard in range(3):
        pq.write_table(pa.table({"body": documents[shard::3]}), tmp_path / f"shards/part-{shard}.parquet")
    cfg = data_config(name="text", path=str(tmp_path / "shards/*.parquet"), text_field="body", max_seq_len=32, vocab_size=512, streaming=True)
    data = build_streamed_data(cfg, seed=0, num_workers=3)
    assert data.columns == ("input_ids", "labels") and data.info["vocab_size"] == 512
    train = data.datasets["train"].take_batch(8)
    assert train["input_ids"].shape == (8, 32)
    assert (train["input_ids"][:, 1:] == train["labels"][:, :-1]).all()  # labels are the inputs shifted by one
    assert data.tokenizer.decode(train["input_ids"][0]).strip()
    # The rows padding each split to a multiple of 3 workers are the only weight-0 rows.
    for split, ds in data.datasets.items():
        assert ds.count() == data.rows[split] + (-data.rows[split] % 3)
        assert ds.sum("weight") == data.rows[split]


def test_a_text_corpus_gives_the_same_tokenizer_samples_and_test_loss_in_memory_and_streamed(ray_cluster, tmp_path):
    """One source, two modes: the same documents in each split, the tokenizer trained on the same training
    documents, the same windows; so a model trained a few steps scores the same test loss on either test split."""
    import torch

    from dlray.config import config_from_dict
    from dlray.data import build_data
    from dlray.data.text import bundled_documents
    from dlray.models import FAMILIES

    documents = bundled_documents()
    (tmp_path / "corpus").mkdir()
    for shard in range(2):
        (tmp_path / f"corpus/part-{shard}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in documents[shard::2]))
    keys = {"name": "text", "path": str(tmp_path / "corpus"), "max_seq_len": 32, "vocab_size": 400}
    in_memory = build_data(data_config(keys), seed=3)
    streamed = build_streamed_data(data_config(keys, streaming=True), seed=3, num_workers=2)
    assert in_memory.tokenizer.backend_tokenizer.to_str() == streamed.tokenizer.backend_tokenizer.to_str()
    assert in_memory.info == streamed.info and in_memory.columns == streamed.columns

    def streamed_split(split):
        batch = streamed.datasets[split].take_all()
        real = [row for row in batch if row["weight"] > 0]
        return {name: torch.as_tensor(np.stack([row[name] for row in real])) for name in streamed.columns}

    for split in ("train", "test"):
        got, want = streamed_split(split), getattr(in_memory, split).columns
        assert len(got["input_ids"]) == len(want["input_ids"]) == streamed.rows[split] > 0
        assert sorted(map(tuple, got["input_ids"].tolist())) == sorted(map(tuple, want["input_ids"].tolist())), split

    cfg = config_from_dict({"model": {"family": "gpt", "dropout": 0.0}, "data": keys})
    gpt = FAMILIES["gpt"]
    torch.manual_seed(0)
    model = gpt.build(cfg.model.model_dump(), in_memory.info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = in_memory.train.columns
    for step in range(10):
        rows = torch.arange(step * 16, step * 16 + 16) % len(train["input_ids"])
        gpt.training_loss(model, [train["input_ids"][rows], train["labels"][rows]], "model").backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        losses = [gpt.compute_loss(model, [columns["input_ids"], columns["labels"]])["loss"].mean().item()
                  for columns in (in_memory.test.columns, streamed_split("test"))]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] < math.log(in_memory.info["vocab_size"]), losses


def test_a_malformed_jsonl_line_is_named_before_training(ray_cluster, tmp_path):
    good = [json.dumps({"text": f"row {i}", "label": i % 2}) for i in range(8)]
    (tmp_path / "texts.jsonl").write_text("\n".join(good[:5] + ['{"text": "cut off', *good[5:]]))
    cfg = data_config(name="text_classification", path=str(tmp_path / "texts.jsonl"), streaming=True, vocab_size=300)
    with pytest.raises(Exception, match=r"texts.jsonl, line 6: not valid JSON"):
        build_streamed_data(cfg, seed=0, num_workers=2)


def test_a_file_is_read_as_its_rows_are_taken_not_whole(tmp_path):
    """A task streams one file however large: the first rows come out before the rest is read (a
    broken last line is not reached), a table a record batch at a time; a missing column named before any row."""
    import pyarrow.fs

    local = pyarrow.fs.LocalFileSystem()
    (tmp_path / "big.jsonl").write_text("\n".join([json.dumps({"text": f"row {i}"}) for i in range(3)] + ["{broken"]))
    rows = read_rows(local, str(tmp_path / "big.jsonl"), ("text",), "data.text_field 'text'")
    assert [next(rows)["text"], next(rows)["text"]] == ["row 0", "row 1"]
    next(rows)
    with pytest.raises(ValueError, match="big.jsonl, line 4: not valid JSON"):
        next(rows)

    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="latin1.jsonl, after line 0: not UTF-8 text"):
        list(read_rows(local, str(tmp_path / "latin1.jsonl"), ("text",), "data.text_field 'text'"))

    pq.write_table(pa.table({"text": [f"t{i}" for i in range(3000)]}), tmp_path / "big.parquet", row_group_size=1000)
    rows = read_rows(local, str(tmp_path / "big.parquet"), ("text",), "data.text_field 'text'")
    assert [row["text"] for row in rows] == [f"t{i}" for i in range(3000)]  # across record batches, in order
    (tmp_path / "other.csv").write_text("body,label\nx,1\n")
    with pytest.raises(ValueError, match="other.csv: data.text_field 'text' is not a column; it has \\['body', 'label'\\]"):
        next(read_rows(local, str(tmp_path / "other.csv"), ("text",), "data.text_field 'text'"))


def test_the_rule_streams_uris_and_large_paths_and_loads_the_rest(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert not streams(None, None, {".jsonl"})  # bundled data loads in memory
    assert not streams(str(tmp_path), None, {".jsonl"})  # a small local folder too
    assert streams(f"file://{tmp_path}", None, {".jsonl"})  # a URI always streams
    assert streams(str(tmp_path), True, {".jsonl"}) and not streams(f"file://{tmp_path}", False, {".jsonl"})
    filesystem, files = list_files(f"file://{tmp_path}/*.jsonl", {".jsonl"})
    assert [f.base_name for f in files] == ["a.jsonl"]
    with pytest.raises(FileNotFoundError, match="holds no"):
        list_files(str(tmp_path / "*.parquet"), {".parquet"})


def test_conversations_and_labelled_texts_stream_in_the_families_batch_layout(ray_cluster, tmp_path):
    chats = [{"prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}."} for i in range(40)]
    (tmp_path / "chats.jsonl").write_text("\n".join(map(json.dumps, chats)))
    cfg = data_config(name="text", type="chat_template", chat_template="zephyr", path=str(tmp_path / "chats.jsonl"), max_seq_len=48,
                     sample_packing=True, vocab_size=300, streaming=True)
    data = build_streamed_data(cfg, seed=0, num_workers=2)
    assert data.columns == ("input_ids", "position_ids", "labels")
    batch = data.datasets["train"].take_batch(4)
    trained = batch["labels"] != -100
    assert trained.any() and not trained.all()  # the assistant's tokens only
    assert (batch["position_ids"][:, 0] == 0).all()

    (tmp_path / "labelled.csv").write_text("text,label\n" + "\n".join(f"sample text number {i},{'ab'[i % 2]}" for i in range(60)))
    cfg = data_config(name="text_classification", path=str(tmp_path / "labelled.csv"), max_seq_len=16, vocab_size=300, streaming=True)
    data = build_streamed_data(cfg, seed=0, num_workers=2)
    assert data.columns == ("input_ids", "attention_mask", "label") and data.info["class_names"] == ["a", "b"]
    batch = data.datasets["train"].take_batch(8)
    assert batch["input_ids"].shape == (8, 16) and set(batch["label"]) <= {0, 1}
    assert sum(data.rows.values()) == 60


def test_a_cluster_with_no_cpu_left_for_preprocessing_is_warned_of():
    from dlray.config import load_config
    from dlray.train import preprocessing_cpus_warning

    from helpers import REPO

    cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml", ["data.streaming=true"])  # 2 workers of 1 CPU
    assert preprocessing_cpus_warning(cfg, cluster_cpus=3) is None
    warning = preprocessing_cpus_warning(cfg, cluster_cpus=2)
    assert "the 2 training workers hold 2 of this cluster's 2 CPUs" in warning and "wait for ever" in warning
    cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml", ["data.streaming=true", "scaling.resources_per_worker={CPU: 0.5}"])
    assert preprocessing_cpus_warning(cfg, cluster_cpus=2) is None
