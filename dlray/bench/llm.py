"""`dlray bench llm`: jobs/gpt_pretrain.yaml's gpt/debug and gpt/small: dlray (1 worker) tokens/s / a
plain PyTorch + transformers loop on the same Llama, data, batch and precision; QLoRA (NF4, double
quantisation) bytes of the quantised linears / bf16, quantisation state included; generation tokens/s,
the engine alone with 16 sequences batched / one at a time, and the generate endpoint's tokens/s and
time to first token at 16 / 1 streaming clients (continuous batching), on the CPU and on a GPU where
there is one; on a GPU, the MFU of gpt/1b training.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dlray import precision
from dlray.bench.common import drive_clients, one_thread, unique_bytes, untrained
from dlray.bench.train import bench_train
from dlray.config import load_config
from dlray.data import build_data
from dlray.local_cluster import free_port
from dlray.models import FAMILIES

GPT_JOB = "jobs/gpt_pretrain.yaml"
# flavor -> characters of the bundled help texts it trains on (None: all ~0.5 MB). `small` takes
# about 4 s a step on one CPU thread: the whole corpus would keep its dlray and plain runs over an
# hour, its first 48 KB (~85 training windows, 5 steps an epoch) about a minute and a half each.
GPT_TRAIN_FLAVORS = {"debug": None, "small": 48_000}
QLORA_FLAVOR, QLORA_VOCAB = "base", 32000  # 110M parameters, GPT-2 small's body with a Llama-sized vocabulary
GEN_STREAMS, GEN_ROUNDS, GEN_MAX_TOKENS = (1, 16), 4, 64
GEN_MIN_REQUESTS = 16  # one stream's 4 requests last half a second: too few to time
GEN_STREAM_INTERVALS = (1, 4, 16)  # serve.stream_interval: 1 (the default) writes each token as its step ends
MFU_FLAVOR, MFU_BATCH, MFU_SEQ_LEN, MFU_VOCAB, MFU_STEPS = "1b", 4, 2048, 32000, 10


def bench_gpt_train() -> dict:
    """bench_train on GPT_JOB for each of GPT_TRAIN_FLAVORS, 1 worker, against the plain PyTorch +
    transformers loop (PLAIN_LOSSES["gpt"]). Tokens/s are samples/s x max_seq_len for both: every
    window is max_seq_len tokens, which is how the gpt family's tokens_per_sec counts them."""
    from dlray.data.text import bundled_documents

    seq_len = load_config(GPT_JOB).data.max_seq_len
    results = {}
    for flavor, chars in GPT_TRAIN_FLAVORS.items():
        overrides = [f"model.flavor={flavor}"]
        if chars:
            corpus = Path(tempfile.mkdtemp(prefix="dlray-bench-corpus-"), "help.txt")
            corpus.write_text("\n\n".join(bundled_documents())[:chars])
            overrides.append(f"data.path={corpus}")
        results[flavor] = bench_train(GPT_JOB, tuple(overrides), worker_counts=(1,)) | {"max_seq_len": seq_len, "corpus_chars": chars}
    return results


