"""dlray.watchdog on a real local Ray, in one run (one Ray Train start-up): a rank slowed by a sleep is named as a
straggler; then that rank is stopped (SIGSTOP), which the watchdog catches from outside within run.hang_timeout_s:
every rank's stack written by py-spy, the stopped ranks named on the console, killed, and the run ends. And a
rank's side against the watchdog actor alone: what beats in a validation and a checkpoint, and what is silence."""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from ray.train import TrainingFailedError

from dlray import reports
from dlray.config import load_config
from dlray.console import Console
from dlray.runfiles import read_history
from dlray.train import fit, run_dir
from dlray.watchdog import WatchdogActor, top_frame

from helpers import REPO, ray_train_worker_pids, wait_for

HANG_TIMEOUT_S = 3



# A rank's side, in a process of its own (the watchdog kills the rank's process: never pytest's): a validation whose
# batches take 3 s in all and a 4 s save, with a 2 s timeout; what the watchdog holds then; then silence.
RANK = """
import sys, time, ray
from dlray.watchdog import Heartbeat
ray.init(address=sys.argv[1])
beats = Heartbeat(ray.get_actor(sys.argv[2], namespace="dlray-tests"), 0, "node")
def validation_batches():
    for batch in range(6):
        time.sleep(0.5)
        yield batch
assert list(beats.through(validation_batches(), 7)) == list(range(6))
with beats.alive(7):
    time.sleep(4)  # a checkpoint's save and upload
print("watched", ray.get(beats.actor.status.remote()), flush=True)
time.sleep(600)
"""


def test_a_validation_or_a_checkpoint_longer_than_the_timeout_is_not_a_hang_but_silence_is(ray_cluster, tmp_path):
    name = f"watchdog-{os.getpid()}"
    actor = WatchdogActor.options(name=name, namespace="dlray-tests").remote(2.0, str(tmp_path))
    rank = subprocess.Popen([sys.executable, "-c", RANK, ray_cluster.get_runtime_context().gcs_address, name],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []  # Ray's own lines first
        while (line := rank.stdout.readline()) and not line.startswith("watched"):
            lines.append(line)
        assert line == "watched {0: 7}\n", "".join(lines) + line  # still watched after both, at its step
        assert rank.wait(timeout=60) == -signal.SIGKILL, "the silent rank was not killed"
        (hang,) = Path(tmp_path, "hangs").iterdir()
        assert "rank 0 on node, after step 7" in (hang / "summary.txt").read_text()
        assert ray.get(actor.status.remote()) == {}
    finally:
        ray.kill(actor)
        rank.kill()


@pytest.mark.slow  # ~35 s idle, ~55 s on the 2 shared cores: a Ray Train run of ~10 s of steps, a hang, its dumps
def test_a_slow_rank_is_named_a_straggler_and_a_stopped_one_is_caught_with_every_ranks_stack(ray_cluster, storage, monkeypatch):
    monkeypatch.setenv("DLRAY_TEST_SLOW_RANK", "1:0.05")  # each of rank 1's batches 50 ms late (passed on by dlray.train.worker_env)
    cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml", [f"run.storage_path={storage}", "run.name=watched", "precision=fp32",
                                                         f"run.hang_timeout_s={HANG_TIMEOUT_S}", "train.num_epochs=50"])
    lingering = set(ray_train_worker_pids())
    out, outcome = io.StringIO(), {}

    def train():
        with Console(cfg, stream=out) as console:
            try:
                fit(cfg, console=console)
            except TrainingFailedError as error:
                outcome["error"] = error
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=train)
    thread.start()
    wait_for(lambda: "is a straggler" in out.getvalue() or "ended" in outcome, 300, lambda: f"no straggler named: {out.getvalue()}")
    text = out.getvalue()
    assert "[dlray] warning: rank 1 on " in text and "rank 0 on" not in text, text
    victim = next(pid for pid in ray_train_worker_pids() if pid not in lingering)
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        thread.join(timeout=120)
        assert "ended" in outcome, "the run did not end after a rank stopped"
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGKILL)
    assert "error" in outcome, "a run whose ranks were killed as hung (run.max_failures=0) fails"
    assert outcome["ended"] - stopped < HANG_TIMEOUT_S + 60
    (hang,) = Path(run_dir(cfg), "hangs").iterdir()
    summary = (hang / "summary.txt").read_text()
    assert f"no optimizer step for {HANG_TIMEOUT_S} s" in summary and summary.strip() in out.getvalue(), (summary, out.getvalue())
    for rank in (0, 1):
        stack = (hang / f"rank-{rank}.txt").read_text()
        assert "Thread " in stack and "train_loop_per_worker (" in stack, stack  # Python frames, the stopped rank's too
        assert f"rank {rank} on " not in summary or top_frame(stack) in summary
    epochs = reports.epochs(read_history(run_dir(cfg)))
    assert epochs and all(r["data_time_spread"] > 0.04 for r in epochs), [r["data_time_spread"] for r in epochs]
