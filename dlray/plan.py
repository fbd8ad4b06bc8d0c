"""What a job will hold on each device, before any cluster starts: `dlray plan`, and the check behind
`dlray validate` and `dlray train` that refuses a GPU job larger than its `scaling.accelerator_type`.

    dlray plan jobs/gpu/gpt_1b_fsdp.yaml [key=value ...] [--json]

The model is built by its family under torch's FakeTensorMode: every tensor has a shape and a dtype
and no memory, so an 8B model plans in seconds on a laptop. A `model.name_or_path` job builds from its
config.json alone (transformers' _from_config in place of from_pretrained): no weights are read. PEFT's
adapters are added on the meta device instead (they cannot be moved as fake tensors), for the counts.

Per device, for the job's strategy, precision and scaling.num_workers (N parameters, T of them trained,
w workers; dlray's strategies keep fp32 weights and compute in the precision's dtype):

    strategy    params       grads   optimizer          temporary
    ddp         N            T       T x state          DDP's gradient buckets (T, fp32)
    fsdp        N / w        T / w   T x state / w      the all-gathered block(s) and its unsharded grads
    zero 1      N            T       T x (4 + state)/w  DeepSpeed's reduce bucket
    zero 2      N            T / w   T x (4 + state)/w  DeepSpeed's reduce bucket
    zero 3      N / w        T / w   T x (4 + state)/w  the gathered prefetch bucket and the reduce bucket

DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_...`) assume its
fp16/bf16 sections: 16-bit weights and gradients beside fp32 master weights (18 bytes per parameter on
top of the weights). dlray runs DeepSpeed's `torch_autocast` instead: the weights and gradients stay
fp32 and the ZeRO optimizer keeps its own fp32 copy of each trained partition (the "4 +" above), as
the measured state of tests/test_plan.py shows. Their 4 x largest-layer figure for ZeRO-3 is the
gathered-parameter part of our temporary buffers.

Activations come from one forward and backward of the micro batch on fake tensors, under the job's
autocast (or FSDP's compute dtype), with torch's MemTracker (torch.distributed._tools): the memory
live at the step's peak beyond weights and gradients, gradient checkpointing's recomputation included.
QLoRA's quantised weights count 4 bits each plus their bitsandbytes quantisation state.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils.hooks import RemovableHandle

from dlray import finetune
from dlray.config import ConfigError, JobConfig, apply_override, config_from_dict
from dlray.data import SOURCES
from dlray.models import FAMILIES
from dlray.precision import DEVICE_MEMORY_GIB, NO_BF16, PRECISION_DTYPES, resolve

GiB = 2**30
# fp32 values an optimizer keeps per trained parameter.
OPTIMIZER_STATE = {"adam": 2, "adamw": 2}
DS_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's reduce_bucket_size default, allocated whole (fp32 here)
DS_PREFETCH_BUCKET = 50_000_000  # elements: DeepSpeed's stage3_prefetch_bucket_size default
IMAGE_FOLDER_CLASSES = 1000  # an image_folder whose classes cannot be counted here (a URI, a path not mounted): ImageNet's
TEXT_CLASSES = 2  # text_classification: the classes are known only from the data; the head is a few thousand weights either way


HELD = (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.GRAD, _MemRefType.OPT)  # what is not activations


class PlanError(ValueError):
    """The job cannot be planned (its config.json cannot be read), or it does not fit its device."""


@dataclass
class Plan:
    num_params: int
    trainable_params: int
    world_size: int
    precision: str
    per_device: dict[str, int]  # params / grads / optimizer / activations / temporary, bytes
    offloaded: dict[str, int] = field(default_factory=dict)  # what DeepSpeed's offload keeps in each worker's CPU memory
    device_memory: int | None = None  # bytes of one scaling.accelerator_type device
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.per_device.values())

    def to_json(self) -> dict:
        return {"num_params": self.num_params, "trainable_params": self.trainable_params, "world_size": self.world_size,
                "precision": self.precision, "device_memory_bytes": self.device_memory,
                "per_device": {f"{part}_bytes": size for part, size in self.per_device.items()} | {"total_bytes": self.total_bytes},
                "offloaded_per_worker": {f"{part}_bytes": size for part, size in self.offloaded.items()}, "notes": self.notes}

    def render(self, setup: str) -> str:
        lines = [setup, f"{self.num_params:,} parameters ({self.trainable_params:,} trained), "
                        f"{self.world_size} worker(s), {self.precision}", "per device:"]
        lines += [f"  {part:<12} {gib(size):>10}" for part, size in self.per_device.items()]
        memory = f" of {gib(self.device_memory)}" if self.device_memory else ""
        lines.append(f"  {'total':<12} {gib(self.total_bytes):>10}{memory}")
        lines += [f"  offloaded to CPU memory: {part} {gib(size)}" for part, size in self.offloaded.items()]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def gib(size: int | None) -> str:
    """GiB, or MiB below one GiB."""
    size = size or 0
    return f"{size / GiB:,.2f} GiB" if size >= GiB else f"{size / 2**20:,.1f} MiB"


def describe(cfg: JobConfig) -> str:
    """The settings a plan depends on, in a line."""
    model = cfg.model.name_or_path or f"{cfg.model.family}/{cfg.model.flavor}"
    strategy = cfg.strategy.name
    if strategy == "deepspeed":
        strategy += f" ZeRO-{cfg.strategy.zero_stage}" + "".join(f", {part} offload" for part, on in
                                                             (("optimizer", cfg.strategy.offload_optimizer), ("param", cfg.strategy.offload_param)) if on)
    tokens = f" x {cfg.data.max_seq_len} tokens" if "max_seq_len" in type(cfg.data).model_fields else ""
    return (f"{model}, {cfg.finetune.finetuning_type} fine-tune, strategy {strategy}, precision {cfg.precision}, "
            f"gradient checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}, micro batch {cfg.train.micro_batch_size}{tokens}, "
            f"{cfg.scaling.num_workers} workers{' on ' + cfg.scaling.accelerator_type if cfg.scaling.accelerator_type else ''}")


def plan(cfg: JobConfig, activations: int | None = None) -> Plan:
    """The job's plan; `activations`: bytes known from another plan of the same model and batch, not measured again."""
    family = FAMILIES[cfg.model.family]
    precision, notes = planned_precision(cfg)
    info, info_notes = planned_data_info(cfg)
    if cfg.finetune.adapter:
        # PEFT moves each adapter it adds with Module.to(), which cannot swap fake tensors' parameters (torch 2.13):
        # the adapters are counted on the meta device, and the fake model below is the frozen base alone.
        with torch.device("meta"), shapes_only():
            model, quantised = build(family, cfg, info, precision)
            counts = count(model, quantised, cfg.finetune.bnb_4bit_use_double_quant, family)
        notes.append("activations: the frozen base's; the adapters' own (rank-r, and each adapted input's dropout copy) are not counted")
    with torch._subclasses.fake_tensor.FakeTensorMode(), shapes_only():
        model, quantised = build(family, cfg, info, precision, with_adapters=not cfg.finetune.adapter)
        if not cfg.finetune.adapter:
            counts = count(model, quantised, cfg.finetune.bnb_4bit_use_double_quant, family)
        if activations is None:
            activations = activation_bytes(model, family, cfg, info, precision)
    if not cfg.scaling.use_gpu and any(isinstance(module, torch.nn.LSTM) for module in model.modules()):
        notes.append("activations: oneDNN's LSTM workspace is counted, the scratch its backward allocates is not (measured: up to ~30% more)")
    n, t, weight_bytes, largest_block = counts
    state = state_bytes(cfg, weight_bytes, t, n, largest_block, precision)
    per_device = {"params": state.pop("params"), "grads": state.pop("grads"), "optimizer": state.pop("optimizer"),
                  "activations": activations, "temporary": state.pop("temporary")}
    if cfg.finetune.objective in ("dpo", "kto") and not cfg.finetune.adapter:  # dlray.finetune.objective's frozen copy, whole on every worker
        per_device["reference"] = weight_bytes
        notes.append("reference: the frozen copy of the starting weights that DPO and KTO compare with, unsharded on each worker")
    offloaded = {part.removeprefix("offloaded_"): size for part, size in state.items()}
    memory = DEVICE_MEMORY_GIB[cfg.scaling.accelerator_type] * GiB if cfg.scaling.accelerator_type else None
    return Plan(n, t, cfg.scaling.num_workers, precision, per_device, offloaded, memory, notes + info_notes)


