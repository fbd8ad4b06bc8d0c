"""Helpers more than one benchmark group uses: one compute thread, storage bytes, an untrained model,
and concurrent HTTP clients."""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import torch

from dlray.models import FAMILIES


@contextmanager
def one_thread():
    """One intra-op thread, as a 1-CPU Ray worker or a serving replica computes; and steady on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def unique_bytes(tensors) -> int:
    """Bytes of `tensors`, each storage counted once (tied weights, parameters the optimizer also lists, shared tables)."""
    seen, total = set(), 0
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.numel())  # not the storage's: ZeRO's parameters are views of one flat buffer
        if tensor.numel() and key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def untrained(cfg, data_info: dict):
    """Timing needs the model's shape, not trained weights."""
    torch.manual_seed(0)
    return FAMILIES[cfg.model.family].build(cfg.model.model_dump(), data_info)


async def http_load(url: str, payload: bytes, clients: int, total: int, content_type: str = "image/png") -> dict:
    latencies: list[float] = []

    async def request(session, index: int):
        start = time.perf_counter()
        response = await session.post(url, content=payload, headers={"content-type": content_type})
        response.raise_for_status()
        latencies.append(time.perf_counter() - start)

    elapsed = await drive_clients(clients, total, request)
    latencies.sort()
    return {
        "requests_per_sec": total / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


async def drive_clients(clients: int, total: int, request, stagger_s: float = 0.0) -> float:
    """Seconds `clients` concurrent HTTP clients take to make `total` calls of `request(session, index)` between them;
    with `stagger_s`, client k starts k/clients of it late (arrivals spread out, not one burst)."""
    import httpx

    remaining = iter(range(total))

    async def client(session, k: int):
        await asyncio.sleep(k * stagger_s / clients)
        for index in remaining:
            await request(session, index)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session, k) for k in range(clients)))
        return time.perf_counter() - start