def bench_qlora_memory(flavor: str = QLORA_FLAVOR) -> dict:
    """Bytes of the linears QLoRA quantises (every decoder linear; the output layer stays as it is)
    loaded in 4 bits by dlray.finetune.load_options / loaded in bf16. The 4-bit side counts the packed
    weights and every tensor of their quantisation state: an absmax per 64 weights, itself quantised
    to 8 bits under a float32 absmax per 256 of them (double quantisation), and the lookup tables.
    No Ray; bitsandbytes quantises on the CPU as on a GPU."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from dlray.config import FinetuneConfig
    from dlray.finetune import load_options

    info = {"vocab_size": QLORA_VOCAB, "max_seq_len": 2048, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="dlray-bench-qlora-") as directory:
        FAMILIES["gpt"].build({"flavor": flavor, "dropout": 0.0}, info).to(torch.bfloat16).save_pretrained(directory)
        bf16 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
        qlora = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, **load_options(FinetuneConfig(finetuning_type="qlora"), "bf16", FAMILIES["gpt"]))
        quantised = {name: module for name, module in qlora.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
        states = [t for module in quantised.values() for t in _quant_state_tensors(module.weight.quant_state)]
        linears = {"bf16": unique_bytes(bf16.get_submodule(name).weight for name in quantised),
                   "qlora": unique_bytes([*(module.weight for module in quantised.values()), *states])}
        models = {"bf16": unique_bytes(bf16.parameters()), "qlora": unique_bytes([*qlora.parameters(), *states])}
        params = sum(bf16.get_submodule(name).weight.numel() for name in quantised)
        total = bf16.num_parameters()
    return {
        "model": f"gpt/{flavor} ({total / 1e6:.0f}M parameters, {QLORA_VOCAB}-token vocabulary), NF4 + double quantisation",
        "quantised_linears": len(quantised), "quantised_parameters": params,
        "linear_bytes": linears, "qlora_vs_bf16": linears["qlora"] / linears["bf16"], "bits_per_param": 8 * linears["qlora"] / params,
        "model_bytes": models, "model_qlora_vs_bf16": models["qlora"] / models["bf16"],
    }


def _quant_state_tensors(state):
    """Every tensor of a bitsandbytes QuantState, its nested state's included."""
    from bitsandbytes.functional import QuantState

    for value in vars(state).values():
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, QuantState):
            yield from _quant_state_tensors(value)


def bench_generate_engine() -> dict:
    """dlray.serve.engine alone, no Ray or HTTP: GEN_STREAMS[-1] greedy completions decoded as one
    batch / one after another, on one thread as a replica decodes."""
    from dlray.serve.engine import Engine

    artifact, model = _gpt_artifact()
    engine = Engine.from_pretrained(artifact)
    prompts = _prompts(GEN_STREAMS[-1])
    rates = {}
    with one_thread():
        _decode(engine, prompts)  # warm-up
        for label, groups in (("one_at_a_time", [[p] for p in prompts]), ("batched", [prompts])):
            start = time.perf_counter()
            tokens = sum(_decode(engine, group) for group in groups)
            rates[label] = tokens / (time.perf_counter() - start)
    return {"model": model, "sequences": len(prompts), "tokens_per_sec": rates, "batched_vs_one_at_a_time": rates["batched"] / rates["one_at_a_time"]}


def _decode(engine, prompts: list[str]) -> int:
    """Tokens the engine generates for `prompts` decoded together: GEN_MAX_TOKENS each, unless a
    (random) model writes EOS first."""
    from dlray.serve.engine import SamplingParams, Sequence

    sequences = [Sequence(engine.tokenizer.encode(p), SamplingParams(max_tokens=GEN_MAX_TOKENS, temperature=0)) for p in prompts]
    for _ in engine.generate(sequences):
        pass
    return sum(len(s.token_ids) for s in sequences)


