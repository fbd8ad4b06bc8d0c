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
from dataclasses import dataclass
from pathlib import Path

import torch

from dlray import precision
from dlray.bench.common import drive_clients, one_thread, unique_bytes, untrained
from dlray.bench.train import bench_train
from dlray.config import JobConfig, load_config
from dlray.data import build_data
from dlray.local_cluster import free_port
from dlray.models import FAMILIES
from dlray.precision import PRECISION_DTYPES

GPT_JOB = "jobs/gpt_pretrain.yaml"
# flavor -> characters of the bundled help texts it trains on (None: all ~0.5 MB). `small` takes
# about 4 s a step on one CPU thread: the whole corpus would keep its dlray and plain runs over an
# hour, its first 48 KB (~85 training windows, 5 steps an epoch) about a minute and a half each.
GPT_TRAIN_FLAVORS = {"debug": None, "small": 48_000}
QLORA_FLAVOR, QLORA_VOCAB = "base", 32000  # 110M parameters, GPT-2 small's body with a Llama-sized vocabulary
GEN_STREAMS, GEN_ROUNDS, GEN_MAX_TOKENS = (1, 16), 4, 64
GEN_MIN_REQUESTS = 16  # one stream's 4 requests last half a second: too few to time
GEN_STREAM_INTERVALS = (1, 4, 16)  # serve.stream_interval: 1 (the default) writes each token as its step ends
MFU_FLAVOR, MFU_BATCH, MFU_SEQ_LEN, MFU_VOCAB = "1b", 4, 2048, 32000


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
    token; one replica on the CPU and, where there is one, on a GPU (serve.num_gpus_per_replica 1).
    Side by side on the same export: dlray's engine (continuous batching, up to 32 sequences decoding)
    at each serve.stream_interval of GEN_STREAM_INTERVALS, and vLLM through Ray Serve LLM
    (serve.engine vllm, the same serve defaults: up to 32 sequences) where vLLM is installed."""
    from ray import serve

    from dlray.artifact import read_artifact_config
    from dlray.local_cluster import init_ray
    from dlray.serve.vllm import vllm_unusable

    init_ray()
    artifact, model = _gpt_artifact()
    prompts = _prompts(GEN_STREAMS[-1])
    results: dict = {"model": model, "requests_per_client": GEN_ROUNDS, "min_requests": GEN_MIN_REQUESTS, "devices": {}, "vllm": {}}
    for device in ["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"]:
        keys = {"num_gpus_per_replica": 1 if device == "gpu" else 0}
        results["devices"][device] = {str(interval): _served_streams(artifact, prompts, {**keys, "engine": "dlray", "stream_interval": interval})
                                      for interval in GEN_STREAM_INTERVALS}
        if why := vllm_unusable(artifact, read_artifact_config(artifact), on_gpu=device == "gpu"):
            results["vllm"][device] = {"skipped": why}
            continue
        measured = _served_streams(artifact, prompts, {**keys, "engine": "vllm"})  # serve.max_num_seqs' default is vLLM's max_num_seqs too
        dlray = results["devices"][device]["1"]["streams"]
        measured["vs_dlray"] = {clients: {"tokens_per_sec": streams["tokens_per_sec"] / dlray[clients]["tokens_per_sec"],
                                          "ttft_p50": streams["ttft_p50_ms"] / dlray[clients]["ttft_p50_ms"]}
                                for clients, streams in measured["streams"].items()}
        results["vllm"][device] = measured
    serve.shutdown()
    return results


def _served_streams(artifact: str, prompts: list[str], serve_keys: dict) -> dict:
    """One app serving the artifact with these serve: keys, measured at each of GEN_STREAMS clients."""
    from ray import serve

    from dlray.serve.app import run

    serve.shutdown()  # Serve keeps the HTTP port it first started on; this deployment picks its own
    port = free_port()
    run(artifact, {"port": port, **serve_keys}, verbose=False)  # quiet, as `dlray serve` runs
    url, streams = f"http://127.0.0.1:{port}/v1/completions", {}
    for clients in GEN_STREAMS:
        total = max(GEN_MIN_REQUESTS, GEN_ROUNDS * clients)
        request_s = asyncio.run(_stream_load(url, prompts, clients, clients))["elapsed_s"]  # warm-up: how long a request takes
        burst = asyncio.run(_stream_load(url, prompts, clients, total))
        # Arrivals spread over one request's duration, as a served system sees them: each new
        # request joins a running batch. (All at once, its first token waits for every prompt's prefill.)
        spread = asyncio.run(_stream_load(url, prompts, clients, total, stagger_s=request_s))
        streams[str(clients)] = {"tokens_per_sec": burst["tokens_per_sec"], "ttft_p50_ms": spread["ttft_p50_ms"], "burst_ttft_p50_ms": burst["ttft_p50_ms"]}
    most, fewest = streams[str(GEN_STREAMS[-1])], streams[str(GEN_STREAMS[0])]
    return {"streams": streams, "most_vs_fewest_streams_tokens_per_sec": most["tokens_per_sec"] / fewest["tokens_per_sec"],
            "most_vs_fewest_streams_ttft_p50": most["ttft_p50_ms"] / fewest["ttft_p50_ms"]}


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
    from dlray.artifact import write_artifact

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
    PyTorch user writes (eager, then torch.compile) in one process, and `dlray train` (Ray, FSDP2,
    train.compile, sdpa attention), one model on one token stream (MFURun)."""
    if not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    return compare_gpt_training(MFURun())


