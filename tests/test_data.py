"""Data: real bundled digits, stratified splits, correct sharding across ranks, image folders."""


import math

import numpy as np
import pytest
import torch
from PIL import Image

from dlray.batches import EvalShard, InMemoryBatches, ResumableSampler
from dlray.config import ConfigError, load_config
from dlray.data import SOURCES, build_data, data_config
from dlray.data.images import random_affine

from helpers import REPO


def test_digits_splits_are_disjoint_stratified_and_complete():
    data = build_data(data_config(), seed=0)
    sizes = len(data.train), len(data.val), len(data.test)
    assert sum(sizes) == 1797 and data.info["image_shape"] == (1, 8, 8) and len(data.info["class_names"]) == 10
    assert 340 <= sizes[2] <= 380 and 160 <= sizes[1] <= 200
    test_labels = torch.stack([data.test[i][1] for i in range(len(data.test))])
    assert test_labels.bincount(minlength=10).min() >= 30, "every class is in the test split"
    images = data.val.columns["image"]
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_same_seed_same_split_on_every_worker():
    a, b = build_data(data_config(), seed=7), build_data(data_config(), seed=7)
    assert torch.equal(a.test.columns["image"], b.test.columns["image"])
    assert not torch.equal(a.test.columns["image"], build_data(data_config(), seed=8).test.columns["image"])


def test_training_shards_cover_every_sample_each_epoch():
    n, world = 1437, 2
    seen = []
    for rank in range(world):
        sampler = ResumableSampler(range(n), seed=3, rank=rank, world=world)
        sampler.set_epoch(5)
        seen.append(list(sampler))
    assert len(seen[0]) == len(seen[1]), "equal steps per rank (FSDP/ZeRO-3 need lockstep)"
    assert set(seen[0]) | set(seen[1]) == set(range(n))
    assert len(seen[0]) + len(seen[1]) - n <= world - 1, "at most world-1 padding repeats"
    # A new order each epoch, the same on every rank for the same seed (so the shards stay disjoint).
    again = ResumableSampler(range(n), seed=3, rank=0, world=world)
    again.set_epoch(5)
    assert list(again) == seen[0]
    again.set_epoch(6)
    assert list(again) != seen[0]


def in_memory_epoch(rows: int, world: int, epoch: int, done: int = 0, micro_batch_size: int = 4) -> list[list[list[int]]]:
    """Each rank's micro-batches (row ids) of `epoch` from InMemoryBatches, going on after `done` of them."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml", [f"train.micro_batch_size={micro_batch_size}", "train.seed=5"])
    data = SimpleNamespace(train=TensorDataset(torch.arange(rows)), val=TensorDataset(torch.arange(2)), test=TensorDataset(torch.arange(2)))
    ranks = [InMemoryBatches(data, cfg, rank, world, torch.device("cpu")) for rank in range(world)]
    return [[batch[0].tolist() for batch, _, _ in batches.train(epoch, done)] for batches in ranks]


@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_resumed_after_some_micro_batches_trains_the_rest_of_the_same_order(world):
    whole = in_memory_epoch(rows=37, world=world, epoch=3)
    resumed = in_memory_epoch(rows=37, world=world, epoch=3, done=2)
    assert resumed == [rank[2:] for rank in whole], "the next micro-batches of the interrupted order, on every rank"
    trained = sorted(i for rank in whole for batch in rank[:2] for i in batch) + sorted(i for rank in resumed for batch in rank for i in batch)
    assert sorted(trained) == sorted(i for rank in whole for batch in rank for i in batch), "every row of the epoch once across the failure"
    assert in_memory_epoch(rows=37, world=world, epoch=4) != whole, "the next epoch is another shuffle"


def test_eval_shards_count_every_sample_exactly_once():
    dataset = list(range(11))
    shards = [EvalShard(dataset, rank, 3) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1
    counted = [item for s in shards for item, weight in (s[i] for i in range(len(s))) if weight == 1.0]
    assert sorted(counted) == dataset


def test_augmentation_changes_images_but_keeps_labels():
    data = build_data(data_config(augment=True), seed=0)
    torch.manual_seed(0)
    image, label = data.train[0]
    assert label == data.train.columns["label"][0]
    assert not torch.equal(image, data.train.columns["image"][0]) and image.shape == (1, 8, 8)
    assert build_data(data_config(augment=False), seed=0).train.augment is None


def test_a_batch_is_augmented_image_by_image():
    """Streamed preprocessing augments a batch in one call: each image still gets its own transform."""
    digit = build_data(data_config(), seed=0).train.columns["image"][0]
    torch.manual_seed(0)
    out = random_affine(torch.stack([digit] * 8 + [torch.zeros_like(digit)]))
    assert out.shape == (9, 1, 8, 8)
    assert len({tuple(image.flatten().tolist()) for image in out[:8]}) == 8, "eight draws, not one broadcast"
    assert torch.equal(out[8], torch.zeros_like(digit)), "a skipped row's zeros stay zeros"
    assert all(0.5 < image.sum() / digit.sum() < 1.5 for image in out[:8]), "shifted and turned, not lost"


def test_image_folder_loads_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = build_data(data_config(name="image_folder", path=str(tmp_path), image_size=16, channels=3, val_fraction=0.2, test_fraction=0.2), seed=0)
    assert data.info["class_names"] == ["cat", "dog"] and data.info["image_shape"] == (3, 16, 16)
    assert len(data.train) + len(data.val) + len(data.test) == 20


def test_a_corrupt_image_in_memory_is_named_or_skipped(tmp_path):
    """In memory as streamed (test_streaming): the file is named, once, by the process that builds the data."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    keys = {"name": "image_folder", "path": str(tmp_path), "val_fraction": 0.0, "test_fraction": 0.0}
    with pytest.raises(ValueError, match=r"dog/broken.png: not a readable image"):
        build_data(data_config(keys), seed=0)
    data = build_data(data_config(keys, bad_rows="skip"), seed=0)
    assert len(data.train) == 12 and data.skipped_rows == 1


