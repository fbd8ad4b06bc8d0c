"""`dlray bench serve`: @serve.batch (max_batch_size 32) / unbatched (max_batch_size 1) requests/s at
32 concurrent HTTP clients, with p50/p99 latency.
"""

from __future__ import annotations

import asyncio
import tempfile

import torch

from dlray.bench.common import http_load
from dlray.local_cluster import free_port
from dlray.models import FAMILIES

SERVE_CLIENTS, SERVE_REQUESTS = 32, 384


def bench_serve() -> dict:
    from ray import serve

    from dlray.artifact import write_artifact
    from dlray.local_cluster import init_ray
    from dlray.png import png_bytes
    from dlray.serve.app import run

    init_ray()
    # A model whose forward pass costs something (ResNet-18 on 32x32 RGB): batching pays off when
    # compute, not HTTP, dominates. Untrained weights serve as well as trained ones for timing.
    info = {"image_shape": [3, 32, 32], "class_names": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3}
    model_cfg = {"family": "cnn", "flavor": "resnet18", "dropout": 0.0}
    artifact = write_artifact(FAMILIES["cnn"].build(model_cfg, info), {"task": "classify", "model": model_cfg, "data_info": info, "serve": {}},
                              tempfile.mkdtemp(prefix="dlray-bench-artifact-"))
    payload = png_bytes(torch.rand(3, 32, 32) * 2 - 1)  # a random image; png_bytes takes [-1, 1]
    serve.shutdown()  # Serve keeps the HTTP port it first started on; this deployment picks its own
    port = free_port()
    results = {"model": "cnn/resnet18, 3x32x32 PNG requests", "concurrent_clients": SERVE_CLIENTS, "requests": SERVE_REQUESTS}
    for label, batch in (("unbatched", 1), ("batched", 32)):
        run(str(artifact), {"port": port, "max_batch_size": batch, "batch_wait_timeout_s": 0.01})
        asyncio.run(http_load(f"http://127.0.0.1:{port}/v1/classify", payload, SERVE_CLIENTS, 2 * SERVE_CLIENTS))  # warm-up
        results[label] = asyncio.run(http_load(f"http://127.0.0.1:{port}/v1/classify", payload, SERVE_CLIENTS, SERVE_REQUESTS))
        serve.delete("dlray")
    results["batched_vs_unbatched_throughput"] = results["batched"]["requests_per_sec"] / results["unbatched"]["requests_per_sec"]
    return results
