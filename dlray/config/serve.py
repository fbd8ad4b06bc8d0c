"""The `serve:` section: how Ray Serve deploys an artifact's endpoint (DeploymentSettings), and each
endpoint's own settings, which are also its deployment's constructor argument (dlray.serve.app builds
`Deployment.bind(artifact, settings)`). Every default is written once, here.

A job's `serve:` section (ServeSection) takes the keys of every shipped endpoint: a job is written before
its artifact exists. `dlray serve` and the app builder take only the keys of the artifact's endpoint.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlray.config.sections import Section


class AutoscalingSection(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)


class DeploymentSettings(Section):
    """Ray Serve's side: where Serve listens, and the replicas (Serve's deployment options)."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSection | None = None  # overrides num_replicas when set
    max_ongoing_requests: int = Field(128, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_cpus_per_replica: float = Field(1.0, ge=0)
    num_gpus_per_replica: float = Field(0.0, ge=0)  # Ray's ray_actor_options.num_gpus: > 0 serves on the replica's GPU


class EndpointSettings(Section):
    """What every endpoint's replica takes."""

    max_body_bytes: int = Field(2_000_000, ge=1024)
    # The dtype a replica holds its model in (dlray.precision.serve_dtype). auto: bf16 on a GPU with bf16, fp16
    # on an older GPU, fp32 on a CPU. fp32 on a GPU is full fp32 (no TF32): the reference to check a replica against.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class BatchSettings(EndpointSettings):
    """Endpoints whose concurrent requests @serve.batch folds into one forward pass."""

    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)


class ClassifySettings(BatchSettings):
    """dlray.serve.classify (cnn, vit, bert, rnn)."""


class ImagesSettings(BatchSettings):
    """dlray.serve.images (diffusion, vae, gan): limits beyond which a request gets a 400, and defaults."""

    max_images_per_request: int = Field(8, ge=1)  # OpenAI's `n`
    max_inference_steps: int = Field(1000, ge=1)
    num_inference_steps: int = Field(50, ge=1)  # when a request names none
    scheduler: Literal["ddpm", "ddim"] = "ddim"  # when a request names none


class GenerateSettings(EndpointSettings):
    """dlray.serve.generate (causal LMs; OpenAI completions and chat): names as vLLM's where it has them."""

    max_tokens_limit: int = Field(1024, ge=1)  # a request's max_tokens above this gets a 400
    # Continuous batching, per replica: sequences (a request's choices) in the decoding batch at once;
    max_num_seqs: int = Field(32, ge=1)
    # their prompt + max_tokens summed (TGI's name: the KV-cache entries they can come to hold); None: no cap
    max_batch_total_tokens: int | None = Field(None, ge=1)
    # requests waiting to join the batch; one more gets a 429 with Retry-After. Keep max_ongoing_requests
    # above max_num_seqs + max_queue_len, or Serve queues requests before they reach this queue.
    max_queue_len: int = Field(64, ge=1)
    # a stream's tokens per chunk after its first (vLLM's and SGLang's name): 1 sends each as its step ends;
    # more cost the replica, Serve's proxy and the client one write per that many tokens instead of per token
    stream_interval: int = Field(1, ge=1)
    max_completions_per_request: int = Field(4, ge=1)  # OpenAI's `n`
    chat: bool = True  # false: /v1/completions only (a model without a chat template answers chat requests with a 400 anyway)
    api_key_env: str | None = None  # the environment variable holding the API key; unset: no key needed
    served_model_name: str | None = None  # the `model` clients name; default: the artifact directory's name
    # LoRA adapters over the served model, by name: a request for model "<served name>:<name>" decodes
    # with that adapter, batched with requests for the base and for other adapters (vLLM's multi-LoRA).
    adapters: dict[str, str] | None = None  # name -> adapter directory (`dlray export` of a lora / qlora run)
    # Which engine decodes (dlray.serve.vllm.choose_engine): vllm serves through Ray Serve LLM (ray.serve.llm);
    # dlray is dlray's own continuous-batching engine over transformers; auto: vLLM where it is installed and
    # supports the model's architecture, else dlray's. `dlray serve` says which it took and why.
    engine: Literal["auto", "vllm", "dlray"] = "auto"
    # vLLM's engine arguments, under vLLM's names; dlray's engine has none of them (serving it with one set is refused).
    max_model_len: int | None = Field(None, ge=1)  # None: the model's own context
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs one replica spans (num_gpus_per_replica is per GPU then)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)  # None: vLLM's default
    kv_cache_memory_bytes: int | None = Field(None, ge=1)  # the KV cache's size outright; on a CPU, where it is needed
    enable_prefix_caching: bool | None = None  # None: vLLM's default (on)
    enforce_eager: bool = False  # no graph capture or compilation: a faster start, slower steps
    tool_call_parser: str | None = None  # how vLLM reads tool calls out of the output ("hermes" for dlray's chat template); None: no `tools`


class ServeSection(DeploymentSettings, ClassifySettings, ImagesSettings, GenerateSettings):
    """A job's `serve:` section: the deployment's keys and those of every shipped endpoint. Its export
    carries it; dlray.serve.app serves the artifact with the keys of the artifact's own endpoint."""
