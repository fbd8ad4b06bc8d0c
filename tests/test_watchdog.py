"""dlray.watchdog on a real local Ray: a stopped rank is caught from outside within run.hang_timeout_s, every rank's
stack is written by py-spy and the run ends; a rank slowed by a sleep is named as a straggler."""

import io
import os
import signal
import threading
import time
from pathlib import Path

import psutil

from dlray import reports
from dlray.config import load_config
from dlray.console import Console
from dlray.runfiles import read_history
from dlray.train import fit, run_dir
from dlray.watchdog import top_frame

from helpers import REPO, ray_train_worker_pids, wait_for_committed_checkpoint

HANG_TIMEOUT_S = 3


def debug_job(storage, name, *overrides):
    return load_config(REPO / "jobs/debug/cnn_cpu.yaml", [f"run.storage_path={storage}", f"run.name={name}", "precision=fp32", *overrides])


def test_a_stopped_rank_is_caught_its_stack_and_the_others_written_and_the_run_ends(ray_cluster, storage):
    from ray.train import TrainingFailedError

    cfg = debug_job(storage, "hang", f"run.hang_timeout_s={HANG_TIMEOUT_S}", "train.num_epochs=50", "train.checkpoint_every_n_steps=3")
    lingering = set(ray_train_worker_pids())
    outcome = {}

    def train():
        try:
            fit(cfg)
        except TrainingFailedError as error:
            outcome["error"] = error
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=train)
    thread.start()
    wait_for_committed_checkpoint(run_dir(cfg), step=3, timeout_s=300)
    victim = next(pid for pid in ray_train_worker_pids() if pid not in lingering)
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        thread.join(timeout=120)
        assert "ended" in outcome, "the run did not end after a rank stopped"
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGKILL)
    assert "error" in outcome, "a run whose rank was killed as hung (run.max_failures=0) must fail"
    assert outcome["ended"] - stopped < HANG_TIMEOUT_S + 60
    (hang,) = Path(run_dir(cfg), "hangs").iterdir()
    summary = (hang / "summary.txt").read_text()
    assert f"no optimizer step for {HANG_TIMEOUT_S} s" in summary, summary
    for rank in (0, 1):
        stack = (hang / f"rank-{rank}.txt").read_text()
        assert "Thread " in stack and "train_loop_per_worker (" in stack, stack  # Python frames, the stopped rank's too
        assert f"rank {rank} on " not in summary or top_frame(stack) in summary


def test_a_slowed_rank_is_named_as_a_straggler(ray_cluster, storage, monkeypatch):
    monkeypatch.setenv("DLRAY_TEST_SLOW_RANK", "1:0.05")  # passed on to the workers (dlray.train.worker_env)
    cfg = debug_job(storage, "straggler", "train.num_epochs=4", "run.hang_timeout_s=60")
    out = io.StringIO()
    with Console(cfg, stream=out) as console:
        fit(cfg, console=console)
    text = out.getvalue()
    assert "[dlray] warning: rank 1 on " in text and "is a straggler" in text, text
    assert "rank 0 on" not in text, text
    epochs = reports.epochs(read_history(run_dir(cfg)))
    assert all(r["data_time_spread"] > 0.04 for r in epochs), [r["data_time_spread"] for r in epochs]
