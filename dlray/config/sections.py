"""The job's sections: what to train (model, finetune, data), how (train, optim, scheduler, strategy),
where (scaling, run) and how it is served (serve). Each checks its own keys; dlray.config.job checks
keys of different sections against each other."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dlray.models import FAMILIES

TEXT_DATA = {"text": "a language model", "text_classification": "a text classifier"}  # data.name -> what trains on it


def families_where(test) -> list[str]:
    """The names of the families for which test(family) holds, for error messages."""
    return [name for name, family in FAMILIES.items() if test(family)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def applies_only(section: Section, selector: str, owners: Mapping[str, Sequence[str]], *, kinds: Mapping[str, str] | None = None,
                 bare_got: bool = False) -> None:
    """Refuses a key set in a section whose `selector` (its dotted name, e.g. "model.family") has a value the
    key does nothing for. owners: key -> the selector values it applies to (none: every value). The error reads
    "<section>.<key> applies only to <selector> 'a' or 'b', got <selector> 'c'"; kinds: key -> a name for its
    owners, worded "<kind> (<selector> 'a' or 'b')"; bare_got: "got 'c'", without the selector's name."""
    prefix, field = selector.split(".")
    current = getattr(section, field)
    for key, among in owners.items():
        # Compared with the default rather than "was it set", so a dumped config reloads.
        if among and getattr(section, key) != type(section).model_fields[key].default and current not in among:
            allowed = f"{selector} {' or '.join(map(repr, among))}"
            if kinds:
                allowed = f"{kinds[key]} ({allowed})"
            raise ValueError(f"{prefix}.{key} applies only to {allowed}, got {'' if bare_got else selector + ' '}{current!r}")


class ModelConfig(Section):
    family: str = "cnn"  # a name in dlray.models.FAMILIES (checked against the registry as it is when validating)
    flavor: str = "debug"  # a named size in the family's FLAVORS
    # Start from a pretrained Hugging Face model (a local directory or a hub id) instead of building
    # `flavor` from scratch: what LLaMA-Factory calls model_name_or_path, Axolotl base_model.
    name_or_path: str | None = None
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # cnn, diffusion, vit, bert; gpt: attention dropout
    # The attention kernel of the transformers families (transformers' name): sdpa is PyTorch's fused
    # scaled_dot_product_attention (flash / memory-efficient kernels on GPUs), flash_attention_2 needs
    # the flash-attn package on CUDA workers, eager is the plain matmul-softmax reference.
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    # diffusion (names as in diffusers' DDPMScheduler; `cosine` is its squaredcos_cap_v2)
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "cosine"] = "linear"
    class_conditional: bool = False  # the UNet also takes the class label (classifier-free: no)
    # vae: weight of the KL term in the ELBO (beta-VAE; 1.0 is the plain VAE)
    kl_weight: float = Field(1.0, ge=0)

    @field_validator("family")
    @classmethod
    def _known_family(cls, name: str) -> str:
        if name not in FAMILIES:
            raise ValueError(f"model.family must be one of {list(FAMILIES)}, got {name!r}")
        return name

    @model_validator(mode="after")
    def _known_flavor(self):
        family = FAMILIES[self.family]
        if self.flavor not in family.flavors:
            raise ValueError(f"model.flavor must be one of {sorted(family.flavors)} for family {self.family!r}, got {self.flavor!r}")
        # Keys that only some families read: their own (extra_model_keys), or the pretrained transformers families'.
        only = {key: families_where(lambda f, key=key: key in f.extra_model_keys) for key in type(self).model_fields}
        only |= {key: families_where(lambda f: f.pretrained) for key in ("name_or_path", "attn_implementation")}
        applies_only(self, "model.family", only)
        return self


