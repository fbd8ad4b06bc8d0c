"""`dlray bench tune`: ASHA vs FIFO random search (same space, same sampler seed, 3 seeds): epochs
trained until a trial first reaches TUNE_TARGET validation accuracy; and Tune's overhead: a FIFO sweep
of TUNE_OVERHEAD_TRIALS identical trials, one at a time, over that many standalone runs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from dlray.config import load_config

TRAIN_JOB_DEBUG = "jobs/debug/cnn_cpu.yaml"
SWEEP_JOB = "jobs/sweep_cnn_asha.yaml"
TUNE_SEEDS, TUNE_SAMPLES, TUNE_EPOCHS, TUNE_TARGET = (0, 1, 2), 5, 5, 0.90
TUNE_OVERHEAD_TRIALS = 4


def bench_tune() -> dict:
    """Trials run one at a time, so "epochs until the target" has one meaning: the epochs of every
    trial before the first to reach it, plus that trial's own."""
    from dlray.local_cluster import init_ray
    from dlray.train import fit
    from dlray.tune import epoch_history, run_sweep

    init_ray()
    storage = tempfile.mkdtemp(prefix="dlray-bench-tune-")
    space = {"optim.lr": {"loguniform": [1e-5, 0.3]}, "model.dropout": {"uniform": [0.0, 0.3]}}
    common = [f"run.storage_path={storage}", "scaling.num_workers=1", f"train.num_epochs={TUNE_EPOCHS}"]
    search = {}
    for scheduler in ("fifo", "asha"):
        for seed in TUNE_SEEDS:
            tune = {"num_samples": TUNE_SAMPLES, "max_concurrent_trials": 1, "scheduler": {"name": scheduler},
                    "search_alg": {"name": "random", "seed": seed}, "search_space": space}
            grid = run_sweep(_sweep_config(tune, [*common, f"run.name={scheduler}-{seed}"]))
            trials = sorted(grid, key=lambda r: r.metrics.get("trial_id", ""))  # creation order = run order
            histories = [[r["val_accuracy"] for r in epoch_history(t)] for t in trials]
            search.setdefault(scheduler, []).append({"seed": seed, "epochs_to_target": _epochs_to_target(histories), "total_epochs": sum(map(len, histories)),
                                                     "best_val_accuracy": max((max(h) for h in histories if h), default=0.0)})

    # Overhead: the same fixed-length run standalone and as every trial of a FIFO sweep.
    fixed = [*common, "train.num_epochs=3", "train.early_stopping_patience=null"]
    start = time.perf_counter()
    fit(load_config(TRAIN_JOB_DEBUG, [*fixed, "run.name=standalone"]))
    standalone_s = time.perf_counter() - start
    tune = {"num_samples": TUNE_OVERHEAD_TRIALS, "max_concurrent_trials": 1, "scheduler": {"name": "fifo"},
            "search_alg": {"name": "grid"}, "search_space": {"optim.lr": {"choice": [0.01]}}}
    start = time.perf_counter()
    run_sweep(_sweep_config(tune, [*fixed, "run.name=overhead"]))
    sweep_s = time.perf_counter() - start
    ratio = lambda key: statistics.mean(r[key] for r in search["asha"]) / statistics.mean(r[key] for r in search["fifo"])  # noqa: E731
    return {
        "space": space, "num_samples": TUNE_SAMPLES, "epochs_per_trial": TUNE_EPOCHS, "target_val_accuracy": TUNE_TARGET,
        "search": search,
        "asha_vs_fifo_epochs_to_target": ratio("epochs_to_target"),
        "asha_vs_fifo_total_epochs": ratio("total_epochs"),
        "overhead_trials": TUNE_OVERHEAD_TRIALS, "standalone_run_s": standalone_s, "sweep_s": sweep_s,
        "tune_overhead": sweep_s / (TUNE_OVERHEAD_TRIALS * standalone_s),
    }


def _sweep_config(tune: dict, overrides: list[str]):
    import yaml

    from dlray.config import config_from_dict, set_dotted

    job = yaml.safe_load(Path(SWEEP_JOB).read_text()) | {"tune": tune}
    for item in overrides:
        key, _, value = item.partition("=")
        set_dotted(job, key, yaml.safe_load(value))
    return config_from_dict(job)


def _epochs_to_target(histories: list[list[float]]) -> int:
    """Epochs trained, in run order, until some trial's validation accuracy first reaches the
    target (all of them when none does: the sweep's whole cost bought nothing better)."""
    spent = 0
    for history in histories:
        for accuracy in history:
            spent += 1
            if accuracy >= TUNE_TARGET:
                return spent
    return spent