def build(family, cfg: JobConfig, info: dict, precision: str, with_adapters: bool = True):
    """The model as dlray.loop.build_model makes it, and the weights QLoRA holds in 4 bits (by name), which
    stay in the compute dtype here: bitsandbytes dequantises each to it as it needs it, and keeps no copy."""
    from transformers import PreTrainedModel

    model = family.build(cfg.model.model_dump(), info)
    for module in model.modules():  # what no_init_weights skipped: a tied output layer is the input embedding
        if isinstance(module, PreTrainedModel):
            module.tie_weights()
    quantised = quantised_weights(model, family) if cfg.finetune.finetuning_type == "qlora" else {}
    if cfg.train.gradient_checkpointing:
        family.enable_gradient_checkpointing(model)
    if with_adapters:
        model = finetune.apply(model, family, cfg)
    else:  # the base's activations as adapters train on it: no weight gradients, every input's gradient
        model.requires_grad_(False)
        model.enable_input_require_grads()
    for weight in quantised.values():
        weight.data = weight.data.to(PRECISION_DTYPES[precision])
    return model, quantised


def count(model: torch.nn.Module, quantised: dict, double_quant: bool, family) -> tuple[int, int, int, int]:
    """Parameters, trained parameters, their bytes (4-bit weights as bitsandbytes stores them) and the largest block's parameters."""
    params = unique(model.parameters())
    four_bit = {id(p) for p in quantised.values()}
    n, t = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    weight_bytes = sum(four_bit_bytes(p.numel(), double_quant) if id(p) in four_bit else p.numel() * p.element_size() for p in params)
    largest_block = max((sum(p.numel() for p in m.parameters()) for m in blocks(model, family)), default=n)
    return n, t, weight_bytes, largest_block


