"""The results table of `dlray bench` (benchmarks/results.md), rendered from the results (benchmarks/results.json),
and the machine they were measured on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dlray.bench.llm import MFU_FLAVOR


def machine() -> dict:
    """What a benchmark ran on; `cpu_kind` is what `precision: auto` reads (native bf16, or not)."""
    import ray

    from dlray.precision import detect

    hardware = detect(torch.device("cpu"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kind = f"{torch.backends.cpu.get_cpu_capability()}, {'native bf16' if hardware.native_bf16 else 'no native bf16'}"
    return {"cpu": cpu, "cpu_kind": kind, "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__, "date": time.strftime("%Y-%m-%d")}


def render_markdown(results: dict) -> str:
    lines = ["# dlray benchmark results", "", "Measured with `dlray bench` on these machines (after each, the benchmarks it ran, by key):", ""]
    by_machine: dict[str, list[str]] = {}
    for key, result in results.items():
        if isinstance(result, dict) and (m := result.get("machine")):
            where = (f"{m['date']}: {m['cpu']} ({m.get('cpu_kind', 'kind not recorded')}), {m['cores']} cores, {m['memory_gib']} GiB RAM, GPU: {m['gpu']}; "
                     f"Python {m['python']}, torch {m['torch']}, Ray {m['ray']}")
            by_machine.setdefault(where, []).append(key)
    lines += [f"- {where}: {', '.join(keys)}" for where, keys in sorted(by_machine.items())] + [""]
    lines += ["| benchmark | measured | goal |", "|---|---|---|"]
    if train := results.get("train"):
        lines += _train_rows(train, "train", "plain PyTorch", "samples/s")
    if memory := results.get("memory"):
        b = memory["bytes_per_rank"]
        lines += [
            f"| param+optimizer bytes per rank, FSDP / DDP ({memory['model']}) | {memory['fsdp_vs_ddp']:.2f} ({b['fsdp'] / 2**20:.0f} vs {b['ddp'] / 2**20:.0f} MiB) | <= 0.55 |",
            # ZeRO keeps its own fp32 copy of each partition: 16 bytes per parameter / 2 ranks against DDP's 12
            f"| param+optimizer bytes per rank, ZeRO-3 / DDP | {memory['zero3_vs_ddp']:.2f} ({b['zero3'] / 2**20:.0f} MiB) | <= 0.70 |",
        ]
    if cluster := results.get("cluster"):
        first, rates = cluster["submit_to_first_step_s"], cluster["samples_per_sec"]
        lines += [
            f"| `ray job submit` to first optimizer step, 1st / later jobs on a fresh cluster/local.sh cluster | "
            f"{first['1_node'][0]:.1f} / {statistics.median([*first['2_nodes'], *first['1_node'][1:]]):.1f} s | |",
            f"| train throughput, 2 workers on 2 nodes / on 1 node ({cluster['model']}) | "
            f"{cluster['2_nodes_vs_1_node']:.2f} ({rates['2_nodes']:.0f} vs {rates['1_node']:.0f} samples/s) | (cost of crossing nodes) |",
        ]
    if tune := results.get("tune"):
        runs = lambda key: " / ".join(f"{r[key]}" for r in tune["search"]["asha"]) + " vs " + " / ".join(f"{r[key]}" for r in tune["search"]["fifo"])  # noqa: E731
        lines += [
            f"| sweep epochs until a trial reaches val_accuracy {tune['target_val_accuracy']}, ASHA / FIFO (random search, {tune['num_samples']} trials x "
            f"{tune['epochs_per_trial']} epochs, seeds {', '.join(str(r['seed']) for r in tune['search']['asha'])}) | "
            f"{tune['asha_vs_fifo_epochs_to_target']:.2f} ({runs('epochs_to_target')}) | <= 0.5 |",
            f"| sweep epochs in total, ASHA / FIFO | {tune['asha_vs_fifo_total_epochs']:.2f} ({runs('total_epochs')}) | |",
            f"| Tune overhead: {tune['overhead_trials']} identical 3-epoch trials, one at a time / {tune['overhead_trials']} standalone runs | "
            f"{tune['tune_overhead']:.2f} ({tune['sweep_s']:.0f} s vs {tune['overhead_trials']} x {tune['standalone_run_s']:.0f} s) | <= 1.2 |",
        ]
    if data := results.get("data"):
        own, rss, mb, rates = data["worker_peak_private_mib"], data["worker_peak_rss_mib"], data["image_folder_mb"], data["samples_per_sec"]
        small, large = sorted(own, key=float)
        lines += [
            _row(f"training worker peak memory, its own (resident less shared), streaming a {mb[large]:.0f} MB / a {mb[small]:.0f} MB image folder "
                 f"(cnn/debug, 224 px PNGs resized to 16 by Ray Data; resident with the object store's pages it read: {rss[large]:.0f} vs {rss[small]:.0f} MiB)",
                 f"{data['large_vs_small_private']:.2f} ({own[large]:.0f} vs {own[small]:.0f} MiB)", "<= 1.3"),
            *(_row(f"train throughput, streamed / in memory ({name.replace('_', ' ')}; median of {epoch_count(data, name)}, "
                   f"each run's first left out; epochs streamed, run after run: {', '.join(f'{r:.0f}' for r in data['epoch_samples_per_sec'][name]['true'])})",
                   f"{data['streamed_vs_in_memory'][name]:.2f} ({rates[name]['true']:.0f} vs {rates[name]['false']:.0f} samples/s)", ">= 0.9") for name in rates),
            _row(f"streamed decode + resize + augment throughput, 2 / 1 CPUs (the {mb[large]:.0f} MB folder's training split to 64 px, workers warm)",
                 f"{data['decode_2_vs_1_cpus']:.2f} ({data['decode_images_per_sec']['2']:.0f} vs {data['decode_images_per_sec']['1']:.0f} images/s)", "> 1 (2 cores)"),
        ]
    if text := results.get("data_text_memory"):
        own, mb, worker = text["worker_peak_private_mib"], text["text_mb"], text["worker"]
        small, large = sorted(own, key=float)
        lines.append(_row(f"training worker peak memory, its own, streaming {mb[large]} MB / {mb[small]} MB of text (parquet shards, tokenized and packed into "
                          f"{worker[large]['windows']:,} / {worker[small]['windows']:,} gpt/debug windows by Ray Data; the worker reads its shard as the loop "
                          f"does, no model step; resident with the object store's pages: {worker[large]['peak_rss_mib']:.0f} vs {worker[small]['peak_rss_mib']:.0f} MiB)",
                          f"{text['large_vs_small_private']:.2f} ({own[large]:.0f} vs {own[small]:.0f} MiB)", "<= 1.3"))
    if serve := results.get("serve"):

        lines += [
            f"| serve throughput, batched / unbatched at {serve['concurrent_clients']} clients ({serve['model']}) | "
            f"{serve['batched_vs_unbatched_throughput']:.2f} ({serve['batched']['requests_per_sec']:.0f} vs {serve['unbatched']['requests_per_sec']:.0f} req/s) | >= 2 |",
            f"| serve latency p50 / p99, batched | {serve['batched']['p50_ms']:.0f} / {serve['batched']['p99_ms']:.0f} ms | |",
            f"| serve latency p50 / p99, unbatched | {serve['unbatched']['p50_ms']:.0f} / {serve['unbatched']['p99_ms']:.0f} ms | |",
        ]
    if diffusion := results.get("diffusion_train"):
        lines += _train_rows(diffusion, "diffusion train", "plain diffusers loop", "images/s")
    if sampling := results.get("diffusion_sampling"):
        lines += [f"| sampling latency, DDPM 1000 steps / DDIM 50 steps ({sampling['model']}) | "
                  f"{sampling['ddim_50_speedup_vs_ddpm_1000']:.1f}x ({sampling['ddpm_1000_s']:.2f} vs {sampling['ddim_50_s']:.2f} s) | >= 15x |"]
    if quality := results.get("diffusion_quality"):
        generated, noise, real = quality["generated"], quality["noise"], quality["real"]
        lines += [_row(f"samples' classifier score / uniform noise's, judged by the digits CNN ({quality['model']}, {quality['samples']} each; "
                       f"real digits score {real['classifier_score']:.1f}; samples confidently labelled: {generated['confident_fraction']:.0%}, "
                       f"over {generated['confident_classes']} classes)",
                       f"{generated['classifier_score'] / noise['classifier_score']:.1f}x ({generated['classifier_score']:.1f} vs {noise['classifier_score']:.1f})",
                       ">= 3x, samples >= 4")]
    if images := results.get("diffusion_serve"):
        lines += [
            f"| images endpoint throughput, batched / unbatched at {images['concurrent_clients']} clients ({images['model']}) | "
            f"{images['batched_vs_unbatched_throughput']:.2f} ({images['batched']['requests_per_sec']:.1f} vs {images['unbatched']['requests_per_sec']:.1f} images/s) | > 1 |",
            f"| images endpoint latency p50 / p99, batched | {images['batched']['p50_ms']:.0f} / {images['batched']['p99_ms']:.0f} ms | |",
        ]
    lines += _llm_rows(results)
    if upload := results.get("checkpoint_upload"):
        m, n = upload["median_s"], upload["checkpoints_per_mode"]
        lines += [
            _row(f"time a step waits in the checkpoint report, run.checkpoint_upload async / sync ({upload['checkpoint_mb']} MB fp32 state dict, 1 worker, "
                 f"run.storage_path on local disk; median of {n} checkpoints each, alternating in one Ray Train run)",
                 f"{upload['async_vs_sync_report']:.2f} ({1000 * m['async_report']:.0f} vs {1000 * m['sync_report']:.0f} ms)", "<= 0.2"),
            _row("time a step waits on a checkpoint, local save included (the save into a temporary directory stays synchronous), async / sync",
                 f"{upload['async_vs_sync_blocked']:.2f} ({1000 * m['async_blocked']:.0f} vs {1000 * m['sync_blocked']:.0f} ms)"),
            _row("a metrics-only report made right after an async checkpoint, in Ray's default (sync) mode / in async mode (Ray hands reports on in order: "
                 "a sync one waits behind the upload)", f"{1000 * m['next_report_sync_mode']:.0f} / {1000 * m['next_report_async_mode']:.0f} ms", "(informative)"),
        ]
    return "\n".join(lines) + "\n"


def _train_rows(train: dict, label: str, baseline: str, unit: str, per_sample: int = 1) -> list[str]:
    """bench_train's rows, in units of `per_sample` per sample (tokens of a text window)."""
    rows = [f"| {label} throughput, dlray 1 worker / {baseline} ({train['model']}, batch {train['micro_batch_size']}) | {train['ratio_1_worker_vs_plain']:.2f} "
            f"({train['dlray_1_worker_samples_per_sec'] * per_sample:.0f} vs {train['plain_pytorch_samples_per_sec'] * per_sample:.0f} {unit}) | >= 0.90 |"]
    if "scaling_2_vs_1_workers" in train:
        rows.append(f"| {label} scaling, 2 workers / 1 worker | {train['scaling_2_vs_1_workers']:.2f} "
                    f"({train['dlray_2_workers_samples_per_sec'] * per_sample:.0f} {unit}) | (2 cores) |")
    return rows


