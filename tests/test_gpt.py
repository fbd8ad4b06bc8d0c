"""The gpt family in one process (no Ray, no process group): the debug model learns the bundled
text, and `dlray export` turns its checkpoint into a plain transformers directory.

Measured on 2 CPU cores: 200 steps of 16 x 64 tokens take ~15 s and reach a validation perplexity
of about 200 on documents neither the tokenizer nor the model saw (benchmarks/results.md).
"""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlray import reports
from dlray.config import config_from_dict, load_config
from dlray.export import export
from dlray.models import gpt
from dlray.runfiles import read_history
from dlray.train import fit, run_dir

from helpers import REPO
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
    assert [model.is_activation_checkpointing for model in models] == [False, True]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.slow
def test_debug_job_trains_on_ray_and_its_export_carries_the_tokenizer(ray_cluster, tmp_path):
    """The Ray path: 2 workers, perplexity and tokens/s in every report, the tokenizer written into
    the checkpoints and copied into the export, which then generates with plain transformers."""
    cfg = load_config(REPO / "jobs/debug/gpt_cpu.yaml", [f"run.storage_path={tmp_path}", "run.name=gpt", "train.num_epochs=3"])
    result = fit(cfg)
    assert result.error is None, result.error
    history = reports.epochs(read_history(run_dir(cfg)))
    perplexities = [r["val_perplexity"] for r in history]
    assert perplexities[-1] < perplexities[0] and all(r["tokens_per_sec"] > 0 for r in history), history
    assert perplexities[-1] == pytest.approx(math.exp(history[-1]["val_loss"]))

    out = export(run_dir(cfg), tmp_path / "artifact")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The for statement", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