@dataclass(frozen=True)
class MFURun:
    """What bench_gpt_mfu trains, on each side. Both sides build their model from the data's info, so
    from one tokenizer: a generated one over the whole `vocab` (32000: the 1b flavor's 1.100B parameters).
    The bundled help texts would train a tokenizer of ~9.2k tokens (a 1.007B model) and pack into ~50
    windows, a dozen steps an epoch. A CPU dry run shrinks it: compare_gpt_training(MFURun(flavor="debug",
    seq_len=64, timed_steps=6, precision="fp32", compile=False, device="cpu"))."""

    flavor: str = MFU_FLAVOR
    vocab: int = MFU_VOCAB
    seq_len: int = MFU_SEQ_LEN
    batch: int = MFU_BATCH
    warmup_steps: int = 5  # compilation, kernel selection, the optimizer's state
    timed_steps: int = 50  # after warm-up; dlray times its second epoch of this many steps (the first is its warm-up)
    precision: str = "bf16"
    compile: bool = True  # the compiled plain loop and train.compile (False: eager only, for a CPU dry run)
    device: str = "cuda"


def compare_gpt_training(run: MFURun) -> dict:
    """Tokens/s and MFU (tokens/s x the model's FLOPs per token / the GPU's peak, as dlray's loop computes its
    `mfu`) of each side on `run.device`, and dlray's tokens/s over the compiled (else eager) plain loop's."""
    device = torch.device(run.device)
    hardware = precision.detect(device)
    with tempfile.TemporaryDirectory(prefix="dlray-bench-mfu-") as directory:
        cfg = mfu_job(run, Path(directory))
        data = build_data(cfg.data, seed=cfg.train.seed)  # the windows dlray trains on, through its own text source
        flops = _flops_per_token(cfg, data.info)
        sides = {}
        for mode in ("eager", "compiled") if run.compile else ("eager",):
            sides[f"plain_{mode}"] = {"tokens_per_sec": plain_gpt_tokens_per_sec(run, cfg, data, compiled=mode == "compiled"), "timed_steps": run.timed_steps}
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the model and optimizer state of this run, for the next
        sides["dlray"] = dlray_gpt_tokens_per_sec(cfg)  # in a Ray worker of its own
    params = sum(p.numel() for p in _meta_model(cfg, data.info).parameters())
    results = {"model": f"gpt/{run.flavor}, {params / 1e9:.3f}B parameters, {data.info['vocab_size']}-token vocabulary; {run.precision}, "
                        f"AdamW{' (fused)' if device.type == 'cuda' else ''}, batch {run.batch} x {run.seq_len} tokens; random tokens over the whole vocabulary",
               "gpu": hardware.name, "peak_flops": hardware.peak_flops, "flops_per_token": flops, "warmup_steps": run.warmup_steps}
    for side, measured in sides.items():
        results |= {f"{side}_{key}": value for key, value in measured.items()}
        if hardware.peak_flops:
            results[f"{side}_mfu"] = measured["tokens_per_sec"] * flops / hardware.peak_flops
    plain = "plain_compiled" if run.compile else "plain_eager"
    results["dlray_vs_compiled_plain" if run.compile else "dlray_vs_eager_plain"] = sides["dlray"]["tokens_per_sec"] / sides[plain]["tokens_per_sec"]
    return results


def mfu_job(run: MFURun, directory: Path) -> JobConfig:
    """dlray's job for `run`, on a generated token stream under `directory`: `run.timed_steps` training
    batches an epoch and one validation batch."""
    train_windows, val_windows = run.timed_steps * run.batch, run.batch
    val_fraction = val_windows / (train_windows + val_windows)
    corpus, tokenizer = write_token_stream(directory, run.vocab, {"train": train_windows, "val": val_windows}, run.seq_len, val_fraction)
    return load_config(None, [
        "model.family=gpt", f"model.flavor={run.flavor}", "model.dropout=0.0", "data.name=text", f"data.path={corpus}",
        f"data.tokenizer={tokenizer}", f"data.max_seq_len={run.seq_len}", f"data.val_fraction={val_fraction}",
        "data.test_fraction=0.0", "strategy.name=fsdp", f"precision={run.precision}", f"train.compile={str(run.compile).lower()}",
        "train.num_epochs=2", f"train.micro_batch_size={run.batch}", "scaling.num_workers=1", f"scaling.use_gpu={str(run.device == 'cuda').lower()}",
        f"run.storage_path={directory / 'runs'}", "run.name=mfu", "run.checkpoint_num_to_keep=1"])


