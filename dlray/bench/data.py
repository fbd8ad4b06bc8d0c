"""`dlray bench data`: streamed data through Ray Data, side by side.

- peak resident memory of a training worker streaming a generated image folder of ~200 MB and one
  of ~2 GB (memory must not grow with the data);
- training throughput, streamed / in memory, on the bundled digits (cnn) and help texts (gpt);
- decode + resize + augment throughput of the streaming pipeline alone, on 1 and on 2 CPUs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dlray.config import DataConfig, load_config

IMAGE_SIZE = 224  # pixels a side, as ImageNet is trained: ~150 KB per noise PNG
SMALL_MB, LARGE_MB = 200, 2000
EPOCHS = 3  # the first is warm-up and is not counted


def bench_data() -> dict:
    from dlray.train import init_ray

    init_ray()
    root = Path(tempfile.mkdtemp(prefix="dlray-bench-data-"))
    folders = {size: write_image_folder(root / f"{size}mb", size) for size in (SMALL_MB, LARGE_MB)}
    memory = {str(size): streamed_worker_peak_rss(folder, root) for size, folder in folders.items()}  # str keys: as the results' JSON has them
    throughput = {name: {mode: samples_per_sec(job, root, mode) for mode in ("false", "true")} for name, job in
                  (("digits", "jobs/cnn_digits.yaml"), ("help_texts", "jobs/debug/gpt_cpu.yaml"))}
    pipeline_images_per_sec(folders[LARGE_MB], 1)  # warm-up: the tasks' workers import torch once
    decode = {str(cpus): pipeline_images_per_sec(folders[LARGE_MB], cpus) for cpus in (1, 2)}
    return {
        "image_folder_mb": {str(size): folder_mb(folder) for size, folder in folders.items()},
        "worker_peak_rss_mib": memory,
        "large_vs_small_rss": memory[str(LARGE_MB)] / memory[str(SMALL_MB)],
        "samples_per_sec": throughput,
        "streamed_vs_in_memory": {name: rates["true"] / rates["false"] for name, rates in throughput.items()},
        "decode_images_per_sec": decode,
        "decode_2_vs_1_cpus": decode["2"] / decode["1"],
    }


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


def streamed_worker_peak_rss(folder: Path, root: Path) -> float:
    """Rank 0's peak resident memory (the loop's `peak_rss_mib`) over one epoch of the cnn on the folder, streamed."""
    from dlray.tracking import read_history
    from dlray.train import fit, run_dir

    cfg = load_config("jobs/debug/cnn_cpu.yaml", [f"run.storage_path={root / 'runs'}", f"run.name=rss-{folder.name}", "train.num_epochs=1",
                                                  "data.name=image_folder", f"data.path={folder}", "data.streaming=true", "data.image_size=16",
                                                  "data.channels=3", "train.micro_batch_size=64"])
    fit(cfg)
    return max(r["peak_rss_mib"] for r in read_history(run_dir(cfg)) if "peak_rss_mib" in r)


def samples_per_sec(job: str, root: Path, streaming: str) -> float:
    from dlray.tracking import read_history
    from dlray.train import fit, run_dir

    cfg = load_config(job, [f"run.storage_path={root / 'runs'}", f"run.name={Path(job).stem}-streaming-{streaming}", f"train.num_epochs={EPOCHS}",
                            "train.early_stopping_patience=null", f"data.streaming={streaming}"])
    fit(cfg)
    return statistics.mean(r["samples_per_sec"] for r in read_history(run_dir(cfg)) if "train_loss" in r and r["epoch"] > 0)


def pipeline_images_per_sec(folder: Path, cpus: int) -> float:
    """Images/s out of the streaming pipeline alone (read, decode, resize to 64, augment), `cpus` tasks at once."""
    from dlray.streaming import build_streamed_data

    cfg = DataConfig(name="image_folder", path=str(folder), image_size=64, channels=3, streaming=True, preprocess_concurrency=cpus)
    train = build_streamed_data(cfg, seed=0, num_workers=1).datasets["train"]
    start = time.perf_counter()
    # Counted inside the tasks: pulling every image into this process would measure this process instead.
    rows = train.map_batches(lambda batch: {"rows": [len(batch["label"])]}).sum("rows")
    return rows / (time.perf_counter() - start)