def state_bytes(cfg: JobConfig, weight_bytes: int, trained: int, total: int, largest_block: int, precision: str) -> dict[str, int]:
    """Weights, gradients, optimizer state and the strategy's buffers on one device, by the table in the module docstring;
    what offload moves to CPU memory under `offloaded_<part>`."""
    w, strategy = cfg.scaling.num_workers, cfg.strategy
    opt = 4 * trained * optimizer_values(cfg)
    compute = PRECISION_DTYPES[precision].itemsize
    if strategy.name == "ddp":
        return {"params": weight_bytes, "grads": 4 * trained, "optimizer": opt, "temporary": 4 * trained if w > 1 else 0}
    if strategy.name == "fsdp":
        gathered = total * compute if not strategy.reshard_after_forward else 2 * largest_block * compute  # this block and the prefetched next
        return {"params": shard(weight_bytes, w), "grads": shard(4 * trained, w), "optimizer": shard(opt, w),
                "temporary": gathered + 4 * min(largest_block, trained)}
    master_and_state = shard(4 * trained + opt, w)  # ZeRO's fp32 copy of the trained partition, and the optimizer's state
    grads = 4 * trained if strategy.zero_stage == 1 else shard(4 * trained, w)
    params = weight_bytes if strategy.zero_stage < 3 else shard(weight_bytes, w)
    temporary = 4 * min(DS_REDUCE_BUCKET, trained)
    if strategy.zero_stage == 3:
        temporary += 4 * min(DS_PREFETCH_BUCKET, max(largest_block, total))
    parts = {"params": params, "grads": grads, "optimizer": master_and_state, "temporary": temporary}
    if strategy.offload_optimizer:  # the partitioned gradients go with the optimizer, which steps on the CPU
        parts |= {"optimizer": 0, "offloaded_optimizer": master_and_state, "grads": 0 if strategy.zero_stage > 1 else grads,
                  "offloaded_grads": shard(4 * trained, w)}
    if strategy.offload_param:
        parts |= {"params": 0, "offloaded_params": shard(weight_bytes, w)}
    return parts


def shard(size: int, world: int) -> int:
    return math.ceil(size / world)


def optimizer_values(cfg: JobConfig) -> int:
    """fp32 values per trained parameter: Adam's two moments; SGD's and RMSprop's momentum; RMSprop's square average."""
    name = cfg.optim.name
    return OPTIMIZER_STATE.get(name, (name == "rmsprop") + (cfg.optim.momentum > 0))


