"""The job's sections: what to train (model, finetune, data: each source's own config class, in
dlray.data), how (train, optim, scheduler, strategy),
where (scaling, run) and how it is served (serve). Each checks its own keys; dlray.config.job checks
keys of different sections against each other."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, SerializeAsAny, Tag, WrapValidator, field_validator, model_validator

from dlray.data import DataConfig, data_config
from dlray.models import FAMILIES
from dlray.precision import DEVICE_MEMORY_GIB


def families_where(test) -> list[str]:
    """The names of the families for which test(family) holds, for error messages."""
    return [name for name, family in FAMILIES.items() if test(family)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def applies_only(section: Section, selector: str, owners: Mapping[str, Sequence[str]], *, bare_got: bool = False) -> None:
    """Refuses a key set in a section whose `selector` (its dotted name, e.g. "model.family") has a value the
    key does nothing for. owners: key -> the selector values it applies to (none: every value). The error reads
    "<section>.<key> applies only to <selector> 'a' or 'b', got <selector> 'c'"; bare_got: "got 'c'", without the selector's name."""
    prefix, field = selector.split(".")
    current = getattr(section, field)
    for key, among in owners.items():
        # Compared with the default rather than "was it set", so a dumped config reloads.
        if among and getattr(section, key) != type(section).model_fields[key].default and current not in among:
            allowed = f"{selector} {' or '.join(map(repr, among))}"
            raise ValueError(f"{prefix}.{key} applies only to {allowed}, got {'' if bare_got else selector + ' '}{current!r}")


class ModelConfig(Section):
    family: str = "cnn"  # a name in dlray.models.FAMILIES (checked against the registry as it is when validating)
    flavor: str = "debug"  # a named size in the family's FLAVORS
    # Start from a pretrained Hugging Face model (a local directory or a hub id) instead of building
    # `flavor` from scratch: what LLaMA-Factory calls model_name_or_path, Axolotl base_model.
    name_or_path: str | None = None
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # cnn, diffusion, vit, bert; gpt: attention dropout; rnn: between layers
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
    # rnn: the recurrent cell, reading each sequence in both directions, and sizes overriding the flavor's
    cell: Literal["lstm", "gru"] = "lstm"
    bidirectional: bool = False
    hidden_size: int | None = Field(None, ge=1)
    num_layers: int | None = Field(None, ge=1)

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


# The metrics of the preference objectives (dlray.finetune), in TRL's names.
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
OBJECTIVE_METRICS = {"sft": (), "dpo": PAIR_METRICS, "orpo": (*PAIR_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen"), "kto": ("kl",)}


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
    # What the weights learn (dlray.finetune; TRL's names and defaults): sft, the next tokens of the data; dpo, orpo and
    # kto, to prefer chosen completions (data.name preference). beta: DPO's and KTO's strength of the reference model,
    # ORPO's weight of its odds-ratio term. loss_type: DPO's loss of the reward margin (sigmoid, IPO's squared
    # distance to 1/(2 beta), hinge). label_smoothing: DPO sigmoid's probability that a pair's labels are flipped (cDPO).
    objective: Literal["sft", "dpo", "orpo", "kto"] = "sft"
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)

    def objective_metrics(self) -> tuple[str, ...]:
        """What the objective's loss reports besides `loss` (validation reports them as val_<name>): TRL's names."""
        return OBJECTIVE_METRICS[self.objective]

    @model_validator(mode="after")
    def _options_match_type(self):
        lora = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
        only = {**dict.fromkeys(lora, ("lora", "qlora")), "num_virtual_tokens": ("prompt_tuning",),
                "bnb_4bit_quant_type": ("qlora",), "bnb_4bit_use_double_quant": ("qlora",)}
        applies_only(self, "finetune.finetuning_type", only, bare_got=True)
        applies_only(self, "finetune.objective", {"beta": ("dpo", "orpo", "kto"), "loss_type": ("dpo",), "label_smoothing": ("dpo",)})
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"finetune.label_smoothing applies only to finetune.loss_type 'sigmoid', got finetune.loss_type {self.loss_type!r}")
        return self

    @property
    def adapter(self) -> bool:
        """Trains PEFT adapter weights only; the base weights come from model.name_or_path, untouched."""
        return self.finetuning_type in ("lora", "qlora", "prompt_tuning")

    @property
    def trainable_only(self) -> bool:
        """Some weights stay as model.name_or_path has them, so checkpoints hold only those that train."""
        return self.finetuning_type != "full"


def _data_source_config(value: Any, handler: Any) -> DataConfig:
    """The data section as its source's own config class (dlray.data.SOURCES, as it is when validating)."""
    if isinstance(value, DataConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"data must be a mapping of data keys, got {value!r}")
    return data_config(value)


# The `data` section: one config class per source, chosen by data.name (each holds only its source's keys).
DataSection = Annotated[SerializeAsAny[DataConfig], WrapValidator(_data_source_config)]


