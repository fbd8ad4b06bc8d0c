"""Job configuration: one YAML file per job, typed and checked before any Ray process starts.

    dlray validate jobs/cnn_digits.yaml strategy.name=deepspeed strategy.zero_stage=3

Section and key names follow what users already know: Ray's ScalingConfig/RunConfig
(`num_workers`, `use_gpu`, `storage_path`, `max_failures`) and Axolotl / LLaMA-Factory
(`micro_batch_size`, `gradient_accumulation_steps`, `max_grad_norm`, `warmup_steps`,
`early_stopping_patience`). Errors name the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dlray.models import FAMILIES

TEXT_DATA = {"text": "a language model", "text_classification": "a text classifier"}  # data.name -> what trains on it


def families_where(test) -> list[str]:
    """The names of the families for which test(family) holds, for error messages."""
    return [name for name, family in FAMILIES.items() if test(family)]


class ConfigError(ValueError):
    """A job config that cannot run; the message names every offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    family: Literal[tuple(FAMILIES)] = "cnn"  # type: ignore[valid-type]  # the names in dlray.models.FAMILIES
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

    @model_validator(mode="after")
    def _known_flavor(self):
        family = FAMILIES[self.family]
        if self.flavor not in family.flavors:
            raise ValueError(f"model.flavor must be one of {sorted(family.flavors)} for family {self.family!r}, got {self.flavor!r}")
        # Keys that only some families read: their own (extra_model_keys), or the pretrained transformers families'.
        only = {key: families_where(lambda f, key=key: key in f.extra_model_keys) for key in type(self).model_fields}
        only |= {key: families_where(lambda f: f.pretrained) for key in ("name_or_path", "attn_implementation")}
        for key, owners in only.items():
            if owners and getattr(self, key) != type(self).model_fields[key].default and self.family not in owners:
                raise ValueError(f"model.{key} applies only to model.family {' or '.join(map(repr, owners))}, got model.family '{self.family}'")
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
        for key, owners in only.items():
            if getattr(self, key) != type(self).model_fields[key].default and self.finetuning_type not in owners:
                raise ValueError(f"finetune.{key} applies only to finetune.finetuning_type {' or '.join(map(repr, owners))}, "
                                 f"got {self.finetuning_type!r}")
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
    # same without .txt (default: docstrings of Python's standard library by package). Every worker reads it.
    path: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.2, ge=0.0, lt=0.5)
    dataloader_num_workers: int = Field(0, ge=0)
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
        for key, kind in DATASET_KEYS.items():
            names = DATA_KINDS[kind]
            # Compared with the default rather than "was it set", so a dumped config reloads.
            if getattr(self, key) != type(self).model_fields[key].default and self.name not in names:
                raise ValueError(f"data.{key} applies only to {kind} (data.name {' or '.join(map(repr, names))}), got data.name {self.name!r}")
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
        only = {"zero_stage": "deepspeed", "offload_optimizer": "deepspeed", "offload_param": "deepspeed", "reshard_after_forward": "fsdp"}
        for key, owner in only.items():
            # Compared with the default rather than "was it set", so a dumped config reloads.
            if getattr(self, key) != type(self).model_fields[key].default and self.name != owner:
                raise ValueError(f"strategy.{key} applies only to strategy.name '{owner}', got strategy.name '{self.name}'")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"strategy.offload_param needs strategy.zero_stage 3, got {self.zero_stage}")
        return self


