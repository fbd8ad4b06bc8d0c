"""The LLM fine-tuning path end to end, as a user runs it: jobs/llm_qlora.yaml on the session's Ray
(2 workers, QLoRA over a 4-bit base, chat data with the prompts masked, packed), `dlray export`
of the adapter and with --merge-lora, and the merged model served over OpenAI's chat API.
"""

import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlray import reports
from dlray.artifact import load_artifact
from dlray.config import load_config
from dlray.export import export
from dlray.local_cluster import free_port
from dlray.runfiles import read_history
from dlray.serve.engine import Engine, SamplingParams, Sequence
from dlray.train import fit, run_dir

from helpers import REPO
from strategy_worker import make_llm_base

pytestmark = pytest.mark.slow
QUESTION = 'In Python, what is the "assert" statement?'  # one of the bundled chat data's questions


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    base = make_llm_base(tmp / "base")
    cfg = load_config(REPO / "jobs/llm_qlora.yaml", [f"model.name_or_path={base}", f"run.storage_path={tmp}", "run.name=qlora"])
    result = fit(cfg)
    assert result.error is None, result.error
    return cfg, tmp


def test_the_job_learns_the_answers(run):
    cfg, _ = run
    history = reports.epochs(read_history(run_dir(cfg)))
    assert len(history) == cfg.train.num_epochs
    # Measured: train 5.14 -> 4.82, and on the questions it never saw 5.11 -> 4.91 (a base of 60 steps, 80 adapter steps).
    assert history[-1]["train_loss"] < 0.95 * history[0]["train_loss"], [r["train_loss"] for r in history]
    assert history[-1]["val_loss"] < 0.97 * history[0]["val_loss"], [r["val_loss"] for r in history]


def test_adapter_and_merged_exports_load_with_plain_peft_and_transformers(run):
    cfg, tmp = run
    adapter = export(run_dir(cfg), tmp / "adapter")
    merged = export(run_dir(cfg), tmp / "merged", merge_lora=True)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template  # the template it was trained with travels with the model
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    model, _ = load_artifact(adapter)  # the 4-bit base, as in training, plus the adapter
    assert isinstance(model, PeftModel)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapter_logits = model(input_ids=prompt).logits.float()
        merged_logits = AutoModelForCausalLM.from_pretrained(merged)(input_ids=prompt).logits.float()
    assert torch.allclose(adapter_logits, merged_logits, atol=0.1), (adapter_logits - merged_logits).abs().max()


def test_the_served_merged_model_answers_as_it_does_locally(run):
    from ray import serve

    from dlray.serve.app import run as serve_run

    _, tmp = run
    merged = tmp / "merged"
    serve.shutdown()  # Serve keeps the port it first started on; this module picks its own
    port = free_port()
    serve_run(str(merged), {"port": port})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="merged", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24)
    finally:
        serve.shutdown()
    engine = Engine(AutoModelForCausalLM.from_pretrained(merged).eval(), AutoTokenizer.from_pretrained(merged))
    prompt_ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                                       tokenize=True, return_dict=False)
    local = Sequence(prompt_ids, SamplingParams(max_tokens=24, temperature=0))
    for _ in engine.generate([local]):
        pass
    assert reply.choices[0].message.content == local.text
    assert reply.usage.prompt_tokens == len(prompt_ids)
