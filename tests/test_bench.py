"""The pieces of `dlray bench llm` that need neither Ray nor a GPU: the MFU formula, the QLoRA byte
count on a small model, reading a streamed completion, and their rows in the results table."""

import asyncio
import dataclasses
import time

import pytest
import torch

from dlray import finetune
from dlray.bench import _read_events, bench_gpt_mfu, bench_qlora_memory, machine, render_markdown
from dlray.bench.llm import MFURun, mfu_job, plain_gpt_tokens_per_sec
from dlray.config import config_from_dict
from dlray.data import build_data
from dlray.models import FAMILIES, gpt
from dlray.serve.engine import Delta, SamplingParams, Sequence
from dlray.serve.openai_text import Reply


def test_flops_per_token_are_palm_model_flops():
    # The 1b flavor (TinyLlama-1.1B's shape, untied) at 2,048 tokens: 6N over the matmul weights (all but the input
    # embedding's 32000 x 2048 lookup) + 12 x 22 layers x 2048 wide x 2048 positions.
    with torch.device("meta"):  # the shapes without allocating 4 GB
        model = gpt.build({"flavor": "1b", "dropout": 0.0}, {"vocab_size": 32000, "max_seq_len": 2048, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    matmul_params = model.num_parameters() - 32000 * 2048
    assert 1.0e9 < matmul_params < 1.1e9
    assert gpt.flops_per_token(model, 2048) == 6 * matmul_params + 12 * 22 * 2048 * 2048


def test_a_lora_run_counts_no_weight_gradients_for_its_frozen_weights():
    """6 FLOPs per trained weight, 4 per frozen one (forward, and the gradient of its input: not of itself)."""
    cfg = config_from_dict({"model": {"family": "gpt", "name_or_path": "/models/llm"}, "data": {"name": "text"}, "finetune": {"finetuning_type": "lora"}})
    info = {"vocab_size": 512, "max_seq_len": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    model = finetune.apply(gpt.build({"flavor": "debug", "dropout": 0.0}, info), FAMILIES["gpt"], cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # the adapters
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)  # the base; debug's output layer is its (tied) embedding
    assert 0 < trained < frozen
    assert gpt.flops_per_token(model, 64) == 6 * trained + 4 * frozen + 12 * 2 * 128 * 64


def test_both_sides_of_the_mfu_bench_train_one_model_on_one_token_stream(tmp_path):
    """dlray's text source reads the generated stream back as exactly its windows, over the whole 32000-token
    vocabulary, so both sides build gpt/1b at its 1.100B parameters; the plain loop's piece runs (on the CPU,
    shrunk to gpt/debug)."""
    run = MFURun(seq_len=16, batch=2, timed_steps=3)
    cfg = mfu_job(run, tmp_path)
    data = build_data(cfg.data, seed=cfg.train.seed)
    assert data.info["vocab_size"] == 32000 and (len(data.train), len(data.val), len(data.test)) == (6, 2, 0)
    expected = []
    for split, windows in (("train", 6), ("val", 2)):  # one document per split
        stream = torch.tensor([int(word[1:]) for word in next((tmp_path / "tokens").glob(f"*-{split}.txt")).read_text().split()])
        assert len(stream) == windows * 16 and int(stream.min()) >= 3  # no special token drawn
        expected += stream.unfold(0, 17, 16).tolist() + [[*stream[-16:].tolist(), 2]]  # the last window ends with the document's EOS
    windows = [torch.cat([split.columns["input_ids"], split.columns["labels"][:, -1:]], 1) for split in (data.train, data.val)]
    assert sorted(windows[0].tolist() + windows[1].tolist()) == sorted(expected)
    with torch.device("meta"):
        assert round(gpt.build(cfg.model.model_dump(), data.info).num_parameters() / 1e6) == 1100
    tiny = dataclasses.replace(run, flavor="debug", precision="fp32", compile=False, device="cpu", warmup_steps=1, timed_steps=2)
    assert plain_gpt_tokens_per_sec(tiny, mfu_job(tiny, tmp_path / "tiny"), data, compiled=False) > 0


def test_qlora_bytes_count_the_packed_weights_and_their_quantisation_state():
    memory = bench_qlora_memory("debug")
    assert memory["quantised_linears"] == 14  # 2 layers x 7 linears; the output layer stays bf16
    assert memory["linear_bytes"]["bf16"] == 2 * memory["quantised_parameters"]
    # Above NF4's 4.127 bits: on layers this small, each one's own lookup tables (1 KiB) weigh too.
    assert 4.127 < memory["bits_per_param"] < 5 and memory["qlora_vs_bf16"] < 0.35
    here = machine()
    table = render_markdown({"llm_qlora_memory": memory | {"machine": here}, "llm_mfu": {"skipped": "no GPU", "machine": here | {"date": "2026-01-01"}}})
    assert "| QLoRA weight bytes / bf16, the 14 quantised linears" in table
    # Each result names the machine and CPU kind it was measured on, one line per machine.
    assert f"- {here['date']}: {here['cpu']} ({here['cpu_kind']}), " in table and table.count(f"{here['cpu_kind']}), ") == 2
    assert here["cpu_kind"].endswith("native bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU it trains the 1b model")
def test_mfu_without_a_gpu_is_a_row_saying_so():
    assert "| skipped: no GPU |" in render_markdown({"llm_mfu": bench_gpt_mfu() | {"machine": machine()}})


def lines(events):
    """The lines httpx's aiter_lines gives for a stream of server-sent events."""

    async def split():
        async for event in events:
            for line in event.split("\n"):
                yield line

    return split()


def test_a_completion_stream_gives_its_first_choice_time_and_usage():
    seq = Sequence([0] * 5, SamplingParams(max_tokens=3))
    seq.token_ids = [7, 8, 9]  # what the engine sampled in the steps below

    async def steps():
        yield [[Delta("", None, 1)]]  # held back: no chunk, so not yet a first token
        yield [[Delta("Hello", None, 2)], [Delta(" world", "length", 3)]]  # two steps done while the stream waited

    async def read(include_usage: bool):
        return await _read_events(lines(Reply(chat=False, model="m", sequences=[seq], tokenizer=None).events(steps(), include_usage)))

    before = time.perf_counter()
    first, usage = asyncio.run(read(include_usage=True))
    assert before < first < time.perf_counter()
    assert usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    with pytest.raises(RuntimeError, match="include_usage"):
        asyncio.run(read(include_usage=False))
