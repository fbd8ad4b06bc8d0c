"""Continuous batching: one decode loop per replica over a dlray.serve.engine.Engine, driven by asyncio.

    scheduler = Scheduler(engine, max_num_seqs=32, max_batch_total_tokens=None, max_queue_len=64, stream_interval=1)
    steps = scheduler.submit(sequences)   # a request's choices; QueueFull at once if the queue is full
    async for ready in steps:             # the steps done since the last iteration: its first step alone, then
                                          # stream_interval steps (more if the consumer fell behind), then the rest
        for deltas in ready: ...          # deltas[i]: what choice i added in a step, None if nothing

Requests wait in a bounded FIFO queue. Before each engine step the loop admits waiting requests
(all of a request's choices together) while the running sequences stay within `max_num_seqs` and
their prompt + max_tokens within `max_batch_total_tokens` (TGI's name: the KV-cache entries they can
come to hold); the engine prefills them into the running batch, so a new request waits for one step,
not for the others to finish. Each step runs in a worker thread, the event loop meanwhile streaming
what the last one produced and queueing new requests. A request whose consumer stops (its client
disconnected, its handler was cancelled) leaves the batch at the next step. A stream gets its first
step as soon as it is done, then `stream_interval` steps at a time (vLLM's and SGLang's
--stream-interval), and every step done while it was not looking at once: each write it makes costs
the replica, Serve's proxy and the client CPU, which on a small CPU model outweighs a decoding step.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from dlray.serve.engine import Delta, Engine, Sequence

# Histogram buckets (seconds) as vLLM's for the same metrics, so dashboards built for it read ours.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]


class QueueFull(Exception):
    """The waiting queue holds max_queue_len requests already."""


class ServeMetrics:
    """The scheduler's metrics through Ray Serve (tagged with deployment, replica and application), on
    Ray's Prometheus endpoint as ray_dlray_*: requests running / waiting, time to first token,
    inter-token latency, prompt and generated tokens."""

    def __init__(self):
        from ray.serve import metrics

        self.running = metrics.Gauge("dlray_num_requests_running", description="Requests whose sequences are in the decoding batch")
        self.waiting = metrics.Gauge("dlray_num_requests_waiting", description="Requests queued for the decoding batch")
        self.ttft = metrics.Histogram("dlray_time_to_first_token_seconds", description="From a request's arrival to its first token",
                                      boundaries=TTFT_BUCKETS)
        self.itl = metrics.Histogram("dlray_inter_token_latency_seconds", description="Between a request's consecutive decoding steps",
                                     boundaries=ITL_BUCKETS)
        self.prompt_tokens = metrics.Counter("dlray_prompt_tokens", description="Prompt tokens prefilled")
        self.generation_tokens = metrics.Counter("dlray_generation_tokens", description="Tokens sampled")


@dataclass(eq=False)
class Request:
    sequences: list[Sequence]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # per step: (deltas, done), or the step's exception
    arrival: float = field(default_factory=time.perf_counter)
    streamed: int = 0  # steps handed to the consumer
    last_step: float | None = None  # when its last step's deltas were handed out


class Scheduler:
    def __init__(self, engine: Engine, max_num_seqs: int, max_batch_total_tokens: int | None, max_queue_len: int,
                 metrics: ServeMetrics | None = None, stream_interval: int = 1):
        self.engine, self.metrics, self.stream_interval = engine, metrics, stream_interval
        self.max_num_seqs, self.max_batch_total_tokens, self.max_queue_len = max_num_seqs, max_batch_total_tokens, max_queue_len
        self.waiting: deque[Request] = deque()
        self.owners: dict[Sequence, Request] = {}  # every admitted, unfinished sequence's request
        self.aborted: list[Sequence] = []  # to drop from the batch at the next step
        self.loop_task: asyncio.Task | None = None

    def check(self, sequences: list[Sequence]) -> tuple[str, str] | None:
        """Why a request of these sequences could never be admitted, as (the request field to
        change, "n" or "max_tokens"; a message), or None."""
        if len(sequences) > self.max_num_seqs:
            return "n", f"its {len(sequences)} choices exceed serve.max_num_seqs ({self.max_num_seqs})"
        tokens = sum(seq.reserved_tokens for seq in sequences)
        if self.max_batch_total_tokens is not None and tokens > self.max_batch_total_tokens:
            return "max_tokens", f"prompt + max_tokens of its choices come to {tokens} tokens, above serve.max_batch_total_tokens ({self.max_batch_total_tokens})"
        return None

    def submit(self, sequences: list[Sequence]) -> AsyncIterator[list[list[Delta | None]]]:
        """Queue one request's sequences (they must pass `check`); its per-step deltas, in their order.
        Raises QueueFull, before anything is queued, when max_queue_len requests wait already."""
        if len(self.waiting) >= self.max_queue_len:
            raise QueueFull(f"{len(self.waiting)} requests are waiting already (serve.max_queue_len)")
        request = Request(sequences)
        self.waiting.append(request)
        self._gauges()
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._loop())
        return self._stream(request)

    async def _stream(self, request: Request) -> AsyncIterator[list[list[Delta | None]]]:
        done, ready = False, []
        try:
            while not done:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                deltas, done = item
                ready.append(deltas)
                # Steps go out together when the stream fell behind (one write, rather than one per
                # step: each costs the replica and Serve's proxy CPU), or to make up stream_interval
                # steps; the first step, as soon as it is done.
                if done or (request.queue.empty() and (len(ready) >= self.stream_interval or request.streamed == 0)):
                    request.streamed += len(ready)
                    yield ready
                    ready = []
        finally:
            if not done:  # the consumer stopped early: free the request's place in the queue or the batch
                self._abort(request)

    def _abort(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        for seq in request.sequences:
            if self.owners.pop(seq, None) is not None:
                self.aborted.append(seq)
        self._gauges()

    def _admit(self) -> list[Request]:
        """Waiting requests, first come first served, that fit beside the running sequences."""
        admitted: list[Request] = []
        seqs, tokens = len(self.owners), sum(seq.reserved_tokens for seq in self.owners)
        while self.waiting:
            request = self.waiting[0]
            seqs += len(request.sequences)
            tokens += sum(seq.reserved_tokens for seq in request.sequences)
            if seqs > self.max_num_seqs or (self.max_batch_total_tokens is not None and tokens > self.max_batch_total_tokens):
                break  # in order: a large request is not passed over for ever by small ones
            admitted.append(self.waiting.popleft())
            self.owners.update((seq, request) for seq in request.sequences)
        return admitted

    async def _loop(self) -> None:
        try:
            while self.waiting or self.owners or self.aborted:
                admitted = self._admit()
                self._gauges()
                admit = [seq for request in admitted for seq in request.sequences]
                abort, self.aborted = self.aborted, []
                if self.metrics and admit:
                    self.metrics.prompt_tokens.inc(sum(len(seq.prompt_ids) for seq in admit))
                try:
                    outputs = await asyncio.to_thread(self.engine.step, admit, abort)
                except Exception as err:  # noqa: BLE001 - handed to every request in the batch, whose handlers answer 500
                    self.engine.reset()
                    for request in {*self.owners.values()}:
                        request.queue.put_nowait(err)
                    self.owners.clear()
                    continue
                self._hand_out(outputs)
        finally:
            self.loop_task = None
            self._gauges()

    def _hand_out(self, outputs: list[tuple[Sequence, Delta]]) -> None:
        """Give each request its sequences' deltas of this step."""
        now = time.perf_counter()
        steps: dict[Request, list[Delta | None]] = {}
        for seq, delta in outputs:
            request = self.owners.get(seq)
            if request is None:  # aborted while the step ran
                continue
            steps.setdefault(request, [None] * len(request.sequences))[request.sequences.index(seq)] = delta
            if delta.finish_reason is not None:
                del self.owners[seq]
        for request, deltas in steps.items():
            done = all(seq.finish_reason is not None for seq in request.sequences)
            request.queue.put_nowait((deltas, done))
            if self.metrics:
                if request.last_step is None:
                    self.metrics.ttft.observe(now - request.arrival)
                else:
                    self.metrics.itl.observe(now - request.last_step)
            request.last_step = now
        sampled = sum(1 for _, delta in outputs if delta.completion_tokens)  # a prompt-only sequence samples none
        if self.metrics and sampled:  # Ray's counters take increments above 0 only
            self.metrics.generation_tokens.inc(sampled)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.waiting.set(len(self.waiting))
            self.metrics.running.set(len(set(self.owners.values())))