class ScalingSection(Section):
    """Mirrors ray.train.ScalingConfig."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class RunSection(Section):
    """Mirrors ray.train.RunConfig, CheckpointConfig and FailureConfig."""

    name: str | None = None  # default: <job file stem>-<timestamp>; reuse a name to resume that run
    storage_path: str = "~/dlray_runs"  # must be shared storage (NFS or a cloud URI) on multi-node clusters
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1 = unlimited
    checkpoint_num_to_keep: int | None = Field(2, ge=1)  # best K by train.metric; None keeps all
    # Start from this checkpoint (of any run, e.g. a PBT donor's) with this config's hyperparameters;
    # once the run has checkpoints of its own, a restart takes its own latest instead.
    resume_from_checkpoint: str | None = None


class AutoscalingSection(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)


class ServeSection(Section):
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSection | None = None  # overrides num_replicas when set
    max_batch_size: int = Field(32, ge=1)  # @serve.batch: requests folded into one forward pass
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_ongoing_requests: int = Field(128, ge=1)
    max_body_bytes: int = Field(2_000_000, ge=1024)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_cpus_per_replica: float = Field(1.0, ge=0)
    num_gpus_per_replica: float = Field(0.0, ge=0)  # Ray's ray_actor_options.num_gpus: > 0 serves on the replica's GPU
    # images endpoint (diffusion, vae, gan): limits beyond which a request gets a 400
    max_images_per_request: int = Field(8, ge=1)  # OpenAI's `n`
    max_inference_steps: int = Field(1000, ge=1)
    num_inference_steps: int = Field(50, ge=1)  # when a request names none
    scheduler: Literal["ddpm", "ddim"] = "ddim"  # when a request names none
    # generate endpoint (causal LMs; OpenAI completions and chat): names as vLLM's where it has them
    max_tokens_limit: int = Field(1024, ge=1)  # a request's max_tokens above this gets a 400
    max_completions_per_request: int = Field(4, ge=1)  # OpenAI's `n`
    chat: bool = True  # false: /v1/completions only (for a tokenizer without a chat template)
    api_key_env: str | None = None  # the environment variable holding the API key; unset: no key needed
    served_model_name: str | None = None  # the `model` clients name; default: the artifact directory's name
    # LoRA adapters over the served model, by name: a request for model "<served name>:<name>" decodes
    # with that adapter, batched with requests for the base and for other adapters (vLLM's multi-LoRA).
    adapters: dict[str, str] | None = None  # name -> adapter directory (`dlray export` of a lora / qlora run)


# ---------------------------------------------------------------------------------------------
# Sweeps: a job file plus a `tune:` section (see dlray/tune.py). Names follow ray.tune.


DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


class SearchParam(Section):
    """One dotted config key's search space, e.g. `optim.lr: {loguniform: [1.0e-4, 1.0e-1]}`.

    `when` makes it conditional: `optim.momentum: {uniform: [0.8, 0.99], when: {optim.name: sgd}}`
    is sampled and applied only in trials whose optim.name is sgd (a list there means any of them).
    """

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None  # low inclusive, high exclusive, as ray.tune.randint
    choice: list[Any] | None = None
    grid: list[Any] | None = None  # every value, each in num_samples trials (ray.tune.grid_search)
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_distribution(self):
        given = [d for d in DISTRIBUTIONS if getattr(self, d) is not None]
        if len(given) != 1:
            raise ValueError(f"a search-space entry needs exactly one of {', '.join(DISTRIBUTIONS)}, got {given or 'none'}")
        name, args = self.distribution
        if name in ("uniform", "loguniform", "randint") and not args[0] < args[1]:
            raise ValueError(f"{name}: low must be below high, got {list(args)}")
        if name == "loguniform" and args[0] <= 0:
            raise ValueError(f"loguniform: low must be positive, got {args[0]}")
        if name in ("choice", "grid") and not args:
            raise ValueError(f"{name}: needs at least one value")
        return self

    @property
    def distribution(self) -> tuple[str, Any]:
        return next((d, getattr(self, d)) for d in DISTRIBUTIONS if getattr(self, d) is not None)

    def extremes(self) -> list[Any]:
        """Values that, if valid, make every sampled value valid: the ends of a range, or every choice."""
        name, args = self.distribution
        return [args[0], args[1] - 1] if name == "randint" else list(args)

    def active(self, trial: dict[str, Any]) -> bool:
        if not self.when:
            return True
        return all(trial.get(key) in (wanted if isinstance(wanted, list) else [wanted]) for key, wanted in self.when.items())


class SweepSchedulerConfig(Section):
    """Ray Tune's trial scheduler; it sees every epoch (one Tune iteration = one epoch)."""

    name: Literal["fifo", "asha", "hyperband", "median", "pbt"] = "asha"
    grace_period: int = Field(1, ge=1)  # asha, median: epochs a trial always gets
    reduction_factor: float = Field(2, gt=1)  # asha, hyperband: 1/this of trials go on at each rung
    min_samples_required: int = Field(3, ge=1)  # median: trials to compare with before stopping one
    perturbation_interval: int = Field(1, ge=1)  # pbt: epochs between exploit/explore steps
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # pbt: bottom fraction that copies the top
    resample_probability: float = Field(0.25, ge=0, le=1)  # pbt: explore by resampling, else by x0.8/x1.2


class SearchAlgConfig(Section):
    name: Literal["random", "grid", "optuna"] = "random"  # grid: every choice becomes a grid axis
    seed: int | None = 0  # same seed, same trial configs