def four_bit_bytes(numel: int, double_quant: bool) -> int:
    """A bitsandbytes 4-bit weight: two per byte, an absmax per block of 64; double quantisation stores those
    in 8 bits under an fp32 absmax per 256 of them, with a 256-entry fp32 code table."""
    blocks = math.ceil(numel / 64)
    if not double_quant:
        return math.ceil(numel / 2) + 4 * blocks
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4


def quantised_weights(model: torch.nn.Module, family) -> dict[str, torch.nn.Parameter]:
    """The linear weights transformers loads in 4 bits: every nn.Linear but the output layer (and tied
    weights) and the family's head_modules (dlray.finetune.load_options's llm_int8_skip_modules)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = set(get_keys_to_not_convert(model)) | set(family.head_modules)
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not any(name == s or name.endswith(f".{s}") or name.startswith(f"{s}.") for s in skip)}


def unique(params) -> list[torch.nn.Parameter]:
    """Each parameter once (a tied embedding is one tensor under two names)."""
    return list({id(p): p for p in params}.values())


def blocks(model: torch.nn.Module, family) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one (dlray.strategies.fsdp's choice)."""
    classes, names = family.shard_classes(), set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if isinstance(m, classes) or type(m).__name__ in names]


def activation_bytes(model: torch.nn.Module, family, cfg: JobConfig, info: dict, precision: str) -> int:
    """The most memory one micro batch's forward and backward hold at once beyond weights, gradients and optimizer
    state (the largest over a family's optimizer phases), as torch's MemTracker counts it on fake tensors."""
    dtype = PRECISION_DTYPES[precision]
    if cfg.strategy.name == "fsdp":  # FSDP's MixedPrecisionPolicy computes with weights in this dtype, not under autocast
        for param in model.parameters():
            param.data = param.data.to(dtype)  # not module.to(): fake tensors cannot be swapped in place
    batch = fake_batch(cfg, info)
    model.train()
    peak = 0
    for phase in family.optimizers:
        tracker = ActivationPeak()
        for param in model.parameters():  # MemTracker hooks every parameter's gradient, which a frozen one refuses
            if not param.requires_grad:
                tracker._param_to_grad_hook_handles[param] = (RemovableHandle(NO_HOOKS), RemovableHandle(NO_HOOKS))
        tracker.track_external(model)
        with tracker:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32 and cfg.strategy.name != "fsdp"):
                loss = family.training_loss(model, batch, phase)
            loss.backward()
        model.zero_grad(set_to_none=True)
        peak = max(peak, tracker.peak)
    return peak


class Hooks(dict):
    """A hook table RemovableHandle can refer to (it keeps a weak reference, which a plain dict refuses)."""


NO_HOOKS = Hooks()


class ActivationPeak(MemTracker):
    """MemTracker's peak is of all memory (at the end of the backward, where the gradients are); this keeps the
    peak of what is not weights, gradients or optimizer state, sampled as each operation starts: a weight's new
    gradient counts as a temporary until autograd accumulates it into `.grad`, after the operation that made it."""

    peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for snapshot in self._curr_mem_snap.values():
            self.peak = max(self.peak, snapshot["Total"] - sum(snapshot.get(kind, 0) for kind in HELD))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func is torch.ops.aten.mkldnn_rnn_layer.default and out[3].numel() == 0 and len(args) == 16 and args[15]:  # train
            # torch's fake kernel of oneDNN's LSTM layer (what a CPU trains an nn.LSTM with) returns an empty workspace; the
            # real one, kept for the backward, holds 3 copies of the gates and 2 of the states per step (within 5% measured, torch 2.13).
            steps, batch = args[0].shape[:2] if not args[14] else args[0].shape[1::-1]
            hidden = args[10]
            size = 4 * (3 * steps * batch * 4 * hidden + 2 * 2 * (steps + 1) * batch * hidden)  # fp32
            out = (*out[:3], super().__torch_dispatch__(torch.ops.aten.empty.memory_format, types, ([size],), {"dtype": torch.uint8, "device": args[0].device}))
        return out


