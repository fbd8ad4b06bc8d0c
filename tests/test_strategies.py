"""Strategy mechanics in a plain 2-process gloo group (Ray adds nothing here; see test_train for Ray).

Every strategy x precision (the CNN), the diffusion UNet and the GPT under each strategy with bf16
(the GPT also with gradient checkpointing under FSDP and ZeRO-3), the ViT and BERT under each strategy
with bf16 and DDP with fp32 too (and with gradient checkpointing under FSDP), and the VAE and GAN
under DDP and FSDP with bf16: the loss goes down (a GAN's two players both learn
instead), a checkpoint restored into a fresh model replays the same losses (optimizer states
included), `dlray export` reads the (sharded) checkpoint back into the same model, and
`strategy.full_state()` gathers exactly those weights.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from dlray.export import export, load_artifact
from dlray.local_cluster import free_port
from dlray.models import FAMILIES
from safetensors.torch import load_file
from strategy_worker import family_data, first_samples

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
] + [
    {"family": family, "strategy": strategy, "precision": "bf16", "id": f"{family}-{label}-bf16"}
    for family in ("diffusion", "gpt")
    for strategy, label in [({"name": "ddp"}, "ddp"), ({"name": "fsdp"}, "fsdp"), ({"name": "deepspeed", "zero_stage": 2}, "zero2"), ({"name": "deepspeed", "zero_stage": 3}, "zero3")]
] + [
    {"family": family, "strategy": {"name": name}, "precision": "bf16", "id": f"{family}-{name}-bf16"}
    for family in ("vae", "gan")
    for name in ("ddp", "fsdp")
] + [
    {"family": "gpt", "strategy": strategy, "precision": "bf16", "train": {"gradient_checkpointing": True}, "id": f"gpt-{label}-checkpointing-bf16"}
    for strategy, label in [({"name": "fsdp"}, "fsdp"), ({"name": "deepspeed", "zero_stage": 3}, "zero3")]
] + [
    {"family": family, "strategy": strategy, "precision": precision, "id": f"{family}-{label}-{precision}"}
    for family in ("vit", "bert")
    for strategy, label, precision in [({"name": "ddp"}, "ddp", "fp32"), ({"name": "ddp"}, "ddp", "bf16"), ({"name": "fsdp"}, "fsdp", "bf16"),
                                       ({"name": "deepspeed", "zero_stage": 2}, "zero2", "bf16"), ({"name": "deepspeed", "zero_stage": 3}, "zero3", "bf16")]
] + [
    {"family": family, "strategy": {"name": "fsdp"}, "precision": "bf16", "train": {"gradient_checkpointing": True}, "id": f"{family}-fsdp-checkpointing-bf16"}
    for family in ("vit", "bert")
]


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    # Only the cases of the tests pytest selected (`-k zero3` runs the ZeRO-3 cases alone).
    selected = {item.callspec.params["case"]["id"] for item in request.session.items if item.originalname == "test_strategy_trains_resumes_and_exports"}
    cases = [case for case in CASES if case["id"] in selected]
    out = tmp_path_factory.mktemp("strategies")
    # The environment torchrun would give each rank.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    # Each rank's output to a file, not a pipe: a rank whose pipe filled up while the test read the
    # other's would block on its next write, and the other rank in its next collective.
    logs = [out / f"rank{rank}.log" for rank in range(2)]
    procs = []
    for rank, log in enumerate(logs):
        with log.open("w") as stream:
            procs.append(subprocess.Popen([sys.executable, str(REPO / "tests/strategy_worker.py"), str(out), json.dumps(cases)],
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=stream, stderr=subprocess.STDOUT))
    for proc in procs:
        proc.wait(timeout=900)
    assert all(p.returncode == 0 for p in procs), "\n".join(log.read_text()[-5000:] for log in logs)
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_strategy_trains_resumes_and_exports(results, case, tmp_path):
    out, all_results = results
    result = all_results[case["id"]]
    losses = result["losses"]
    if case.get("family") == "gan":  # two players: neither loss has to fall, but both must learn
        assert all(map(math.isfinite, losses)), losses
        assert {"discriminator", "generator"} <= set(result["changed"]), result["changed"]
    else:
        assert sum(losses[-4:]) < 0.93 * sum(losses[:4]), f"loss did not go down: {losses}"

    tolerance = 1e-4 if case["precision"] == "fp32" else 2e-2
    assert result["replayed"] == pytest.approx(losses[8:], rel=tolerance), "resumed training diverges from the uninterrupted run"

    artifact = export(out / case["id"], tmp_path / "artifact")
    model, config = load_artifact(artifact)
    data = family_data(case.get("family", "cnn"))
    with torch.no_grad():
        torch.manual_seed(0)
        exported = FAMILIES[config["model"]["family"]].compute_loss(model, first_samples(data.val, 64))["loss"]
    saved = torch.tensor(result["saved_eval"])
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if case["precision"] == "fp32" else {"rtol": 0.05, "atol": 0.05}
    assert torch.allclose(exported, saved, **tolerance), (exported - saved).abs().max()

    gathered = load_file(out / f"{case['id']}-full_state.safetensors")
    exported_state = model.state_dict()
    assert gathered.keys() == exported_state.keys()
    assert all(torch.allclose(gathered[k], exported_state[k].float(), atol=1e-2 if case["precision"] != "fp32" else 1e-6) for k in gathered)