class TrainConfig(Section):
    num_epochs: int = Field(10, ge=1)
    # A budget in optimizer steps (HF Trainer's and Lightning's max_steps) or, for text data, in tokens
    # trained across ranks (micro-batch x data.max_seq_len per micro-batch, padding included, as torchtitan
    # counts them). Either overrides num_epochs: the run ends at the budget, mid-epoch if that is where it
    # falls; with both, the smaller. The learning-rate schedule (warmup, cosine) runs over the budget.
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    # Validate (and checkpoint) every this many optimizer steps as well as at each epoch's end, and at the
    # budget's last step (HF Trainer's eval_steps, Lightning's val_check_interval). Each validation is a
    # report like an epoch's: metrics.csv row, trackers, Tune, early stopping and the best checkpoint.
    val_every_n_steps: int | None = Field(None, ge=1)
    # At most this many micro-batches per rank in each validation (Lightning's limit_val_batches), for a
    # large val split validated often; the test split is always scored whole. None: the whole split.
    val_max_batches: int | None = Field(None, ge=1)
    # A checkpoint every this many optimizer steps between validations (Lightning's
    # ModelCheckpoint(every_n_train_steps), HF's save_steps): a lost worker or driver costs at most these steps.
    checkpoint_every_n_steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(32, ge=1)  # per worker, per forward pass
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None disables clipping
    seed: int = 42
    metric: str = "val_loss"  # drives best-checkpoint choice and early stopping
    mode: Literal["min", "max"] = "min"
    early_stopping_patience: int | None = Field(None, ge=1)  # validations without improvement (epochs, without val_every_n_steps)
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
    # Optimizer steps in a row with a non-finite loss or gradient norm before the run stops as diverged. Each is
    # skipped (no weight moves, as a GradScaler skips an fp16 overflow) and counted: nonfinite_steps in the reports.
    max_nonfinite_steps: int = Field(10, ge=1)


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


class DDPConfig(Section):
    """strategy.name ddp: DistributedDataParallel (dlray.strategies.ddp); no keys of its own."""

    name: Literal["ddp"] = "ddp"


class FSDPConfig(Section):
    """strategy.name fsdp: FSDP2's fully_shard (dlray.strategies.fsdp)."""

    name: Literal["fsdp"]
    reshard_after_forward: bool = True  # free each block's gathered parameters after its forward (ZeRO-3 style); False: keep them to backward (ZeRO-2 style)


class DeepSpeedConfig(Section):
    """strategy.name deepspeed: DeepSpeed ZeRO (dlray.strategies.deepspeed)."""

    name: Literal["deepspeed"]
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False  # optimizer state in CPU memory
    offload_param: bool = False  # ZeRO-3 only: parameters in CPU memory

    @model_validator(mode="after")
    def _offload_param_needs_zero3(self):
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"strategy.offload_param needs strategy.zero_stage 3, got {self.zero_stage}")
        return self


def tagged_by_name(default: str) -> Discriminator:
    """Tells a union's sections apart by their `name` (`default` where a job gives none)."""
    return Discriminator(lambda value: value.get("name", default) if isinstance(value, dict) else value.name)


STRATEGY_CONFIGS = {"ddp": DDPConfig, "fsdp": FSDPConfig, "deepspeed": DeepSpeedConfig}


def without_other_defaults(value):
    """Configs dumped before `strategy:` was a union (checkpoints' meta.json, sweep.yaml) hold every strategy's
    keys: those of another strategy at their defaults are dropped, so they load; set to anything else, refused."""
    own = STRATEGY_CONFIGS.get(value.get("name", "ddp")) if isinstance(value, dict) else None
    if own is None:
        return value
    defaults = {key: field.default for config in STRATEGY_CONFIGS.values() for key, field in config.model_fields.items() if key != "name"}
    return {key: v for key, v in value.items() if key in own.model_fields or key not in defaults or v != defaults[key]}


# The `strategy:` section: one class per strategy in dlray.strategies.STRATEGIES, told apart by `name`, each
# holding only its own keys (a key of another strategy is refused by name: dlray.config.dotted.messages).
StrategyConfig = Annotated[
    Annotated[Annotated[DDPConfig, Tag("ddp")] | Annotated[FSDPConfig, Tag("fsdp")] | Annotated[DeepSpeedConfig, Tag("deepspeed")], tagged_by_name("ddp")],
    BeforeValidator(without_other_defaults),
]


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
    # Restarts after a node is drained for preemption (FailureConfig's own budget, apart from max_failures):
    # the run checkpoints at the next step once Ray announces it (ray.train.get_preemption_info). -1 = unlimited.
    max_preemption_failures: int = Field(-1, ge=-1)
    checkpoint_num_to_keep: int | None = Field(2, ge=1)  # best K by train.metric, and always the latest; None keeps all
    # A checkpoint at the first step this many seconds after the last one (torchtitan's and Lightning's
    # train_time_interval): bounds the work lost to a failure by wall time. None: only the step and epoch ones.
    checkpoint_interval_s: float | None = Field(None, gt=0)
    # Ray Train's CheckpointUploadMode: async copies each rank's checkpoint to storage_path in a thread of its worker
    # while training goes on (the step waits only for the local save); sync waits for the copy too.
    checkpoint_upload: Literal["async", "sync"] = "async"
    # Start from this checkpoint (of any run, e.g. a PBT donor's) with this config's hyperparameters;
    # once the run has checkpoints of its own, a restart takes its own latest instead.
    resume_from_checkpoint: str | None = None
    # When stdout is not a terminal (a log file, `ray job logs`): seconds between plain step-progress
    # lines; the epoch lines always print. On a terminal the progress bar updates at every report.
    progress_interval_s: float = Field(30.0, ge=0)
    # The longest a rank may go without finishing an optimizer step (or a validation), as a watchdog outside the ranks
    # sees it (dlray.watchdog): past it every rank's stack goes to <run dir>/hangs/ (py-spy), the console names the
    # ranks that stopped, and they are killed, so Ray restarts the group from the last checkpoint (run.max_failures). None: off.
    hang_timeout_s: float | None = Field(600.0, gt=0)