class TuneSection(Section):
    """Mirrors ray.tune.TuneConfig; the metric and mode are the job's train.metric / train.mode."""

    num_samples: int = Field(4, ge=1)  # trials (per grid point)
    max_concurrent_trials: int | None = Field(None, ge=1)  # default: as many trials as the cluster fits at once
    scheduler: SweepSchedulerConfig = SweepSchedulerConfig()
    search_alg: SearchAlgConfig = SearchAlgConfig()
    search_space: dict[str, SearchParam] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _space_fits_search(self):
        if not self.search_space:
            raise ValueError("tune.search_space is empty: name at least one dotted config key to search")
        kinds = {path: p.distribution[0] for path, p in self.search_space.items()}
        for path, param in self.search_space.items():
            for key, wanted in (param.when or {}).items():
                if key not in self.search_space or kinds[key] not in ("choice", "grid"):
                    raise ValueError(f"tune.search_space.{path}.when: {key!r} must be a choice or grid entry of tune.search_space")
                values = self.search_space[key].distribution[1]
                if any(w not in values for w in (wanted if isinstance(wanted, list) else [wanted])):
                    raise ValueError(f"tune.search_space.{path}.when: {key} is never {wanted!r} (its values: {values})")
        search, scheduler = self.search_alg.name, self.scheduler.name
        continuous = [path for path, kind in kinds.items() if kind not in ("choice", "grid")]
        if search == "grid" and continuous:
            raise ValueError(f"tune.search_alg.name 'grid' needs choice or grid entries; {', '.join(continuous)} use a range (use search_alg 'random')")
        if search == "optuna" and "grid" in kinds.values():
            raise ValueError("tune.search_alg.name 'optuna' samples its own points: use choice instead of grid")
        if scheduler == "pbt" and search != "random":
            raise ValueError(f"tune.scheduler.name 'pbt' explores by itself: it needs tune.search_alg.name 'random', got {search!r}")
        if scheduler == "pbt" and any(p.when for p in self.search_space.values()):
            raise ValueError("tune.scheduler.name 'pbt' cannot keep `when` conditions while it mutates hyperparameters; drop them")
        return self


class JobConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    optim: OptimConfig = OptimConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    strategy: StrategyConfig = StrategyConfig()
    # auto: what the training device computes natively (dlray.precision: bf16 on GPUs and CPUs that have it,
    # fp16 on older GPUs, fp32 on CPUs that would only emulate bf16); each worker decides and rank 0 says why.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    serve: ServeSection = ServeSection()
    tune: TuneSection | None = None  # a sweep (`dlray tune`); `dlray train` ignores it

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.precision == "fp16" and self.strategy.name == "fsdp":
            raise ValueError("precision 'fp16' is not supported with strategy.name 'fsdp' (FSDP2 has no loss scaler here); use precision 'bf16'")
        if self.precision == "fp16" and self.strategy.name == "deepspeed" and not self.scaling.use_gpu:
            raise ValueError("precision 'fp16' with strategy.name 'deepspeed' needs scaling.use_gpu true: DeepSpeed's CPU accelerator has no fp16; use 'bf16'")
        family = FAMILIES[self.model.family]
        if self.data.name not in family.data:
            if set(family.data) <= set(TEXT_DATA):
                raise ValueError(f"model.family {self.model.family!r} trains on text: it needs data.name {family.data[0]!r}, got data.name {self.data.name!r}")
            able = families_where(lambda f: self.data.name in f.data)
            raise ValueError(f"data.name {self.data.name!r} needs {TEXT_DATA[self.data.name]}: model.family must be one of {able}, got {self.model.family!r}")
        self._check_finetune()
        if self.train.compile and self.strategy.name == "deepspeed":
            raise ValueError("train.compile is supported with strategy.name 'ddp' or 'fsdp', got 'deepspeed' (its engine wraps the "
                             "forward in hooks that torch.compile cannot trace whole): use 'fsdp' for sharding with compile")
        if self.model.attn_implementation == "flash_attention_2" and not self.scaling.use_gpu:
            raise ValueError("model.attn_implementation 'flash_attention_2' runs on CUDA only: set scaling.use_gpu true, or use 'sdpa'")
        if self.train.gradient_checkpointing and not family.enable_gradient_checkpointing:
            able = families_where(lambda f: f.enable_gradient_checkpointing)
            raise ValueError(f"train.gradient_checkpointing is not supported by model.family {self.model.family!r} (only by {able})")
        if self.train.metric not in family.epoch_metrics():
            raise ValueError(f"train.metric must be one of {family.epoch_metrics()} for model.family {self.model.family!r}, got {self.train.metric!r}")
        optimizers = family.optimizers
        if len(optimizers) > 1:
            if self.strategy.name == "deepspeed":
                raise ValueError(f"model.family {self.model.family!r} trains {len(optimizers)} optimizers ({', '.join(optimizers)}); "
                                 "strategy.name 'deepspeed' drives exactly one: use 'ddp' or 'fsdp'")
            if self.train.gradient_accumulation_steps != 1:
                raise ValueError(f"model.family {self.model.family!r} alternates its optimizers every micro-batch: train.gradient_accumulation_steps must be 1")
        if self.tune:
            self._check_search_space()
        return self

    def _check_finetune(self):
        model, finetune, family = self.model, self.finetune, FAMILIES[self.model.family]
        kind = finetune.finetuning_type
        if model.name_or_path and self.data.name in TEXT_DATA:
            if self.data.vocab_size != type(self.data).model_fields["vocab_size"].default:
                raise ValueError("data.vocab_size sizes a tokenizer trained from scratch, but model.name_or_path brings its own: drop data.vocab_size")
            if self.data.tokenizer is None:  # a pretrained model comes with its tokenizer
                self.data.tokenizer = model.name_or_path
        if kind == "full":
            return
        if not model.name_or_path:
            raise ValueError(f"finetune.finetuning_type {kind!r} adapts a pretrained model: set model.name_or_path (a Hugging Face model directory or hub id)")
        supported = family.finetuning_types
        if kind not in supported:
            raise ValueError(f"finetune.finetuning_type {kind!r} is not supported by model.family {model.family!r} (it supports {', '.join(supported)})")
        if kind == "qlora" and (self.strategy.name == "fsdp" or (self.strategy.name == "deepspeed" and self.strategy.zero_stage == 3)):
            raise ValueError("finetune.finetuning_type 'qlora' keeps the base weights as packed 4-bit integers, which FSDP and ZeRO-3 "
                             "cannot shard: use strategy.name 'ddp' or 'deepspeed' with strategy.zero_stage 1 or 2 "
                             "(the 4-bit base is small enough to replicate), or finetuning_type 'lora' to shard the base")
        if self.train.ema_decay:
            raise ValueError(f"train.ema_decay averages every weight, but finetune.finetuning_type {kind!r} trains only some: drop train.ema_decay")
        if kind == "prompt_tuning" and self.data.sample_packing:
            raise ValueError("finetune.finetuning_type 'prompt_tuning' puts its virtual tokens before each sequence, not before each packed example: set data.sample_packing false")

    def _check_search_space(self):
        """Every searched key exists and every value it can take makes a valid job, so a typo
        fails here, naming the key, before any trial starts."""
        base = self.model_dump(mode="json", exclude={"tune"})
        for path, param in self.tune.search_space.items():
            if path.split(".")[0] in ("tune", "run"):
                raise ValueError(f"tune.search_space: {path!r} cannot be searched (the sweep sets run.* for each trial)")
            for value in param.extremes():
                trial = copy.deepcopy(base)
                set_dotted(trial, path, value)
                try:
                    JobConfig.model_validate(trial)
                except ValidationError as err:
                    raise ValueError(f"tune.search_space.{path}: {'; '.join(_messages(err))}") from None




# ---------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> JobConfig, with errors that name the key.


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job YAML, apply `a.b.c=value` overrides, and validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"job file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a job file must be a YAML mapping, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    cfg = config_from_dict(data)
    if cfg.run.name is None and path is not None:
        # A fresh name per invocation: re-running the same name resumes that run instead.
        from datetime import datetime

        cfg.run.name = f"{path.stem}-{datetime.now():%Y%m%d-%H%M%S}"
    return cfg


def config_from_dict(data: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("invalid job config:\n" + "\n".join(f"  - {m}" for m in _messages(err))) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, true, [1,2] work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    set_dotted(data, key, yaml.safe_load(raw) if raw else None)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    node[leaf] = value


def _messages(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(e["loc"][:-1]))
            out.append(f"unknown key '{loc}'; allowed keys here: {allowed}")
        elif e["type"] == "value_error":
            # Our own validators already name the key.
            out.append(e["msg"].removeprefix("Value error, "))
        else:
            msg = e["msg"].replace("Input should be", "must be")
            out.append(f"{loc}: {msg}, got {e.get('input')!r}")
    return out


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = JobConfig
    for part in loc:
        if str(part) not in model.model_fields:  # a key of a dict of sections (tune.search_space.<key>)
            continue
        annotation = model.model_fields[str(part)].annotation
        if getattr(annotation, "__origin__", None) is dict:
            annotation = annotation.__args__[1]
        # Optional sections (e.g. serve.autoscaling) are `X | None`.
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = candidates[0]
    return list(model.model_fields)


def job_files(root: str | os.PathLike = "jobs") -> list[Path]:
    """Every shipped job YAML, for tests and `dlray validate --all`."""
    return sorted(Path(root).rglob("*.yaml"))