def fake_batch(cfg: JobConfig, info: dict) -> tuple:
    """A micro batch as the family's compute_loss takes it (see dlray.data): created under the fake mode."""
    size, data = cfg.train.micro_batch_size, cfg.data
    if SOURCES[data.name].kind == "image":
        return torch.rand(size, *info["image_shape"]), torch.randint(0, len(info["class_names"]), (size,))
    if SOURCES[data.name].kind == "sequence":
        return torch.rand(size, *info["sequence_shape"]), torch.randint(0, len(info["class_names"]), (size,))
    if data.name == "preference":  # a pair's (or KTO's completion and KL) sequences go through one forward: twice the sequences
        size *= 2
    ids = torch.randint(0, info["vocab_size"], (size, data.max_seq_len))
    if data.name == "text_classification":
        return ids, torch.ones_like(ids), torch.randint(0, len(info["class_names"]), (size,))
    return ids, ids


def planned_data_info(cfg: JobConfig) -> tuple[dict, list[str]]:
    """The `info` a family's build takes, from the config alone: nothing is read but a local folder's names."""
    data, notes = cfg.data, []
    if SOURCES[data.name].kind == "image":
        side = data.image_size or (8 if data.name == "digits" else 32)  # digits are 8 px; image_folder's default resize is 32
        if data.name == "digits":
            classes = 10
        elif Path(data.path).is_dir():
            classes = sum(1 for p in Path(data.path).iterdir() if p.is_dir())
        else:
            classes = IMAGE_FOLDER_CLASSES
            notes.append(f"data.path {data.path!r} is not a folder here: the head is sized for {classes} classes")
        return {"image_shape": (data.channels, side, side), "class_names": [str(i) for i in range(classes)],
                "mean": [0.5] * data.channels, "std": [0.25] * data.channels}, notes
    if SOURCES[data.name].kind == "sequence":  # the shape of the first row read; the classes are not counted
        source = SOURCES[data.name]
        listing = source.list_rows(data, cfg.train.seed)
        first = next(source.read(listing.filesystem, listing.files[0], data, cfg.train.seed))["sequence"]
        steps, features = len(first), len(first[0])
        notes.append(f"data.path {data.path!r}: sequences of {steps} steps of {features} features, as its first row; the head is sized for {TEXT_CLASSES} classes")
        return {"sequence_shape": (steps, features), "class_names": [str(i) for i in range(TEXT_CLASSES)],
                "mean": [0.0] * features, "std": [1.0] * features}, notes
    vocab = pretrained_config(cfg.model.name_or_path).vocab_size if cfg.model.name_or_path else data.vocab_size
    if data.tokenizer and not cfg.model.name_or_path:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(data.tokenizer))
    info = {"vocab_size": vocab, "max_seq_len": data.max_seq_len, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if data.name == "text_classification":
        info["class_names"] = [str(i) for i in range(TEXT_CLASSES)]
    return info, notes


def planned_precision(cfg: JobConfig) -> tuple[str, list[str]]:
    """What `precision: auto` resolves to on the job's workers: this CPU's choice for a CPU job."""
    if not cfg.scaling.use_gpu:
        return resolve(cfg.precision, torch.device("cpu"), cfg.strategy.name), []
    if cfg.precision != "auto":
        return cfg.precision, []
    kind = cfg.scaling.accelerator_type
    if kind in NO_BF16:
        return ("fp32" if cfg.strategy.name == "fsdp" else "fp16"), []
    return "bf16", [] if kind else ["precision auto: planned as bf16 (a GPU from Ampere on); set scaling.accelerator_type to plan for one GPU"]


def pretrained_config(name_or_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise PlanError(f"model.name_or_path {name_or_path!r}: its config.json could not be read ({str(err).splitlines()[0]}). "
                        "Point it at a local model directory, or plan where the Hugging Face Hub (or its cache) is reachable") from None


@contextlib.contextmanager
def shapes_only():
    """While the family builds: transformers' from_pretrained builds from the config its Auto class read
    from config.json (the model's _from_config) instead of loading the weights, so that the family's own
    build (its head, its checks) decides the model's shape without a download; and no weight is
    initialised (transformers' no_init_weights: truncated-normal init asks fake tensors for values)."""
    from transformers import PreTrainedModel
    from transformers.initialization import no_init_weights

    original = PreTrainedModel.__dict__["from_pretrained"]

    def from_config(cls, name_or_path, *args, config=None, attn_implementation=None, **ignored):
        return cls._from_config(config or pretrained_config(name_or_path), attn_implementation=attn_implementation)

    PreTrainedModel.from_pretrained = classmethod(from_config)
    try:
        with no_init_weights():
            yield
    except OSError as err:  # the Auto class's config.json, from a directory or the Hub
        raise PlanError(f"model.name_or_path: its config.json could not be read ({str(err).splitlines()[0]}). Point it at a "
                        "local model directory, or plan where the Hugging Face Hub (or its cache) is reachable") from None
    finally:
        PreTrainedModel.from_pretrained = original
        # diffusers keeps the torch.nn.init functions it finds when first imported and puts them back after each of
        # its loads: first imported in here (a diffusion model's build), it kept no_init_weights' no-ops, and every
        # model built in this process after its next load would have gone uninitialised. The real ones, restored by now:
        if (kept := getattr(sys.modules.get("diffusers.models.modeling_utils"), "TORCH_INIT_FUNCTIONS", None)) is not None:
            kept.update({name: getattr(torch.nn.init, name) for name in kept})


def check_fits(cfg: JobConfig) -> Plan | None:
    """The plan of a GPU job with a scaling.accelerator_type; PlanError when it exceeds the device."""
    if not (cfg.scaling.use_gpu and cfg.scaling.accelerator_type):
        return None
    result = plan(cfg)
    if result.total_bytes <= result.device_memory:
        return result
    largest = sorted(result.per_device.items(), key=lambda item: -item[1])[:2]
    raise PlanError(f"the plan needs {gib(result.total_bytes)} per device, more than a {cfg.scaling.accelerator_type}'s "
                    f"{gib(result.device_memory)}: {' and '.join(f'{part} {gib(size)}' for part, size in largest)} are the largest parts. "
                    f"To fit: {'; '.join(suggestions(cfg, result))} (`dlray plan` shows each part)")


def suggestions(cfg: JobConfig, result: Plan) -> list[str]:
    """Changes that would shrink the largest parts, each with the plan it gives."""
    options = []
    strategy = cfg.strategy
    if strategy.name == "ddp" and cfg.finetune.finetuning_type != "qlora":
        options += [["strategy.name=fsdp"], ["strategy.name=deepspeed", "strategy.zero_stage=3"]]
    if strategy.name == "deepspeed" and strategy.zero_stage < 3 and cfg.finetune.finetuning_type != "qlora":
        options.append(["strategy.zero_stage=3"])
    if strategy.name == "deepspeed" and not strategy.offload_optimizer:
        options.append(["strategy.offload_optimizer=true"])
    if strategy.name == "deepspeed" and strategy.zero_stage == 3 and not strategy.offload_param:
        options.append(["strategy.offload_optimizer=true", "strategy.offload_param=true"])
    if FAMILIES[cfg.model.family].enable_gradient_checkpointing and not cfg.train.gradient_checkpointing:
        options.append(["train.gradient_checkpointing=true"])
    if cfg.train.micro_batch_size > 1:
        options.append([f"train.micro_batch_size={cfg.train.micro_batch_size // 2}",
                        f"train.gradient_accumulation_steps={cfg.train.gradient_accumulation_steps * 2}"])
    if strategy.name != "ddp":
        options.append([f"scaling.num_workers={cfg.scaling.num_workers * 2}"])
    described = []
    for overrides in options:
        # Only gradient checkpointing changes the activations' shape; a smaller micro batch scales them.
        activations = result.per_device["activations"]
        if overrides[0].startswith("train.micro_batch_size"):
            activations = activations // 2
        try:
            changed = plan(apply_overrides(cfg, overrides), None if overrides[0].startswith("train.gradient_checkpointing") else activations)
        except (ConfigError, PlanError):  # a change the config refuses for this job
            continue
        fits = "fits" if changed.total_bytes <= result.device_memory else "still over"
        described.append(f"{' '.join(overrides)} ({gib(changed.total_bytes)}, {fits})")
    return described or ["a larger scaling.accelerator_type"]


def apply_overrides(cfg: JobConfig, overrides: list[str]) -> JobConfig:
    data = cfg.model_dump(mode="json")
    for item in overrides:
        apply_override(data, item)
    return config_from_dict(data)
