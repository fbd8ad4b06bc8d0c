"""Strategy mechanics in a plain 2-process gloo group (Ray adds nothing here; see test_train for Ray).

Every strategy x precision: the loss goes down, a checkpoint restored into a fresh model replays
the same losses (optimizer state included), and `dlray export` reads the (sharded) checkpoint
back into the same model.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from dlray.config import DataConfig
from dlray.data import build_data
from dlray.export import export, load_artifact
from dlray.local_cluster import free_port

CASES = [
    {"strategy": {"name": name, **extra}, "precision": precision, "id": f"{label}-{precision}"}
    for name, extra, label in [
        ("ddp", {}, "ddp"),
        ("fsdp", {}, "fsdp"),
        ("deepspeed", {"zero_stage": 1}, "zero1"),
        ("deepspeed", {"zero_stage": 2}, "zero2"),
        ("deepspeed", {"zero_stage": 3}, "zero3"),
    ]
    for precision in ("fp32", "bf16")
] + [
    {"strategy": {"name": "ddp"}, "precision": "fp16", "id": "ddp-fp16"},
    {"strategy": {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_param": True}, "precision": "bf16", "id": "zero3-offload-bf16"},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("strategies")
    # The environment torchrun would give each rank.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests/strategy_worker.py"), str(out), json.dumps(CASES)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-5000:] for log in logs)
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_strategy_trains_resumes_and_exports(results, case, tmp_path):
    out, all_results = results
    result = all_results[case["id"]]
    losses = result["losses"]
    assert sum(losses[-4:]) < 0.93 * sum(losses[:4]), f"loss did not go down: {losses}"

    tolerance = 1e-4 if case["precision"] == "fp32" else 2e-2
    assert result["replayed"] == pytest.approx(losses[8:], rel=tolerance), "resumed training diverges from the uninterrupted run"

    artifact = export(out / case["id"], tmp_path / "artifact")
    model, _ = load_artifact(artifact)
    with torch.no_grad():
        exported = model(build_data(DataConfig(), seed=0).val.images[:64])
    saved = torch.tensor(result["saved_logits"])
    assert torch.allclose(exported, saved, atol=0.05 if case["precision"] != "fp32" else 1e-4), (exported - saved).abs().max()
