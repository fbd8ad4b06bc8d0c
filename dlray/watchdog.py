"""Hangs and stragglers, noticed from outside the ranks: a small Ray actor that every rank tells, about once a
second, how far it got and how long it waited for its batches (its own time: dlray.step.timed).

    watchdog = Watchdog.start(cfg, run_dir, console_queue)   # driver (dlray.train.fit); None when run.hang_timeout_s is null
    train_loop_config["watchdog"] = watchdog.actor
    beats = Heartbeat(config["watchdog"], rank, node)        # worker (dlray.loop), after any checkpoint is restored
    beats.step(global_step, totals)                          # after each optimizer step (and validation: no totals); one call a second at most
    val_batches = beats.through(val_batches, global_step)    # a validation beats as its batches go by
    with beats.alive(global_step): save()                    # a checkpoint or a sample grid: beats from a thread while it runs
    beats.done()                                             # the budget's end: the test split and the final report may take long
    watchdog.stop()

A rank that reports no step for run.hang_timeout_s seconds (a deadlocked collective, a stuck data read, a
stopped process) makes the watchdog take every rank's stack with py-spy, on the rank's own node (a Ray task
pinned there), write one file per rank under <run dir>/hangs/<time>/, say on the console which ranks stopped,
where, and in which frame, and kill the ranks that stopped: Ray Train then restarts the worker group from the
last checkpoint (run.max_failures), or the run ends with that message. py-spy runs with --nonblocking, which
reads a stopped (SIGSTOP) process too; its blocking mode fails to suspend one.

A validation is progress too: its batches beat as they go, so a long one is not a hang, but a collective
deadlocked in it is. A checkpoint's save and upload and a generative family's sample grid show no progress
from inside (slow storage is not a hang), so a thread beats while they run: a rank stuck there is caught by
the process group's own timeout instead (NCCL's watchdog: Ray Train's TorchConfig.timeout_s, 30 min), and
the ranks it blocks at their next collective keep beating only while they too are saving.

A rank that waits for its batches STRAGGLER_RATIO times as long as the median of the others, by at least
STRAGGLER_SHARE of a step, over a window, is named as a straggler once, until it catches up. Its own data time,
not its step time: in synchronous training every rank's step takes the slowest's time (the others wait in a
collective). A GPU whose kernels run slower is not seen this way (that needs CUDA events around the compute).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

BEAT_INTERVAL_S = 1.0  # a rank tells the watchdog at most this often: one actor call a second, whatever the step rate
STRAGGLER_RATIO = 1.5  # a rank this many times slower than the median of the others' is a straggler
STRAGGLER_SHARE = 0.1  # and only where the difference is this much of a step: microseconds of in-memory batches vary by more than 1.5x
STRAGGLER_WINDOW = 5  # beats (about seconds) each rank's times are averaged over
PY_SPY_TIMEOUT_S = 60


@dataclass
class Rank:
    pid: int
    node_id: str
    node: str  # "<node id> (<ip>)", as the start report names it
    step: int = 0
    last: float = field(default_factory=time.monotonic)  # when it last reported
    times: deque = field(default_factory=lambda: deque(maxlen=STRAGGLER_WINDOW))  # (data seconds, wall seconds) per step, by beat
    straggling: bool = False


@ray.remote(num_cpus=0, max_concurrency=4)
class WatchdogActor:
    """Holds each rank's last report and checks them every second in a thread of its own."""

    def __init__(self, hang_timeout_s: float, run_dir: str, console_queue=None):
        self.timeout_s, self.run_dir, self.queue = hang_timeout_s, run_dir, console_queue
        self.ranks: dict[int, Rank] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def register(self, rank: int, pid: int, node_id: str, node: str) -> None:
        """A rank of a new worker group, ready for its first step."""
        with self.lock:
            self.ranks[rank] = Rank(pid, node_id, node)

    def beat(self, rank: int, step: int, times: tuple[float, float] | None) -> None:
        """`times`: the rank's mean seconds per step waiting for data, and in all, since its last beat (None: no step, e.g. a validation)."""
        with self.lock:
            if (state := self.ranks.get(rank)) is None:
                return
            state.step, state.last = step, time.monotonic()
            if times is not None:
                state.times.append(times)
        self._check_stragglers()

    def done(self, rank: int) -> None:
        with self.lock:
            self.ranks.pop(rank, None)

    def status(self) -> dict[int, int]:
        """Each watched rank's last reported step."""
        with self.lock:
            return {rank: state.step for rank, state in self.ranks.items()}

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            now = time.monotonic()
            with self.lock:
                stopped = {rank: state for rank, state in self.ranks.items() if now - state.last > self.timeout_s}
                ranks = dict(self.ranks)
                if stopped:
                    self.ranks.clear()  # the next worker group registers anew
            if stopped:
                try:
                    self._hang(stopped, ranks)
                except Exception as error:  # this thread must go on watching the next worker group
                    self._say(f"[dlray] warning: a hang was seen but not handled: {error!r}")

    def _hang(self, stopped: dict[int, Rank], ranks: dict[int, Rank]) -> None:
        # A URI's storage (s3://...) is not a path here: the actor's node keeps the stacks then.
        base = self.run_dir if "://" not in self.run_dir else Path(tempfile.gettempdir(), "dlray-hangs", Path(self.run_dir).name)
        directory = Path(base, "hangs", time.strftime("%Y%m%d-%H%M%S"))
        directory.mkdir(parents=True, exist_ok=True)
        stacks = ray.get([on_node(dump_stack, state.node_id).remote(state.pid) for state in ranks.values()])
        for rank, stack in zip(ranks, stacks):
            (directory / f"rank-{rank}.txt").write_text(stack)
        frames = dict(zip(ranks, map(top_frame, stacks)))
        lines = [f"[dlray] hang: no optimizer step for {self.timeout_s:g} s (run.hang_timeout_s) on rank(s) {', '.join(map(str, stopped))}; "
                 f"every rank's stack is in {directory}"]
        lines += [f"        rank {rank} on {state.node}, after step {state.step}, in {frames[rank]}" for rank, state in stopped.items()]
        lines.append("        killing them: Ray Train restarts the workers from the last checkpoint where run.max_failures allows")
        self._say("\n".join(lines))
        (directory / "summary.txt").write_text("\n".join(lines) + "\n")
        ray.get([on_node(kill, state.node_id).remote(state.pid) for state in stopped.values()])

    def _check_stragglers(self) -> None:
        with self.lock:
            data = {rank: statistics.mean(d for d, _ in s.times) for rank, s in self.ranks.items() if len(s.times) == STRAGGLER_WINDOW}
            if len(data) < 2 or len(data) < len(self.ranks):
                return
            step_s = statistics.median(w for s in self.ranks.values() for _, w in s.times)
            warnings = []
            for rank, seconds in data.items():
                others = statistics.median(t for r, t in data.items() if r != rank)
                state = self.ranks[rank]
                slow = seconds > STRAGGLER_RATIO * others and seconds - others > STRAGGLER_SHARE * step_s
                if slow and not state.straggling:
                    warnings.append(f"[dlray] warning: rank {rank} on {state.node} is a straggler: it waits {seconds * 1000:.0f} ms a step for its "
                                    f"batches, the other ranks {others * 1000:.0f} ms (median), of {step_s * 1000:.0f} ms steps, over its last "
                                    f"{STRAGGLER_WINDOW} reports; every rank waits for it")
                state.straggling = slow
        for warning in warnings:
            self._say(warning)

    def _say(self, text: str) -> None:
        """On the driver's console where it has one (dlray.console), else in this actor's log, which Ray shows on the driver."""
        if self.queue is not None:
            try:
                self.queue.put(("warning", text))
                return
            except ray.exceptions.RayError:  # the console has closed
                pass
        print(text, file=sys.stderr, flush=True)