def bench_generate_serve() -> dict:
    """Tokens/s of the generate endpoint, streaming /v1/completions over HTTP, at each of GEN_STREAMS
    concurrent clients (GEN_ROUNDS requests each, GEN_MIN_REQUESTS at least), and the time to first
    token; one replica with the default serve settings (continuous batching, up to 32 sequences
    decoding) but for serve.stream_interval, each of GEN_STREAM_INTERVALS; on the CPU and, where there
    is one, on a GPU (serve.num_gpus_per_replica 1)."""
    from ray import serve

    from dlray.serve.app import run
    from dlray.train import init_ray

    init_ray()
    artifact, model = _gpt_artifact()
    url_prompts = _prompts(GEN_STREAMS[-1])
    results: dict = {"model": model, "requests_per_client": GEN_ROUNDS, "min_requests": GEN_MIN_REQUESTS, "devices": {}}
    for device in ["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"]:
        results["devices"][device] = {}
        for interval in GEN_STREAM_INTERVALS:
            serve.shutdown()  # Serve keeps the HTTP port it first started on; this deployment picks its own
            port = free_port()
            run(artifact, {"port": port, "chat": False, "num_gpus_per_replica": 1 if device == "gpu" else 0, "stream_interval": interval},
                verbose=False)  # the trained tokenizer has no chat template; quiet, as `dlray serve` runs
            url, streams = f"http://127.0.0.1:{port}/v1/completions", {}
            for clients in GEN_STREAMS:
                total = max(GEN_MIN_REQUESTS, GEN_ROUNDS * clients)
                request_s = asyncio.run(_stream_load(url, url_prompts, clients, clients))["elapsed_s"]  # warm-up: how long a request takes
                burst = asyncio.run(_stream_load(url, url_prompts, clients, total))
                # Arrivals spread over one request's duration, as a served system sees them: each new
                # request joins a running batch. (All at once, its first token waits for every prompt's prefill.)
                spread = asyncio.run(_stream_load(url, url_prompts, clients, total, stagger_s=request_s))
                streams[str(clients)] = {"tokens_per_sec": burst["tokens_per_sec"], "ttft_p50_ms": spread["ttft_p50_ms"], "burst_ttft_p50_ms": burst["ttft_p50_ms"]}
            serve.delete("dlray")
            most, fewest = streams[str(GEN_STREAMS[-1])], streams[str(GEN_STREAMS[0])]
            results["devices"][device][str(interval)] = {
                "streams": streams, "most_vs_fewest_streams_tokens_per_sec": most["tokens_per_sec"] / fewest["tokens_per_sec"],
                "most_vs_fewest_streams_ttft_p50": most["ttft_p50_ms"] / fewest["ttft_p50_ms"]}
    return results


