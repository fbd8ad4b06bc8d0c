"""JobConfig: every section, and the checks between keys of different sections (a precision the
strategy cannot run, data the model family cannot train on, a search space with an invalid value)."""

from __future__ import annotations

import copy
import importlib.util
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from dlray.config.dotted import messages, set_dotted
from dlray.config.sections import (
    DataSection,
    DDPConfig,
    FinetuneConfig,
    ModelConfig,
    OptimConfig,
    RunSection,
    ScalingSection,
    SchedulerConfig,
    Section,
    StrategyConfig,
    TrainConfig,
    families_where,
)
from dlray.config.serve import ServeSection
from dlray.config.sweep import TuneSection
from dlray.config.trackers import TrackingSection
from dlray.data import SOURCES, data_config
from dlray.models import FAMILIES


def flash_attention_installed() -> bool:
    """Whether the flash-attn package, which transformers' `flash_attention_2` imports in every worker, is installed here."""
    return importlib.util.find_spec("flash_attn") is not None


class JobConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataSection = Field(default_factory=data_config)
    train: TrainConfig = TrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    optim: OptimConfig = OptimConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    strategy: StrategyConfig = DDPConfig()
    # auto: what the training device computes natively (dlray.precision: bf16 on GPUs and CPUs that have it,
    # fp16 on older GPUs, fp32 on CPUs that would only emulate bf16); each worker decides and rank 0 says why.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    serve: ServeSection = ServeSection()
    tracking: TrackingSection = TrackingSection()  # MLflow / W&B runs (dlray.trackers); off unless set
    tune: TuneSection | None = None  # a sweep (`dlray tune`); `dlray train` ignores it

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.train.max_tokens and not hasattr(self.data, "max_seq_len"):
            raise ValueError(f"train.max_tokens counts tokens, but data.name {self.data.name!r} is not text (no data.max_seq_len): use train.max_steps")
        if self.precision == "fp16" and self.strategy.name == "fsdp":
            raise ValueError("precision 'fp16' is not supported with strategy.name 'fsdp' (FSDP2 has no loss scaler here); use precision 'bf16'")
        if self.precision == "fp16" and self.strategy.name == "deepspeed" and not self.scaling.use_gpu:
            raise ValueError("precision 'fp16' with strategy.name 'deepspeed' needs scaling.use_gpu true: fp16 computes nothing faster on a CPU; use 'bf16' or 'fp32'")
        family = FAMILIES[self.model.family]
        kind = SOURCES[self.data.name].kind
        if kind not in family.data:
            takes = [name for name, source in SOURCES.items() if source.kind in family.data]
            able = families_where(lambda f: kind in f.data)
            raise ValueError(f"model.family {self.model.family!r} trains on {' or '.join(family.data)} data (data.name {' or '.join(map(repr, takes))}), "
                             f"got data.name {self.data.name!r}, {kind} data, which model.family {' or '.join(map(repr, able)) or 'none'} trains on")
        self._check_finetune()
        if self.train.compile and self.strategy.name == "deepspeed":
            raise ValueError("train.compile is supported with strategy.name 'ddp' or 'fsdp', got 'deepspeed' (its engine wraps the "
                             "forward in hooks that torch.compile cannot trace whole): use 'fsdp' for sharding with compile")
        if self.model.attn_implementation == "flash_attention_2":
            if not self.scaling.use_gpu:
                raise ValueError("model.attn_implementation 'flash_attention_2' runs on CUDA only: set scaling.use_gpu true, or use 'sdpa'")
            if not flash_attention_installed():
                raise ValueError("model.attn_implementation 'flash_attention_2' needs the flash-attn package, which is not installed here. It is no "
                                 "dlray dependency or extra: it compiles against the installed torch and CUDA. Install it where the job runs "
                                 "(`pip install flash-attn --no-build-isolation`, on every GPU node), or use 'sdpa' (PyTorch's fused attention)")
        if self.train.gradient_checkpointing and not family.enable_gradient_checkpointing:
            able = families_where(lambda f: f.enable_gradient_checkpointing)
            raise ValueError(f"train.gradient_checkpointing is not supported by model.family {self.model.family!r} (only by {able})")

        sft = self.finetune.objective == "sft"  # a preference loss is no log-likelihood: no perplexity of it (dlray.finetune.without_perplexity)
        metrics = [m for m in family.epoch_metrics() if sft or not m.endswith("perplexity")] + [f"val_{m}" for m in self.finetune.objective_metrics()]
        if self.train.metric not in metrics:
            raise ValueError(f"train.metric must be one of {metrics} for model.family {self.model.family!r}"
                             f"{'' if sft else f' and finetune.objective {self.finetune.objective!r}'}, got {self.train.metric!r}")
        optimizers = family.optimizers
        if len(optimizers) > 1:
            if self.strategy.name == "deepspeed":
                raise ValueError(f"model.family {self.model.family!r} trains {len(optimizers)} optimizers ({', '.join(optimizers)}); "
                                 "strategy.name 'deepspeed' drives exactly one: use 'ddp' or 'fsdp'")
            if self.train.gradient_accumulation_steps != 1:
                raise ValueError(f"model.family {self.model.family!r} alternates its optimizers every micro-batch: train.gradient_accumulation_steps must be 1")
        if self.tune:
            self._check_search_space()
            self.sweep_max_t()  # raises where the driver cannot count a trial's validations
        return self

    def sweep_max_t(self) -> int:
        """The validations (Tune iterations) a trial runs at most: ASHA's and HyperBand's max_t."""
        assert self.tune is not None
        scheduler, train = self.tune.scheduler, self.train
        if scheduler.max_t or scheduler.name not in ("asha", "hyperband"):
            return scheduler.max_t or train.num_epochs
        if train.max_steps or train.max_tokens or train.val_every_n_steps:
            raise ValueError(f"tune.scheduler.max_t must be set for tune.scheduler.name {scheduler.name!r} with train.max_steps, train.max_tokens "
                             "or train.val_every_n_steps: a trial's validations then depend on its steps per epoch, which only the workers know")
        return train.num_epochs

    def _check_finetune(self):
        model, finetune, family = self.model, self.finetune, FAMILIES[self.model.family]
        kind = finetune.finetuning_type
        if model.name_or_path and "tokenizer" in type(self.data).model_fields:
            if self.data.vocab_size != type(self.data).model_fields["vocab_size"].default:
                raise ValueError("data.vocab_size sizes a tokenizer trained from scratch, but model.name_or_path brings its own: drop data.vocab_size")
            if self.data.tokenizer is None:  # a pretrained model comes with its tokenizer
                self.data.tokenizer = model.name_or_path
        self._check_objective()
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
        if kind == "prompt_tuning" and getattr(self.data, "sample_packing", False):
            raise ValueError("finetune.finetuning_type 'prompt_tuning' puts its virtual tokens before each sequence, not before each packed example: set data.sample_packing false")

    def _check_objective(self):
        """Preference objectives train on preference data of their kind (and preference data needs one), with a reference model they can have."""
        objective, data = self.finetune.objective, self.data
        wanted = {"sft": None, "dpo": "preference", "orpo": "preference", "kto": "unpaired_preference"}[objective]
        got = getattr(data, "type", None) if data.name == "preference" else None
        if wanted is None and data.name == "preference":
            raise ValueError("data.name 'preference' trains with finetune.objective 'dpo' or 'orpo' (data.type 'preference') or 'kto' "
                             f"(data.type 'unpaired_preference'), got finetune.objective {objective!r}")
        if wanted and got != wanted:
            raise ValueError(f"finetune.objective {objective!r} trains on data.name 'preference' with data.type {wanted!r}, got "
                             f"data.name {data.name!r}" + (f" with data.type {got!r}" if got else ""))
        if objective != "sft" and self.finetune.finetuning_type == "prompt_tuning":
            raise ValueError(f"finetune.objective {objective!r} is supported with finetune.finetuning_type 'full', 'lora' or 'qlora', got 'prompt_tuning'")

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
                    raise ValueError(f"tune.search_space.{path}: {'; '.join(messages(err, JobConfig))}") from None
