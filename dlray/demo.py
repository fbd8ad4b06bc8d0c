"""The main job end to end on a laptop: train -> export -> serve -> query over HTTP.

    make demo          (or: python -m dlray.demo [--verbose] [key=value ...])

Starts a local Ray on 127.0.0.1, trains the CNN of jobs/cnn_digits.yaml on the bundled digits
with 2 workers, exports the best checkpoint, serves it with Ray Serve, sends every test image
over HTTP and prints the served model's accuracy next to the in-memory model's. Ray's own INFO
lines (per report, per checkpoint, per request) show with --verbose.
"""

from __future__ import annotations

import asyncio
import sys

import httpx
import torch

from dlray.artifact import load_artifact
from dlray.config import load_config
from dlray.console import Console
from dlray.data import build_data
from dlray.export import export
from dlray.local_cluster import init_ray
from dlray.serve.app import run as serve_run
from dlray.train import fit, run_dir


def main(argv: list[str]) -> int:
    verbose = "--verbose" in argv
    cfg = load_config("jobs/cnn_digits.yaml", ["run.storage_path=runs", *(a for a in argv if a != "--verbose")])
    init_ray(verbose)
    with Console(cfg, verbose) as console:
        result = fit(cfg, console=console)
    console.summary(result, run_dir(cfg))
    if result.error:
        return 1

    artifact = export(run_dir(cfg), "out/cnn")
    print(f"\n== exported the best checkpoint to {artifact}")
    serve_run(str(artifact), verbose=verbose)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1/classify"
    print(f"== serving at {url}")

    test = build_data(cfg.data, seed=cfg.train.seed).test
    images = [test[i][0] for i in range(len(test))]
    labels = [int(test[i][1]) for i in range(len(test))]
    served = asyncio.run(classify_all(url, images))
    model, _ = load_artifact(artifact)
    with torch.inference_mode():
        local = model(torch.stack(images)).argmax(-1).tolist()

    served_acc = sum(p == y for p, y in zip(served, labels)) / len(labels)
    local_acc = sum(p == y for p, y in zip(local, labels)) / len(labels)
    agree = sum(a == b for a, b in zip(served, local)) / len(labels)
    print(f"\n== test accuracy over HTTP: {served_acc:.4f} on {len(labels)} images "
          f"(in-memory model: {local_acc:.4f}; predictions agree on {agree:.2%})")
    return 0


async def classify_all(url: str, images: list[torch.Tensor], concurrency: int = 16) -> list[int]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(image: torch.Tensor) -> int:
            async with limit:
                response = await client.post(url, json={"image": image.tolist()})
                response.raise_for_status()
                return response.json()["label_index"]

        return await asyncio.gather(*(one(image) for image in images))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