class FinetuneConfig(Section):
    """How much of a model trains. Names as in LLaMA-Factory (`finetuning_type`) and Axolotl (`lora_*`)."""

    # full: every weight; freeze: only the family's head (feature extraction); lora: low-rank adapters on
    # frozen weights; qlora: lora over weights quantised to 4 bits (bitsandbytes NF4); prompt_tuning:
    # trained virtual tokens before the input. All but full need model.name_or_path.
    finetuning_type: Literal["full", "freeze", "lora", "qlora", "prompt_tuning"] = "full"
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    # Module names (suffixes) the adapters wrap, or "all-linear" (every linear layer but the output layer).
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    num_virtual_tokens: int = Field(20, ge=1)  # prompt_tuning (PEFT's name)
    # qlora (transformers' BitsAndBytesConfig names); the compute dtype follows `precision`.
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True

    @model_validator(mode="after")
    def _options_match_type(self):
        lora = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
        only = {**dict.fromkeys(lora, ("lora", "qlora")), "num_virtual_tokens": ("prompt_tuning",),
                "bnb_4bit_quant_type": ("qlora",), "bnb_4bit_use_double_quant": ("qlora",)}
        applies_only(self, "finetune.finetuning_type", only, bare_got=True)
        return self

    @property
    def adapter(self) -> bool:
        """Trains PEFT adapter weights only; the base weights come from model.name_or_path, untouched."""
        return self.finetuning_type in ("lora", "qlora", "prompt_tuning")

    @property
    def trainable_only(self) -> bool:
        """Some weights stay as model.name_or_path has them, so checkpoints hold only those that train."""
        return self.finetuning_type != "full"


DATA_KINDS = {"image data": ("digits", "image_folder"), "text data": tuple(TEXT_DATA), "language model data": ("text",),
              "text classification data": ("text_classification",)}
# The data keys that apply to one kind of data only.
DATASET_KEYS = {**dict.fromkeys(("image_size", "channels", "augment"), "image data"),
                **dict.fromkeys(("text_field", "max_seq_len", "tokenizer", "vocab_size"), "text data"),
                **dict.fromkeys(("type", "chat_template", "sample_packing"), "language model data"),
                "label_field": "text classification data"}


class DataConfig(Section):
    name: Literal["digits", "image_folder", "text", "text_classification"] = "digits"
    # image_folder: a folder with one sub-folder per class; text: a file or a folder of .txt, .jsonl,
    # .json, .parquet or .csv files (default: Python's bundled help texts); text_classification: the
    # same without .txt (default: docstrings of Python's standard library by package). A folder, a
    # glob (shards/*.parquet) or, streamed, a URI (s3://bucket/data, gs://..., file:///...).
    path: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.2, ge=0.0, lt=0.5)
    dataloader_num_workers: int = Field(0, ge=0)  # in-memory data: DataLoader processes per training worker
    # Stream through Ray Data (dlray.streaming) rather than load into every worker's memory. None: a
    # URI streams, a local path streams when its files hold more than 1 GiB, bundled data loads.
    streaming: bool | None = None
    # Streamed data's shuffle: `local`, a buffer of local_shuffle_buffer_size rows on each worker,
    # seeded per epoch (a resumed run replays the order); `full` adds Ray Data's random_shuffle.
    shuffle: Literal["local", "full"] = "local"
    local_shuffle_buffer_size: int = Field(1024, ge=1)
    preprocess_num_cpus: float = Field(1.0, gt=0)  # per streamed preprocessing task (decode, augment, tokenize, pack)
    preprocess_concurrency: int | None = Field(None, ge=1)  # at most this many such tasks at once; None: as many as CPUs allow
    # A streamed image that does not decode: `error` stops with its path; `skip` trains without it
    # and counts it in each epoch's `skipped_rows`.
    bad_rows: Literal["error", "skip"] = "error"
    # images
    image_size: int | None = Field(None, ge=4)  # resize to a square; None keeps the native size
    channels: Literal[1, 3] = 1
    augment: bool = True
    # text
    text_field: str = "text"  # the column holding the text in .jsonl / .json / .parquet / .csv files
    label_field: str = "label"  # text_classification: the column holding each text's class (strings or integers)
    max_seq_len: int = Field(128, ge=1)  # tokens per training sequence
    tokenizer: str | None = None  # a saved Hugging Face tokenizer directory; None: train one (text: byte-level BPE, text_classification: WordPiece)
    vocab_size: int = Field(2048, ge=259)  # of the trained tokenizer: at least the 256 bytes and 3 special tokens
    # completion: raw text, cut into packed windows (pretraining); chat_template: rows with `messages`
    # ([{role, content}]) or `prompt` and `response`, rendered with the chat template, and only the
    # assistant's tokens are trained on (Axolotl's dataset types of the same names).
    type: Literal["completion", "chat_template"] = "completion"
    # The tokenizer's own template when None; else a Jinja template or a name in dlray.data.text.CHAT_TEMPLATES.
    # It is saved with the tokenizer, so the exported model's chat route renders what it was trained on.
    chat_template: str | None = None
    sample_packing: bool = False  # chat_template: several examples per sequence, each attending only to itself

    @model_validator(mode="after")
    def _keys_match_dataset(self):
        if self.name == "image_folder" and not self.path:
            raise ValueError("data.path is required when data.name is 'image_folder'")
        if self.path and "://" in self.path and self.streaming is False:
            raise ValueError(f"data.path {self.path!r} is a URI, which only streams: drop data.streaming: false")
        applies_only(self, "data.name", {key: DATA_KINDS[kind] for key, kind in DATASET_KEYS.items()}, kinds=DATASET_KEYS)
        if self.type == "completion" and (self.chat_template or self.sample_packing):
            key = "chat_template" if self.chat_template else "sample_packing"
            raise ValueError(f"data.{key} applies to data.type 'chat_template' (completion text is always packed into windows), got data.type 'completion'")
        if self.tokenizer and self.vocab_size != type(self).model_fields["vocab_size"].default:
            raise ValueError("data.vocab_size sizes the tokenizer dlray trains, but data.tokenizer brings its own vocabulary: set only one of them")
        return self