async def _stream_load(url: str, prompts: list[str], clients: int, total: int, stagger_s: float = 0.0) -> dict:
    ttfts, tokens = [], []

    async def request(session, index: int):
        body = {"prompt": prompts[index % len(prompts)], "max_tokens": GEN_MAX_TOKENS, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        async with session.stream("POST", url, json=body) as response:
            response.raise_for_status()
            first, usage = await _read_events(response.aiter_lines())
        ttfts.append(first - start)
        tokens.append(usage["completion_tokens"])

    elapsed = await drive_clients(clients, total, request, stagger_s)
    return {"tokens_per_sec": sum(tokens) / elapsed, "ttft_p50_ms": 1000 * statistics.median(ttfts), "completion_tokens": sum(tokens), "elapsed_s": elapsed}


async def _read_events(lines) -> tuple[float, dict]:
    """When (time.perf_counter) the first chunk with a choice arrived, and the usage, of an OpenAI
    completion stream of server-sent events. The server sends a choice once it has text, so that
    first chunk is the first token as a client sees it. Chunks between are not parsed: on a small
    machine the load generator's CPU is the server's too."""
    first = usage = None
    async for line in lines:
        if not line.startswith("data:"):
            continue  # the blank line between events
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            break
        if first is None or '"usage"' in data:
            chunk = json.loads(data)
            if first is None and chunk["choices"]:
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    if first is None or usage is None:
        raise RuntimeError(f"the stream ended without {'a choice' if first is None else 'usage (stream_options.include_usage)'}")
    return first, usage


def _gpt_artifact() -> tuple[str, str]:
    """GPT_JOB's model, untrained, with its tokenizer, laid out as `dlray export` writes a language
    model; and a description for the results."""
    from dlray.export import write_artifact

    cfg = load_config(GPT_JOB)
    data = build_data(cfg.data, seed=cfg.train.seed)
    artifact = write_artifact(untrained(cfg, data.info), {"task": "generate", "model": cfg.model.model_dump(), "data_info": data.info, "serve": {}},
                              tempfile.mkdtemp(prefix="dlray-bench-artifact-"))
    data.tokenizer.save_pretrained(artifact)
    return str(artifact), f"gpt/{cfg.model.flavor} untrained, greedy, {GEN_MAX_TOKENS} tokens per completion"


def _prompts(count: int) -> list[str]:
    """Prompts of different lengths from the text the tokenizer learnt: the first words of Python's
    help topics (not their underlines of asterisks)."""
    from dlray.data.text import bundled_documents

    words = [[word for word in document.split() if any(c.isalpha() for c in word)] for document in bundled_documents()[:count]]
    return [" ".join(topic[:4 + i % 8]) for i, topic in enumerate(words)]


def bench_gpt_mfu() -> dict:
    """MFU of gpt/1b (TinyLlama-1.1B's shape) bf16 training on one GPU, side by side: the plain loop a
    PyTorch user writes (eager, then torch.compile), on random tokens in one process, and `dlray train`
    (Ray, FSDP2, train.compile, sdpa attention) on the bundled help texts, its last epoch's `mfu`."""
    if not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    hardware = precision.detect(torch.device("cuda"))
    plain = {}
    for mode in ("eager", "compiled"):
        plain[f"plain_{mode}"] = plain_gpt_tokens_per_sec(compiled=mode == "compiled")
        torch.cuda.empty_cache()  # the model and optimizer state of this run, for the next
    dlray = dlray_gpt_mfu()  # in a Ray worker of its own
    results = {"model": f"gpt/{MFU_FLAVOR}, bf16, AdamW (fused), batch {MFU_BATCH} x {MFU_SEQ_LEN} tokens", "gpu": hardware.name,
               "peak_flops": hardware.peak_flops, **{f"{k}_tokens_per_sec": v for k, v in plain.items()}, **dlray}
    if hardware.peak_flops:
        flops = plain_gpt_flops_per_token()
        results |= {f"{k}_mfu": v * flops / hardware.peak_flops for k, v in plain.items()}
        results["mfu"] = dlray["dlray_mfu"]
        results["dlray_vs_compiled_plain"] = dlray["dlray_mfu"] / results["plain_compiled_mfu"]
    return results


def _mfu_model():
    info = {"vocab_size": MFU_VOCAB, "max_seq_len": MFU_SEQ_LEN, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return FAMILIES["gpt"].build({"flavor": MFU_FLAVOR, "dropout": 0.0}, info)


def plain_gpt_flops_per_token() -> float:
    with torch.device("meta"):
        return FAMILIES["gpt"].flops_per_token(_mfu_model(), MFU_SEQ_LEN)


def plain_gpt_tokens_per_sec(compiled: bool) -> float:
    gpt = FAMILIES["gpt"]
    torch.manual_seed(0)
    model = _mfu_model().cuda().train()
    if compiled:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    windows = torch.randint(MFU_VOCAB, (MFU_BATCH, MFU_SEQ_LEN + 1), device="cuda")
    batch = (windows[:, :-1], windows[:, 1:])

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = gpt.compute_loss(model, batch)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # compilation, kernel selection, the optimizer's state
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(MFU_STEPS):
        step()
    torch.cuda.synchronize()
    return MFU_STEPS * MFU_BATCH * MFU_SEQ_LEN / (time.perf_counter() - start)


def dlray_gpt_mfu() -> dict:
    """`dlray train` of the same model on one GPU worker; the first epoch includes compilation, so the last one counts."""
    from dlray.tracking import read_history
    from dlray.train import fit, init_ray, run_dir

    init_ray()
    cfg = load_config(None, ["model.family=gpt", f"model.flavor={MFU_FLAVOR}", "model.dropout=0.0", "data.name=text", f"data.max_seq_len={MFU_SEQ_LEN}",
                             f"data.vocab_size={MFU_VOCAB}", "data.val_fraction=0.05", "data.test_fraction=0.0", "strategy.name=fsdp", "precision=bf16",
                             "train.compile=true", "train.num_epochs=3", f"train.micro_batch_size={MFU_BATCH}", "scaling.num_workers=1",
                             "scaling.use_gpu=true", f"run.storage_path={tempfile.mkdtemp(prefix='dlray-bench-mfu-')}", "run.name=mfu",
                             "run.checkpoint_num_to_keep=1"])
    result = fit(cfg)
    if result.error:
        raise RuntimeError(f"dlray train of gpt/{MFU_FLAVOR} failed: {result.error}")
    last = [r for r in read_history(run_dir(cfg)) if "train_loss" in r][-1]
    return {"dlray_tokens_per_sec": last["tokens_per_sec"], "dlray_mfu": last.get("mfu")}