def test_each_source_takes_only_its_keys_and_names_the_others():
    with pytest.raises(ValueError, match=r"data.max_seq_len applies only to text data or labelled text data or preference data "
                                         r"\(data.name 'text' or 'text_classification' or 'preference'\), got data.name 'digits'"):
        data_config(max_seq_len=64)
    with pytest.raises(ValueError, match=r"unknown key 'data.imagesize'; allowed keys here: name, .*image_size"):
        data_config(imagesize=16)
    assert data_config().image_size == 8 and data_config(name="image_folder", path="x").image_size == 32, "one default per source, in both modes"


@pytest.fixture
def toy_source_registered():
    """The toy source's registry line (tests/toy_source.py), for one test: Serve replicas and Ray workers cannot import a test module."""
    from toy_source import TOY_SOURCE

    SOURCES[TOY_SOURCE.name] = TOY_SOURCE
    try:
        yield TOY_SOURCE
    finally:
        del SOURCES[TOY_SOURCE.name]


def test_a_source_added_by_the_recipe_trains_and_streams_the_same_samples(ray_cluster, toy_source_registered):
    import ray.cloudpickle

    from dlray.config import config_from_dict
    from dlray.models import cnn
    from dlray.streaming import build_streamed_data

    import toy_source
    from single_process import evaluate, train

    cfg = config_from_dict({"model": {"family": "cnn", "dropout": 0.0}, "data": {"name": "stripes", "noise": 0.3}, "optim": {"lr": 0.01}})
    with pytest.raises(ConfigError, match="data.image_size applies only to image data \\(data.name 'digits' or 'image_folder'\\), got data.name 'stripes'"):
        config_from_dict({"data": {"name": "stripes", "image_size": 16}})
    data, model = train(cfg, steps=30, batch_size=32)
    assert evaluate(cnn.FAMILY, model, data.test)["loss"] < 0.5 * math.log(2), "well below chance"
    ray.cloudpickle.register_pickle_by_value(toy_source)  # Ray's task workers cannot import a test module
    streamed = build_streamed_data(cfg.data.model_copy(update={"streaming": True}), seed=cfg.train.seed, num_workers=2)
    val = streamed.datasets["val"].take_all()
    assert streamed.rows["val"] == len(data.val) > 0
    assert np.array_equal(np.stack([row["image"] for row in val if row["weight"] > 0]), data.val.columns["image"].numpy())