class TrainConfig(Section):
    num_epochs: int = Field(10, ge=1)
    micro_batch_size: int = Field(32, ge=1)  # per worker, per forward pass
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None disables clipping
    seed: int = 42
    metric: str = "val_loss"  # drives best-checkpoint choice and early stopping
    mode: Literal["min", "max"] = "min"
    early_stopping_patience: int | None = Field(None, ge=1)  # epochs without improvement
    # Exponential moving average of the weights (diffusers' --use_ema, timm's --model-ema-decay):
    # checkpointed with the run, used for per-epoch samples and by `dlray export`. None: off.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # Recompute each block's activations in the backward pass instead of keeping them (transformers'
    # name): much less activation memory for about a third more compute. Families with enable_gradient_checkpointing.
    gradient_checkpointing: bool = False
    # torch.compile the model (each FSDP block on its own, as torchtitan does): faster steps on GPUs
    # after a compilation of seconds to minutes at the first step. ddp and fsdp.
    compile: bool = False
    # TF32 tensor cores for fp32 matmuls and convolutions on GPUs that have them (Ampere and newer), as
    # HF TrainingArguments' and Axolotl's `tf32`: ~7x the fp32 matmul rate at a 10-bit mantissa (fp32's range).
    # On by default in the worker of a CUDA run; false: full fp32. CPUs and older GPUs ignore it.
    tf32: bool = True
    # Optimizer steps between the progress reports the console's step bar and step metrics come from
    # (Lightning's name). None: steps about 5 s apart, as rank 0 times them (closer reports stall training).
    log_every_n_steps: int | None = Field(None, ge=1)


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd and rmsprop
    betas: tuple[float, float] = (0.9, 0.999)  # adam and adamw


class SchedulerConfig(Section):
    name: Literal["constant", "cosine", "step", "plateau"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor, as a fraction of optim.lr
    step_size: int = Field(1, ge=1)  # step: decay every this many epochs
    gamma: float = Field(0.1, gt=0, le=1)  # step: decay factor
    factor: float = Field(0.5, gt=0, lt=1)  # plateau: decay factor
    patience: int = Field(2, ge=0)  # plateau: epochs without improvement before decaying

    @model_validator(mode="after")
    def _plateau_has_no_warmup(self):
        if self.name == "plateau" and self.warmup_steps:
            raise ValueError("scheduler.warmup_steps is not supported with scheduler.name 'plateau'; use 'cosine' or 'constant' for warmup")
        return self


class StrategyConfig(Section):
    name: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Literal[1, 2, 3] = 2  # deepspeed only
    offload_optimizer: bool = False  # deepspeed only: optimizer state in CPU memory
    offload_param: bool = False  # deepspeed ZeRO-3 only: parameters in CPU memory
    reshard_after_forward: bool = True  # fsdp only: ZeRO-3 style (True) or ZeRO-2 style (False)

    @model_validator(mode="after")
    def _options_match_strategy(self):
        only = {**dict.fromkeys(("zero_stage", "offload_optimizer", "offload_param"), ("deepspeed",)), "reshard_after_forward": ("fsdp",)}
        applies_only(self, "strategy.name", only)
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"strategy.offload_param needs strategy.zero_stage 3, got {self.zero_stage}")
        return self