def _llm_rows(results: dict) -> list[str]:
    lines = []
    for flavor, train in results.get("llm_train", {}).items():
        if flavor == "machine":  # what it ran on, beside its flavours
            continue
        corpus = f", the corpus' first {train['corpus_chars'] // 1000} KB" if train.get("corpus_chars") else ""
        lines += _train_rows(train, f"LLM train ({train['max_seq_len']}-token windows{corpus})", "plain PyTorch + transformers loop", "tokens/s", train["max_seq_len"])
    if memory := results.get("llm_qlora_memory"):
        linear, model = memory["linear_bytes"], memory["model_bytes"]
        lines.append(_row(f"QLoRA weight bytes / bf16, the {memory['quantised_linears']} quantised linears ({memory['model']})",
                          f"{memory['qlora_vs_bf16']:.3f} ({memory['bits_per_param']:.3f} bits/param; {linear['qlora'] / 2**20:.1f} vs {linear['bf16'] / 2**20:.1f} MiB)",
                          "<= 0.27"))
        lines.append(_row("QLoRA weight bytes / bf16, whole model (embedding and output layer stay bf16)",
                          f"{memory['model_qlora_vs_bf16']:.2f} ({model['qlora'] / 2**20:.0f} vs {model['bf16'] / 2**20:.0f} MiB)"))
    if engine := results.get("llm_engine"):
        rates = engine["tokens_per_sec"]
        lines.append(_row(f"generation engine alone, {engine['sequences']} sequences batched / one at a time ({engine['model']}, 1 thread)",
                          f"{engine['batched_vs_one_at_a_time']:.2f} ({rates['batched']:.0f} vs {rates['one_at_a_time']:.0f} tokens/s)", "> 1"))
    if serve := results.get("llm_serve"):
        for device, intervals in serve["devices"].items():
            for interval, measured in intervals.items():
                (few, low), (most, high) = list(measured["streams"].items())[0], list(measured["streams"].items())[-1]
                where = f"{serve['model']}, replica on the {device.upper()}, continuous batching"
                writes = "each token a write (serve.stream_interval 1, the default)" if interval == "1" else \
                    f"serve.stream_interval {interval}: the first token, then {interval} a write"
                lines.append(_row(f"generate endpoint throughput, {most} / {few} streaming clients ({where}; {writes})",
                                  f"{measured['most_vs_fewest_streams_tokens_per_sec']:.2f} ({high['tokens_per_sec']:.0f} vs {low['tokens_per_sec']:.0f} tokens/s)", ">= 4"))
                spread = f"arrivals spread over a request's duration ({device.upper()}, stream_interval {interval})"
                lines.append(_row(f"generate endpoint time to first token p50, {most} / {few} streams, {spread}",
                                  f"{measured['most_vs_fewest_streams_ttft_p50']:.2f} ({high['ttft_p50_ms']:.0f} vs {low['ttft_p50_ms']:.0f} ms)", "<= 3"))
                if interval == "1":
                    lines.append(_row(f"generate endpoint time to first token p50, {most} requests arriving at once ({device.upper()}: every prompt prefilled first)",
                                      f"{high['burst_ttft_p50_ms']:.0f} ms", "(informative)"))
        for device, vllm in serve.get("vllm", {}).items():
            if "skipped" in vllm:
                lines.append(_row(f"generate endpoint on vLLM ({device.upper()})", f"skipped: {vllm['skipped']}", "(informative)"))
                continue
            dlray = serve["devices"][device]["1"]["streams"]
            for clients, ratio in vllm["vs_dlray"].items():
                where = f"{serve['model']}, {clients} streaming clients, one replica on the {device.upper()}"
                ours, theirs = dlray[clients], vllm["streams"][clients]
                lines.append(_row(f"generate endpoint throughput, vLLM (Ray Serve LLM) / dlray's engine ({where})",
                                  f"{ratio['tokens_per_sec']:.2f} ({theirs['tokens_per_sec']:.0f} vs {ours['tokens_per_sec']:.0f} tokens/s)", "(informative)"))
                lines.append(_row(f"generate endpoint time to first token p50, vLLM / dlray's engine ({where}, arrivals spread)",
                                  f"{ratio['ttft_p50']:.2f} ({theirs['ttft_p50_ms']:.0f} vs {ours['ttft_p50_ms']:.0f} ms)", "(informative)"))
    if mfu := results.get("llm_mfu"):
        formula = "FLOPs/token = 6N + 12·L·H·T"
        if "skipped" in mfu:
            lines.append(_row(f"MFU of gpt/{MFU_FLAVOR} bf16 training, {formula}", f"skipped: {mfu['skipped']}", ">= 45% through dlray train (H100-class GPU)"))
        else:
            title = f"MFU of training {mfu['model']}, {formula}"
            for key, name in (("plain_eager", "plain loop, eager"), ("plain_compiled", "plain loop, torch.compile"), ("dlray", "dlray train (FSDP2, compile)")):
                if f"{key}_tokens_per_sec" not in mfu:  # a dry run without compilation
                    continue
                rate = f"{mfu[f'{key}_tokens_per_sec']:.0f} tokens/s over {mfu[f'{key}_timed_steps']} steps on {mfu['gpu']}"
                share = mfu.get(f"{key}_mfu")
                measured = f"{100 * share:.1f}% ({rate})" if share is not None else f"{rate} (peak FLOPs unknown)"
                goal = ">= 45%, >= 0.95 of the compiled plain loop" if key == "dlray" else ""
                if key == "dlray" and "dlray_vs_compiled_plain" in mfu:
                    measured += f"; {mfu['dlray_vs_compiled_plain']:.2f} of the compiled plain loop's tokens/s"
                lines.append(_row(f"{title}: {name}", measured, goal))
    return lines


def _row(benchmark: str, measured: str, goal: str = "") -> str:
    return f"| {benchmark} | {measured} | {goal} |"


def epoch_count(data: dict, name: str) -> str:
    """'2 runs x 7 epochs'."""
    runs = data["throughput_runs"]
    return f"{runs} runs x {len(data['epoch_samples_per_sec'][name]['true']) // runs} epochs"
