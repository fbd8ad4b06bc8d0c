"""Benchmarks, side by side in one run, against plain PyTorch and unbatched baselines.

    dlray bench all        # or: train | cluster | tune | data | serve | diffusion | llm | checkpoint; writes benchmarks/results.md and .json
    dlray bench llm_train  # or any one benchmark by its key in BENCHMARKS

One module per group, each saying what it measures: train, cluster, tune, data, serve, diffusion, llm, checkpoint;
common holds what several groups share, report renders the results table.
"""

from __future__ import annotations

import json
from pathlib import Path

from dlray.bench.checkpoint import bench_checkpoint_upload
from dlray.bench.cluster import bench_cluster
from dlray.bench.data import bench_data, bench_text_memory
from dlray.bench.diffusion import bench_diffusion_train, bench_image_serve, bench_sample_quality, bench_sampling
from dlray.bench.llm import _read_events, bench_generate_engine, bench_generate_serve, bench_gpt_mfu, bench_gpt_train, bench_qlora_memory  # noqa: F401 (_read_events: tests)
from dlray.bench.report import machine, render_markdown
from dlray.bench.serve import bench_serve
from dlray.bench.train import bench_memory, bench_train
from dlray.bench.tune import bench_tune

# Sections of results.md below this line are written by hand (a measurement that is not a `dlray bench`
# target); a rewrite of the table keeps them.
HAND_WRITTEN = "<!-- Written by hand from here on: dlray bench rewrites the table above and keeps what follows. -->"


def run_benchmarks(what: str, out: Path) -> dict:
    """Run a group of BENCHMARKS, one benchmark of a group (by its key, e.g. llm_train) or all, and
    rewrite `out` with these results beside the earlier ones of the others."""
    selected = {key: bench for name, benchmarks in BENCHMARKS.items() for key, bench in benchmarks.items() if what in ("all", name, key)}
    if not selected:
        keys = [key for benchmarks in BENCHMARKS.values() for key in benchmarks]
        raise ValueError(f"bench target must be all, a group ({', '.join(BENCHMARKS)}) or one benchmark ({', '.join(keys)}), got {what!r}")
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    for key, bench in selected.items():
        results[key] = bench() | {"machine": machine()}  # each its own: a run of one benchmark keeps the others' machines
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    kept = out.read_text().partition(HAND_WRITTEN) if out.exists() else ("", "", "")
    out.write_text(render_markdown(results) + (f"\n{HAND_WRITTEN}{kept[2]}" if kept[1] else ""))
    print(out.read_text())
    return results


# Targets of `dlray bench`: each names the result keys it fills.
BENCHMARKS = {
    "train": {"train": bench_train, "memory": bench_memory},
    "cluster": {"cluster": bench_cluster},
    "tune": {"tune": bench_tune},
    "data": {"data": bench_data, "data_text_memory": bench_text_memory},
    "serve": {"serve": bench_serve},
    "diffusion": {"diffusion_train": bench_diffusion_train, "diffusion_sampling": bench_sampling, "diffusion_serve": bench_image_serve,
                  "diffusion_quality": bench_sample_quality},
    "llm": {"llm_train": bench_gpt_train, "llm_qlora_memory": bench_qlora_memory, "llm_engine": bench_generate_engine,
            "llm_serve": bench_generate_serve, "llm_mfu": bench_gpt_mfu},
    "checkpoint": {"checkpoint_upload": bench_checkpoint_upload},
}
