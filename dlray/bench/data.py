"""`dlray bench data`: streamed data through Ray Data, side by side.

- peak resident memory of a training worker streaming a generated image folder of ~200 MB and one
  of ~2 GB (memory must not grow with the data);
- training throughput, streamed / in memory, on the bundled digits (cnn) and help texts (gpt);
- decode + resize + augment throughput of the streaming pipeline alone, on 1 and on 2 CPUs, workers warm;
- (bench_text_memory) a training worker's own peak memory streaming a generated text corpus of
  ~200 MB and one of ~2 GB (parquet shards), tokenized and packed by Ray Data.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dlray.config import data_config, load_config

IMAGE_SIZE = 224  # pixels a side, as ImageNet is trained: ~150 KB per noise PNG
SMALL_MB, LARGE_MB = 200, 2000
# The first is warm-up and is not counted. Of the rest, the median: one or two epochs of a short run carry
# the one-off start of another preprocessing worker (~2 s importing torch, in a 0.5-7 s epoch here), which a
# run of real length spreads over all its epochs.
EPOCHS = 8
# Runs of each kind, taken in turn (in memory, streamed, in memory, ...): on this 2-core VM a whole run's
# speed drifts by up to a fifth from one run to the next (help texts in memory: 351 to 403 samples/s), more
# than the epochs within a run differ, so one run of each compared the drift as much as the paths.
RUNS = 2


def bench_data() -> dict:
    from dlray.local_cluster import init_ray

    init_ray()
    with scratch_dir("dlray-bench-data-") as root:
        return measure_data(root)


def measure_data(root: Path) -> dict:
    folders = {size: write_image_folder(root / f"{size}mb", size) for size in (SMALL_MB, LARGE_MB)}
    measured = {str(size): streamed_worker_peak_rss(folder, root) for size, folder in folders.items()}  # str keys: as the results' JSON has them
    memory = {size: m["peak_private_mib"] for size, m in measured.items()}
    epochs: dict = {}
    for name, job in (("digits", "jobs/cnn_digits.yaml"), ("help_texts", "jobs/debug/gpt_cpu.yaml")):
        epochs[name] = {"false": [], "true": []}
        for run in range(RUNS):
            for mode in ("false", "true"):
                epochs[name][mode] += epoch_samples_per_sec(job, root, mode, run)
    throughput = {name: {mode: statistics.median(rates) for mode, rates in modes.items()} for name, modes in epochs.items()}
    decode = {str(cpus): pipeline_images_per_sec(folders[LARGE_MB], cpus) for cpus in (1, 2)}
    return {
        "image_folder_mb": {str(size): folder_mb(folder) for size, folder in folders.items()},
        "worker_peak_private_mib": memory,
        "worker_peak_rss_mib": {size: m["peak_rss_mib"] for size, m in measured.items()},
        "large_vs_small_private": memory[str(LARGE_MB)] / memory[str(SMALL_MB)],
        "samples_per_sec": throughput,
        "epoch_samples_per_sec": epochs,
        "throughput_runs": RUNS,
        "streamed_vs_in_memory": {name: rates["true"] / rates["false"] for name, rates in throughput.items()},
        "decode_images_per_sec": decode,
        "decode_2_vs_1_cpus": decode["2"] / decode["1"],
    }


@contextlib.contextmanager
def scratch_dir(prefix: str):
    """A temporary folder for gigabytes of generated files, gone when the benchmark ends."""
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as scratch:
        yield Path(scratch)


def write_image_folder(folder: Path, megabytes: int) -> Path:
    """Noise PNGs (incompressible, so the folder's size is what it says) in two class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    written, index = 0, 0
    while written < megabytes * 2**20:
        directory = folder / f"class{index % 2}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(path, compress_level=1)
        written += path.stat().st_size
        index += 1
    return folder


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.png")) / 2**20


def streamed_worker_peak_rss(folder: Path, root: Path) -> dict:
    """Rank 0's peak memory over one epoch of the cnn on the folder, streamed: its own (the loop's
    `peak_private_mib`), and resident with the object store's pages it read (`peak_rss_mib`)."""
    from dlray import reports
    from dlray.runfiles import read_history
    from dlray.train import fit, run_dir

    cfg = load_config("jobs/debug/cnn_cpu.yaml", [f"run.storage_path={root / 'runs'}", f"run.name=rss-{folder.name}", "train.num_epochs=1",
                                                  "data.name=image_folder", f"data.path={folder}", "data.streaming=true", "data.image_size=16",
                                                  "data.channels=3", "train.micro_batch_size=64"])
    fit(cfg)
    epochs = reports.epochs(read_history(run_dir(cfg)))
    return {key: max(r[key] for r in epochs) for key in ("peak_private_mib", "peak_rss_mib")}


def epoch_samples_per_sec(job: str, root: Path, streaming: str, run: int) -> list[float]:
    from dlray import reports
    from dlray.runfiles import read_history
    from dlray.train import fit, run_dir

    cfg = load_config(job, [f"run.storage_path={root / 'runs'}", f"run.name={Path(job).stem}-streaming-{streaming}-{run}", f"train.num_epochs={EPOCHS}",
                            "train.early_stopping_patience=null", f"data.streaming={streaming}"])
    fit(cfg, verbose=False)  # as `dlray train` runs
    return [r["samples_per_sec"] for r in reports.epochs(read_history(run_dir(cfg))) if r["epoch"] > 0]


def pipeline_images_per_sec(folder: Path, cpus: int) -> float:
    """Images/s out of the streaming pipeline alone (read, decode, resize to 64, augment), `cpus` tasks
    at once, over its second pass: the first starts the tasks' workers (~2 s each to import torch),
    which a training run then keeps from epoch to epoch."""
    from dlray.streaming import build_streamed_data

    cfg = data_config(name="image_folder", path=str(folder), image_size=64, channels=3, streaming=True, preprocess_concurrency=cpus)
    train = build_streamed_data(cfg, seed=0, num_workers=1).datasets["train"]
    for _ in train.iter_internal_ref_bundles():
        pass
    start = time.perf_counter()
    # Counted from the blocks' metadata: pulling every image into this process, or counting them in
    # tasks of another operator, would measure this process or that operator's CPUs instead.
    rows = sum(bundle.num_rows() for bundle in train.iter_internal_ref_bundles())
    return rows / (time.perf_counter() - start)


# The images' sizes. Ray Data tasks tokenize ~3 MB of text a second here, and dlray reads a corpus twice
# (counting windows, then training): ~25 minutes on this 2-core machine. Not less: a worker's memory
# settles after ~100 MB of text (~2,400 batches), so a smaller corpus would end while it still grows.
TEXT_SMALL_MB, TEXT_LARGE_MB = 200, 2000
TEXT_SHARD_MB = 100  # parquet shards of a generated corpus, as pretraining corpora come
DOCUMENT_CHARS = 2000
TEXT_BATCH = 256


def bench_text_memory() -> dict:
    """The text half of the memory benchmark. Training gpt/debug on every window of 2 GB of text would
    take this CPU most of two days (~700 M tokens at ~15k tokens/s), so the worker here runs dlray's streaming
    data path alone: a Ray Train worker reading its shard through dlray.streaming.streamed_batches
    (as the loop does, shuffle buffer and all) with no model step, TEXT_BATCH windows at a time (the
    loop's 16 would measure iteration's per-batch cost for an hour)."""
    from dlray.local_cluster import init_ray

    init_ray()
    with scratch_dir("dlray-bench-text-") as root:
        return measure_text_memory(root)


def measure_text_memory(root: Path) -> dict:
    corpora = {size: write_text_corpus(root / f"{size}mb", size) for size in (TEXT_SMALL_MB, TEXT_LARGE_MB)}
    measured = {str(size): streamed_text_worker(corpus, root) for size, corpus in corpora.items()}
    private = {size: m["peak_private_mib"] for size, m in measured.items()}
    return {"text_mb": {str(size): size for size in corpora}, "parquet_mb": {str(size): sum(f.stat().st_size for f in c.glob("*.parquet")) / 2**20 for size, c in corpora.items()},
            "worker": measured, "worker_peak_private_mib": private, "large_vs_small_private": private[str(TEXT_LARGE_MB)] / private[str(TEXT_SMALL_MB)]}


def write_text_corpus(folder: Path, megabytes: int) -> Path:
    """Parquet shards of DOCUMENT_CHARS-character documents cut at random from the bundled help texts
    (so the tokenizer dlray trains on a sample of them is one fit for the rest), ~`megabytes` MB of text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dlray.data.text import bundled_documents

    source = "\n\n".join(bundled_documents())
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for shard, first_mb in enumerate(range(0, megabytes, TEXT_SHARD_MB)):
        starts = rng.integers(0, len(source) - DOCUMENT_CHARS, min(TEXT_SHARD_MB, megabytes - first_mb) * 2**20 // DOCUMENT_CHARS)
        pq.write_table(pa.table({"text": [source[s:s + DOCUMENT_CHARS] for s in starts]}), folder / f"shard-{shard:03d}.parquet")
    return folder


def streamed_text_worker(corpus: Path, root: Path) -> dict:
    """One Ray Train worker streaming jobs/debug/gpt_cpu.yaml's training split of `corpus` (the
    tokenizer trained on a sample, the windows packed by Ray Data tasks): its peak own and resident
    memory (dlray.loop.private_mib, peak_rss_mib), windows read and seconds taken, which it writes to
    a file (Ray Train's Result keeps only reports with a checkpoint)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dlray.streaming import build_streamed_data, train_data_config

    cfg = load_config("jobs/debug/gpt_cpu.yaml", [f"data.path={corpus}", "data.streaming=true", "data.val_fraction=0.01", "data.test_fraction=0.0"])
    streamed = build_streamed_data(cfg.data, seed=cfg.train.seed, num_workers=1)
    out = root / f"text-{corpus.name}.json"
    trainer = TorchTrainer(
        _stream_text_shard, train_loop_config={"columns": streamed.columns, "buffer": cfg.data.local_shuffle_buffer_size, "out": str(out)},
        datasets={"train": streamed.datasets["train"]},
        dataset_config=train_data_config(),
        scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(name=f"text-{corpus.name}", storage_path=str(root / "runs")))
    if error := trainer.fit().error:
        raise RuntimeError(f"streaming {corpus} failed: {error}")
    return json.loads(out.read_text()) | {"training_windows": streamed.rows["train"]}


def _stream_text_shard(config: dict) -> None:
    import ray.train

    from dlray.batches import streamed_batches
    from dlray.loop import peak_rss_mib, private_mib

    start, windows, peak_private = time.perf_counter(), 0, private_mib()
    for _, weight, _ in streamed_batches(ray.train.get_dataset_shard("train"), tuple(config["columns"]), TEXT_BATCH, 0, config["buffer"]):
        windows += int(weight.sum())
        peak_private = max(peak_private, private_mib())  # as the loop samples it, once a step
    Path(config["out"]).write_text(json.dumps({"peak_private_mib": peak_private, "peak_rss_mib": peak_rss_mib(), "windows": windows,
                                               "seconds": time.perf_counter() - start}))
