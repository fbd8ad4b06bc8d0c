"""What several test modules share (fixtures live in conftest.py)."""

import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a W&B API key or MLflow token looks like to a leak: the killed-worker run's shell (conftest.py) holds it, no file of the run may.
SECRET = "dlray-test-secret-9c2f71d04b"


def wait_for(predicate, timeout_s: float, what, interval_s: float = 0.1):
    """Poll `predicate` until it returns something truthy, and return that; past `timeout_s`, raise
    TimeoutError saying `what` (a string, or a function giving one then) did not happen."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what() if callable(what) else what}: not within {timeout_s} s")
        time.sleep(interval_s)
    return value


def settled_metrics(ray_cluster, wanted: list[str], gauges: list[str], timeout_s: float = 90) -> dict:
    """The node's Prometheus metrics (Ray's metrics export port, scraped as Prometheus would) named in
    `wanted`, each summed over its series (every replica and application), once all are exported and the
    `gauges` among them are back to 0 (no request in flight). The export runs every few seconds."""
    import re

    import httpx

    [node] = [node for node in ray_cluster.nodes() if node["Alive"]]
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"

    def values() -> dict:
        text = httpx.get(url, timeout=10).text
        found = {}
        for name in wanted:
            samples = [float(value) for value in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.MULTILINE)]
            if samples:
                found[name] = sum(samples)
        return found

    def settled() -> dict | None:
        found = values()
        return found if found.keys() == set(wanted) and not any(found[gauge] for gauge in gauges) else None

    return wait_for(settled, timeout_s, lambda: f"every metric exported and settled; the endpoint shows {values()}", 1)


def wait_for_committed_checkpoint(run_dir, epoch: int | None = None, step: int | None = None, timeout_s: float = 300) -> dict:
    """Block until Ray Train has committed (its controller lists it in checkpoint_manager_snapshot.json) the
    checkpoint of `epoch`'s end, or one taken at `step` or later; returns its reported metrics. A checkpoint
    still being uploaded is, rightly, not one to resume from, so failures injected earlier would restart from scratch."""
    import json

    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"

    def committed() -> dict | None:
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being rewritten
            return None
        for metrics in (result["metrics"] for result in results):
            # An epoch's validation is its end where nothing validates within epochs (train.val_every_n_steps unset).
            if epoch is not None and (metrics["epoch"] > epoch or (metrics["epoch"] == epoch and metrics["report"] == "epoch")):
                return metrics
            if step is not None and metrics["global_step"] >= step:
                return metrics
        return None

    return wait_for(committed, timeout_s, f"the checkpoint of epoch {epoch}" if epoch is not None else f"a checkpoint at step {step} or later")


def ray_train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker actors of the session's Ray (processes of finished runs may linger a while)."""
    import ray
    from ray.util.state import list_actors

    # The session's own Ray by address: another Ray on this host would make "auto" ambiguous.
    return [a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


# The killed-worker runs' training (conftest.py's killed_worker_run streams it; test_train also kills one in
# memory) and the runs test_train compares them with. Augmentation off: streamed augmentation runs in Ray
# Data's tasks, whose draws a restart does not replay. Checkpoints every 7 steps of the 20-step epochs: the
# worker dies after the one at step 21 (or a later one), mid-epoch 1, and the run goes on from that step.
KILLED_RUN_TRAINING = ["train.num_epochs=4", "optim.lr=0.01", "scheduler.name=constant", "data.augment=false", "train.checkpoint_every_n_steps=7"]
KILLED_AFTER_STEP = 21


def kill_a_worker_once_committed(run_dir, lingering: set[int], step: int | None = None) -> dict:
    """Kill one of the run's Ray Train workers once a checkpoint is committed: epoch 1's, or one taken at `step` or
    later. `lingering`: the workers alive before the run started (those of runs that just finished: killing one
    restarts nothing). The committed checkpoint's metrics."""
    import psutil

    committed = wait_for_committed_checkpoint(run_dir, **({"step": step} if step else {"epoch": 1}))
    victims = [pid for pid in ray_train_worker_pids() if pid not in lingering]
    assert victims, "no live Ray Train worker of this run to kill (did it finish first?)"
    psutil.Process(victims[0]).kill()
    return committed


def validations_after_losing_a_worker(run_dir, committed: dict) -> list[dict]:
    """The validation records of a run that lost a worker after checkpoint `committed` was committed, checked: it
    restarted from that checkpoint (or a later one) and reported every validation once."""
    from dlray import reports
    from dlray.runfiles import read_history

    history = reports.epochs(read_history(run_dir))
    steps = [r["global_step"] for r in history]
    assert steps == sorted(set(steps)), f"every validation reported once, none lost: {steps}"
    resumed = [r for r in history if r["resumed_from_step"] > 0]
    assert resumed, "the restarted workers started from step 0, not from the checkpoint"
    assert resumed[0]["resumed_from_step"] >= committed["global_step"]
    return history


def fit_losing_a_worker(cfg, step: int | None = None) -> list[dict]:
    """fit(cfg) with one of its Ray Train workers killed once a checkpoint is committed: epoch 1's, or one
    taken at `step` or later (train.checkpoint_every_n_steps, mid-epoch). The run must restart from that
    checkpoint and report every validation once. Its validations' records."""
    import threading

    from dlray.train import fit, run_dir

    lingering = set(ray_train_worker_pids())
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", fit(cfg)))
    thread.start()
    committed = kill_a_worker_once_committed(run_dir(cfg), lingering, step)
    thread.join(timeout=600)
    assert outcome["result"].error is None, outcome["result"].error
    return validations_after_losing_a_worker(run_dir(cfg), committed)


def wandb_offline_runs(run_dir) -> dict[str, list[dict]]:
    """What W&B wrote offline under a run directory (<run_dir>/wandb/offline-run-*/run-<id>.wandb), by
    run id: each start of the run's records, as {"run": RunRecord, "history": [{key: value}], "artifacts": [names]}.

    A .wandb file is W&B's transaction log (what `wandb sync` uploads): a 7-byte header (":W&B", magic,
    version), then protobuf `Record`s in LevelDB's log format (32 KiB blocks of chunks, each a 7-byte
    header: CRC32, little-endian length, type 1 full / 2 first / 3 middle / 4 last). wandb 0.31 ships no
    Python reader of it."""
    import json

    from wandb.proto.wandb_internal_pb2 import Record

    runs: dict[str, list[dict]] = {}
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        start = {"run": None, "history": [], "artifacts": []}
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = Record()
                record.ParseFromString(pending)
                pending = b""
                which = record.WhichOneof("record_type")
                if which == "run":
                    start["run"] = record.run
                elif which == "history":
                    start["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
                elif which == "artifact":
                    start["artifacts"].append(record.artifact.name)
        if start["run"] is not None:  # None: the process was killed before W&B first flushed the log (every 15 s)
            runs.setdefault(start["run"].run_id, []).append(start)
    return runs


def decode_png(data: bytes):
    """A PNG's pixels as a numpy array, (H, W) or (H, W, C); fails on anything but a PNG."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image)