class ScalingSection(Section):
    """Mirrors ray.train.ScalingConfig."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # The GPU each worker runs on, by Ray's name (ray.util.accelerators: H100, A100-80G, L4, T4, ...): Ray places
    # workers only on such nodes, and `dlray validate` / `dlray train` refuse a job whose memory plan (`dlray plan`) exceeds its memory.
    accelerator_type: str | None = None

    @model_validator(mode="after")
    def _known_accelerator(self):
        if self.accelerator_type is not None:
            from dlray.plan import DEVICE_MEMORY_GIB  # here: dlray.plan imports the config

            if self.accelerator_type not in DEVICE_MEMORY_GIB:
                raise ValueError(f"scaling.accelerator_type must be one of {list(DEVICE_MEMORY_GIB)}, got {self.accelerator_type!r}")
            if not self.use_gpu:
                raise ValueError("scaling.accelerator_type names a GPU: set scaling.use_gpu true")
        return self


class RunSection(Section):
    """Mirrors ray.train.RunConfig, CheckpointConfig and FailureConfig."""

    name: str | None = None  # default: <job file stem>-<timestamp>; reuse a name to resume that run
    storage_path: str = "~/dlray_runs"  # must be shared storage (NFS or a cloud URI) on multi-node clusters
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1 = unlimited
    checkpoint_num_to_keep: int | None = Field(2, ge=1)  # best K by train.metric; None keeps all
    # Start from this checkpoint (of any run, e.g. a PBT donor's) with this config's hyperparameters;
    # once the run has checkpoints of its own, a restart takes its own latest instead.
    resume_from_checkpoint: str | None = None
    # When stdout is not a terminal (a log file, `ray job logs`): seconds between plain step-progress
    # lines; the epoch lines always print. On a terminal the progress bar updates at every report.
    progress_interval_s: float = Field(30.0, ge=0)


class AutoscalingSection(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)


class ServeSection(Section):
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSection | None = None  # overrides num_replicas when set
    max_batch_size: int = Field(32, ge=1)  # classify, images (@serve.batch): requests folded into one forward pass
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_ongoing_requests: int = Field(128, ge=1)
    max_body_bytes: int = Field(2_000_000, ge=1024)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_cpus_per_replica: float = Field(1.0, ge=0)
    num_gpus_per_replica: float = Field(0.0, ge=0)  # Ray's ray_actor_options.num_gpus: > 0 serves on the replica's GPU
    # The dtype a replica holds its model in (dlray.precision.serve_dtype). auto: bf16 on a GPU with bf16, fp16
    # on an older GPU, fp32 on a CPU. fp32 on a GPU is full fp32 (no TF32): the reference to check a replica against.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # images endpoint (diffusion, vae, gan): limits beyond which a request gets a 400
    max_images_per_request: int = Field(8, ge=1)  # OpenAI's `n`
    max_inference_steps: int = Field(1000, ge=1)
    num_inference_steps: int = Field(50, ge=1)  # when a request names none
    scheduler: Literal["ddpm", "ddim"] = "ddim"  # when a request names none
    # generate endpoint (causal LMs; OpenAI completions and chat): names as vLLM's where it has them
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
    chat: bool = True  # false: /v1/completions only (for a tokenizer without a chat template)
    api_key_env: str | None = None  # the environment variable holding the API key; unset: no key needed
    served_model_name: str | None = None  # the `model` clients name; default: the artifact directory's name
    # LoRA adapters over the served model, by name: a request for model "<served name>:<name>" decodes
    # with that adapter, batched with requests for the base and for other adapters (vLLM's multi-LoRA).
    adapters: dict[str, str] | None = None  # name -> adapter directory (`dlray export` of a lora / qlora run)