def on_node(function, node_id: str):
    """`function` as a Ray task on that node: a rank's process is only reachable from its own machine."""
    return function.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))


@ray.remote
def dump_stack(pid: int) -> str:
    """Every thread's Python stack of process `pid`, by py-spy (installed beside this interpreter)."""
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    try:
        done = subprocess.run([py_spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True, timeout=PY_SPY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"py-spy dump --pid {pid} failed: {error}\n"
    return done.stdout if done.returncode == 0 else f"py-spy dump --pid {pid} failed ({done.returncode}):\n{done.stdout}{done.stderr}"


@ray.remote
def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # gone already
        pass


def top_frame(stack: str) -> str:
    """The innermost frame of the training thread (the one running dlray's loop) in a py-spy dump, else of its first thread."""
    threads = [block.splitlines() for block in stack.split("\nThread ")[1:]]
    if not threads:
        return "(no stack: see the rank's file)"
    training = next((t for t in threads if any("train_loop_per_worker" in line for line in t)), threads[0])
    frames = [line.strip() for line in training[1:] if line.strip()]
    return frames[0] if frames else "(no Python frame)"


class Watchdog:
    """The driver's handle: starts the actor, stops it after the run."""

    def __init__(self, actor):
        self.actor = actor

    @classmethod
    def start(cls, hang_timeout_s: float | None, run_dir: str, console_queue=None) -> Watchdog | None:
        if hang_timeout_s is None:
            return None
        return cls(WatchdogActor.remote(hang_timeout_s, run_dir, console_queue))

    def stop(self) -> None:
        ray.kill(self.actor)


class Heartbeat:
    """A rank's side: its process and node once, then its progress at most every BEAT_INTERVAL_S (fire and forget)."""

    def __init__(self, actor, rank: int, node: str):
        self.actor, self.rank = actor, rank
        self.last, self.data_s, self.steps = time.monotonic(), 0.0, 0  # at the last beat; data_s, steps: the totals' then
        if actor is not None:
            actor.register.remote(rank, os.getpid(), ray.get_runtime_context().get_node_id(), node)

    def step(self, global_step: int, totals=None) -> None:
        """After an optimizer step, with the epoch's running totals (dlray.step.EpochTotals: data_s, steps), or a validation (none)."""
        now = time.monotonic()
        if self.actor is None or now - self.last < BEAT_INTERVAL_S:
            return
        times = None
        if totals is not None:
            if totals.steps < self.steps:  # a validation restarted the totals
                self.data_s, self.steps = 0.0, 0
            if totals.steps > self.steps:
                steps = totals.steps - self.steps
                times = ((totals.data_s - self.data_s) / steps, (now - self.last) / steps)
            self.data_s, self.steps = totals.data_s, totals.steps
        self.actor.beat.remote(self.rank, global_step, times)
        self.last = now

    def through(self, batches, global_step: int):
        """A validation's `batches`, beating as they go by (the test split comes after done(): unwatched)."""
        for batch in batches:
            yield batch
            self.step(global_step)

    @contextlib.contextmanager
    def alive(self, global_step: int):
        """Beats every BEAT_INTERVAL_S from a thread while the block runs: a phase with no progress to see from inside."""
        if self.actor is None:
            yield
            return
        finished = threading.Event()

        def beating():
            while not finished.wait(BEAT_INTERVAL_S):
                self.actor.beat.remote(self.rank, global_step, None)

        thread = threading.Thread(target=beating, daemon=True)
        thread.start()
        try:
            yield
        finally:
            finished.set()
            thread.join()
            self.last = time.monotonic()

    def done(self) -> None:
        if self.actor is not None:
            self.actor.done.remote(self.rank)


def slowed(micro_batches, rank: int):
    """The straggler test's hook: DLRAY_TEST_SLOW_RANK="<rank>:<seconds>" makes that rank's every batch take so much longer."""
    slow_rank, _, seconds = os.environ.get("DLRAY_TEST_SLOW_RANK", "").partition(":")
    if slow_rank != str(rank):
        return micro_batches

    def sleeping():
        for batch in micro_batches:
            time.sleep(float(seconds))
            yield batch
    return sleeping()