def write_token_stream(directory: Path, vocab_size: int, windows: dict[str, int], seq_len: int, val_fraction: float,
                       seed: int = 0) -> tuple[Path, Path]:
    """Random tokens over a whole vocabulary as files dlray's `text` source reads: a word-level tokenizer
    whose words are the token ids (`t<id>`, after the special tokens' ids 0-2, as in a trained tokenizer),
    and one document per split (`windows`: split -> windows) of windows x seq_len such words, which tokenises
    back to exactly those ids (then EOS) and so packs into exactly its windows. The source splits by
    document hash (train.seed's): each document is drawn until its hash puts it in its split.
    (corpus folder, tokenizer directory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dlray.data.rows import SPLITS, split_of
    from dlray.data.text import SPECIAL_TOKENS

    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: i for i, token in enumerate(specials)} | {f"t{i}": i for i in range(len(specials), vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["pad_token"]))  # every word is in the vocabulary
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, **SPECIAL_TOKENS).save_pretrained(directory / "tokenizer")
    generator = torch.Generator().manual_seed(seed)
    (directory / "tokens").mkdir()
    for index, (split, count) in enumerate(windows.items()):
        text = ""
        while not text or split_of(text, val_fraction, 0.0, JobConfig().train.seed) != SPLITS.index(split):
            text = " ".join(f"t{i}" for i in torch.randint(len(specials), vocab_size, (count * seq_len,), generator=generator).tolist())
        (directory / f"tokens/{index}-{split}.txt").write_text(text)
    return directory / "tokens", directory / "tokenizer"


def _meta_model(cfg: JobConfig, info: dict):
    with torch.device("meta"):  # the shapes without allocating
        return FAMILIES["gpt"].build(cfg.model.model_dump(), info)


def _flops_per_token(cfg: JobConfig, info: dict) -> float:
    return FAMILIES["gpt"].flops_per_token(_meta_model(cfg, info), info["max_seq_len"])


def plain_gpt_tokens_per_sec(run: MFURun, cfg: JobConfig, data, compiled: bool) -> float:
    """The plain loop: dlray's model (the family's build), AdamW (fused on CUDA) and autocast, on the
    training windows of `data` in order, each batch copied to the device as it is taken."""
    gpt, device = FAMILIES["gpt"], torch.device(run.device)
    model = untrained(cfg, data.info).to(device).train()
    if compiled:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=device.type == "cuda")
    windows = torch.cat([data.train.columns["input_ids"], data.train.columns["labels"][:, -1:]], 1)  # max_seq_len + 1 tokens each
    if device.type == "cuda":
        windows = windows.pin_memory()  # so that each batch's copy runs asynchronously, as a DataLoader's pinned batches do
    batches = windows[: len(windows) // run.batch * run.batch].split(run.batch)  # whole batches: no new shape to compile for
    dtype = PRECISION_DTYPES[run.precision]

    def step(window):
        window = window.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = gpt.compute_loss(model, (window[:, :-1], window[:, 1:]))["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(run.warmup_steps):
        step(batches[i % len(batches)])
    _synchronize(device)
    start = time.perf_counter()
    for i in range(run.warmup_steps, run.warmup_steps + run.timed_steps):
        step(batches[i % len(batches)])
    _synchronize(device)
    return run.timed_steps * run.batch * run.seq_len / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dlray_gpt_tokens_per_sec(cfg: JobConfig) -> dict:
    """`dlray train` of `cfg` (one worker): its last epoch's tokens/s, and the steps that epoch took. The
    first epoch (compilation included) is the warm-up."""
    from dlray import reports
    from dlray.local_cluster import init_ray
    from dlray.runfiles import read_history
    from dlray.train import fit, run_dir

    init_ray()
    result = fit(cfg)
    if result.error:
        raise RuntimeError(f"dlray train of gpt/{cfg.model.flavor} failed: {result.error}")
    epochs = reports.epochs(read_history(run_dir(cfg)))
    return {"tokens_per_sec": epochs[-1]["tokens_per_sec"], "timed_steps": epochs[-1]["global_step"] - epochs[-2]["global_step"]}
