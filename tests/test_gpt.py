"""The gpt family in one process (no Ray, no process group): the debug model learns the bundled
text, and `dlray export` turns its checkpoint into a plain transformers directory.

Measured on 2 CPU cores: 200 steps of 16 x 64 tokens take ~15 s and reach a validation perplexity
of about 200 on documents neither the tokenizer nor the model saw (benchmarks/results.md).
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlray import reports
from dlray.artifact import load_artifact
from dlray.checkpoint import checkpoint_name
from dlray.config import config_from_dict, load_config
from dlray.export import export
from dlray.models import gpt
from dlray.runfiles import read_history
from dlray.train import fit, run_dir

from helpers import REPO, wait_for_committed_checkpoint
from single_process import checkpointing_gradients, evaluate, export_trained, train

STEPS, BATCH = 200, 16
JOB = {"model": {"family": "gpt", "dropout": 0.0}, "data": {"name": "text", "max_seq_len": 64},
       "optim": {"lr": 0.002}, "scheduler": {"warmup_steps": 20}}


@pytest.fixture(scope="module")
def trained():
    cfg = config_from_dict(JOB)
    return (cfg, *train(cfg, STEPS, BATCH))


def test_debug_model_beats_a_unigram_model_clearly(trained):
    _, data, model = trained
    counts = torch.bincount(data.train.columns["labels"].flatten(), minlength=data.info["vocab_size"]).double() + 1  # add-one smoothing
    log_probs = (counts / counts.sum()).log()
    unigram = math.exp(-log_probs[data.val.columns["labels"].flatten()].mean().item())
    perplexity = gpt.derived_metrics({"val_loss": evaluate(gpt, model, data.val)["loss"]}, data.info)["val_perplexity"]
    assert perplexity < unigram / 2, f"val perplexity {perplexity:.1f}, unigram {unigram:.1f}"


def test_export_loads_with_plain_transformers(trained, tmp_path):
    """A checkpoint laid out as checkpoint.report_with_checkpoint writes it (weights in DCP, meta.json,
    the tokenizer), exported, loads without dlray and computes the same logits."""
    cfg, data, model = trained
    artifact = export_trained(cfg, data, model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(artifact).eval()
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    text = "The assert statement checks a condition."
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(input_ids[0]) == text
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids).logits, model(input_ids).logits, atol=1e-5)
    assert evaluate(gpt, loaded, data.val)["loss"] == pytest.approx(evaluate(gpt, model, data.val)["loss"], rel=1e-5)


def test_gradient_checkpointing_computes_the_same_gradients(trained):
    _, data, _ = trained
    models, grads = checkpointing_gradients(JOB, data)
    assert [model.is_gradient_checkpointing for model in models] == [False, True]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# A step budget that ends mid-epoch (the debug job's epoch has ~70 steps on 2 workers), validated and checkpointed by steps.
BUDGETED = ["data.streaming=true", "train.max_steps=36", "train.val_every_n_steps=12", "train.checkpoint_every_n_steps=5", "train.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def budgeted_run(ray_cluster, tmp_path_factory):
    """jobs/debug/gpt_cpu.yaml streamed under a step budget, uninterrupted: (config, its history)."""
    cfg = load_config(REPO / "jobs/debug/gpt_cpu.yaml", [f"run.storage_path={tmp_path_factory.mktemp('runs')}", "run.name=gpt", *BUDGETED])
    result = fit(cfg)
    assert result.error is None, result.error
    return cfg, read_history(run_dir(cfg))


@pytest.mark.slow
def test_a_streamed_step_budget_validates_by_steps_and_its_export_carries_the_tokenizer(budgeted_run, tmp_path):
    """The Ray path: 2 workers, streamed text, validations every 12 steps and at the budget's end (mid-epoch),
    perplexity, tokens/s and tokens seen in every validation, the tokenizer written into the checkpoints and
    copied into the export, which then generates with plain transformers."""
    cfg, records = budgeted_run
    history = reports.epochs(records)
    assert [r["global_step"] for r in history] == [12, 24, 36] and [r["epoch"] for r in history] == [0, 0, 0], "ended mid-epoch, at the budget"
    perplexities = [r["val_perplexity"] for r in history]
    assert perplexities[-1] < perplexities[0] and all(r["tokens_per_sec"] > 0 for r in history), history
    assert perplexities[-1] == pytest.approx(math.exp(history[-1]["val_loss"]))
    assert [r["tokens_seen"] for r in history] == [step * 16 * 2 * 64 for step in (12, 24, 36)]  # micro-batch x workers x window
    assert all(r["skipped_rows"] == 0 for r in history)
    # A worker's own memory (what streaming keeps flat) is part of its resident memory, the object store's pages it read being the rest.
    assert all(0 < r["peak_private_mib"] <= r["peak_rss_mib"] for r in history), history

    out = export(run_dir(cfg), tmp_path / "artifact")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The for statement", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8


@pytest.mark.slow
def test_a_streamed_run_whose_driver_is_killed_mid_epoch_resumes_from_its_step_checkpoint_and_ends_where_the_uninterrupted_run_ends(
        budgeted_run, ray_cluster, tmp_path):
    """`dlray train` as a user runs it, killed (SIGKILL: no clean-up) once a step checkpoint is committed, then
    started again with the same run.name: it resumes from its last checkpoint, mid-epoch, and replays the
    rest of the streamed epoch's order, so its weights and validations are those of the uninterrupted run."""
    reference, expected = budgeted_run
    command = [sys.executable, "-m", "dlray.cli", "train", "jobs/debug/gpt_cpu.yaml", f"run.storage_path={tmp_path}", "run.name=gpt", *BUDGETED]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_after = wait_for_committed_checkpoint(Path(tmp_path, "gpt"), step=15)["global_step"]
    finally:
        driver.kill()
    assert driver.wait(timeout=60) != 0
    assert killed_after < 36, "the run finished before its driver was killed"
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    resumed_at = int(re.search(r"\[dlray\] resuming: epoch 1, step (\d+) of ", again.stdout)[1])
    assert resumed_at >= killed_after  # or a later checkpoint, committed before the kill landed

    history = reports.epochs(read_history(Path(tmp_path, "gpt")))
    want = reports.epochs(expected)
    assert [r["global_step"] for r in history] == [r["global_step"] for r in want], "every validation once, none lost"
    resumed = [r for r in history if r["resumed_from_step"] > 0]
    assert resumed and resumed[0]["resumed_from_step"] == resumed_at
    for got, wanted in zip(history, want):
        assert got["val_loss"] == pytest.approx(wanted["val_loss"], rel=1e-4), (got, wanted)
    final = checkpoint_name(36)
    weights = [load_artifact(export(Path(run, "gpt", final), tmp_path / f"artifact{i}"))[0].state_dict()
               for i, run in enumerate((reference.run.storage_path, tmp_path))]
    for key, value in weights[0].items():
        assert torch.allclose(weights[1][key], value, atol=1e-4), key
