"""`dlray bench cluster`: time from `ray job submit` to the first optimizer step, and samples/s of the
same 2-worker job with its ranks on 2 nodes / on 1 node, on a cluster/local.sh cluster (head + 1 worker node).
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dlray.bench.train import TRAIN_JOB
from dlray.config import load_config
from dlray.local_cluster import RAY, local_cluster

CLUSTER_EPOCHS = 6  # more than TRAIN_EPOCHS: a 2-core machine's epoch-to-epoch noise averages out


def bench_cluster() -> dict:
    from dlray import reports
    from dlray.runfiles import read_history

    storage = tempfile.mkdtemp(prefix="dlray-bench-")
    placements = {"1_node": ("STRICT_PACK", 1), "2_nodes": ("STRICT_SPREAD", 2)}
    first_step: dict[str, list[float]] = {label: [] for label in placements}
    rates = {label: 0.0 for label in placements}
    # Head + 1 worker node, 2 CPUs each: the 2-worker job fits on one node or spreads over two.
    with local_cluster(worker_nodes=1, cpus_per_node=2, port_base=25000) as cluster:
        for attempt in range(2):  # interleaved, best of two, as in bench_train
            for label, (placement, nodes) in placements.items():
                name = f"bench-{label}-{attempt}"
                command = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--", "dlray", "train", TRAIN_JOB,
                           f"run.storage_path={storage}", f"run.name={name}", f"train.num_epochs={CLUSTER_EPOCHS}", "train.early_stopping_patience=null",
                           "scaling.num_workers=2", f"scaling.placement_strategy={placement}"]
                submitted_at = time.time()
                done = subprocess.run(command, env=cluster.client_env(), capture_output=True, text=True, timeout=1200)
                if done.returncode:
                    raise RuntimeError(f"benchmark job {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                epochs = reports.epochs(read_history(Path(storage) / name))
                first_step[label].append(epochs[0]["first_step_unix_time"] - submitted_at)
                if epochs[0]["num_nodes"] != nodes:
                    raise RuntimeError(f"benchmark job {name} ran on {epochs[0]['num_nodes']} node(s), not {nodes}")
                rates[label] = max(rates[label], statistics.mean(r["samples_per_sec"] for r in epochs[1:]))
    return {
        "model": f"cnn/{load_config(TRAIN_JOB).model.flavor}, 2 workers",
        "submit_to_first_step_s": first_step,
        "samples_per_sec": rates,
        "2_nodes_vs_1_node": rates["2_nodes"] / rates["1_node"],
    }
