"""GPT-style causal language model: a Llama decoder (RMSNorm, rotary positions, SwiGLU) built
with `transformers` and trained from scratch on packed token blocks (see dlray.data.text), or any
pretrained Hugging Face causal LM (`model.name_or_path`) fine-tuned by any dlray.finetune method.

An exported model is a plain transformers directory (config.json, model.safetensors, the
tokenizer): `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dlray.models.family import ModelFamily

# transformers takes seconds to import: it is imported where a model is built or loaded, so that
# checking a config (`dlray validate`, every CLI command) does not pay for it.
if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# Parameter counts with the default data.vocab_size 2048, and with a 32,000-token vocabulary:
# debug 0.69M / 4.5M, small 26.7M / 42.1M, base 86.5M / 110M, 1b 0.98B / 1.10B.
# Small models tie the output layer to the input embedding, which would otherwise dominate them.
FLAVORS = {
    "debug": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 384, "tie_word_embeddings": True},  # seconds on CPU
    "small": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 1408, "tie_word_embeddings": True},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 2048, "tie_word_embeddings": True},  # GPT-2 small's body
    "1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632,
           "tie_word_embeddings": False},  # TinyLlama-1.1B
}
METRICS = ()
PEFT_TASK_TYPE = "CAUSAL_LM"
FINETUNING_TYPES = ("full", "lora", "qlora", "prompt_tuning")  # finetune.finetuning_type values (no head to freeze)
IGNORE_INDEX = -100  # label of a position that is not trained on (prompt, padding): PyTorch's and HF's convention
DERIVED_METRICS = ("val_perplexity", "tokens_per_sec")  # what derived_metrics adds to each epoch's report
OPTIMIZERS = ("model",)


def shard_classes() -> tuple[type[nn.Module], ...]:
    """The blocks FSDP shards one by one (imported here, so transformers loads only when FSDP asks)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return (LlamaDecoderLayer,)


def build(model_cfg, data_info, **load_options) -> nn.Module:
    """`model.name_or_path` loaded with `load_options` (dlray.finetune.load_options), or a new
    `flavor`, for which `data_info` gives vocab_size, max_seq_len and the special token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_cfg.get("name_or_path"):
        return from_pretrained(model_cfg["name_or_path"], attn_implementation=model_cfg.get("attn_implementation"), **load_options)

    config = LlamaConfig(
        vocab_size=data_info["vocab_size"],
        max_position_embeddings=data_info["max_seq_len"],  # rotary positions: no weights depend on it
        bos_token_id=data_info["bos_token_id"],
        eos_token_id=data_info["eos_token_id"],
        pad_token_id=data_info["pad_token_id"],
        attention_dropout=model_cfg["dropout"],
        attn_implementation=model_cfg.get("attn_implementation"),
        **FLAVORS[model_cfg["flavor"]],
    )
    return LlamaForCausalLM(config)


def compute_loss(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """Mean next-token cross-entropy per sequence, over its trained positions.

    A batch is (input_ids, labels), or (input_ids, position_ids, labels) for packed examples: the
    positions restart at each example, from which transformers builds a mask that keeps every
    example to itself (with no KV cache, hence use_cache=False). Labels are already shifted.
    """
    input_ids, *position_ids, labels = batch
    logits = model(input_ids=input_ids, position_ids=position_ids[0] if position_ids else None, use_cache=False).logits
    logits = logits[:, -labels.shape[1]:]  # prompt tuning puts its virtual tokens' outputs first
    # Over (tokens, vocab) rows: on a CPU, log-softmax over the contiguous last dimension takes 17 ms
    # where the (batch, vocab, seq) layout takes 43 (16 x 128 tokens, 2048-token vocabulary).
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX).view_as(labels)
    return {"loss": losses.sum(dim=1) / (labels != IGNORE_INDEX).sum(dim=1).clamp_min(1)}


def derived_metrics(metrics: dict[str, float], data_info) -> dict[str, float]:
    """Perplexity of each evaluated split, exp of its per-token loss; training throughput in tokens."""
    # torch, not math.exp: a diverged loss gives inf or nan instead of an OverflowError.
    derived = {f"{split}_perplexity": torch.tensor(metrics[f"{split}_loss"], dtype=torch.float64).exp().item()
               for split in ("val", "test") if f"{split}_loss" in metrics}
    if "samples_per_sec" in metrics:
        derived["tokens_per_sec"] = metrics["samples_per_sec"] * data_info["max_seq_len"]
    return derived


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6N for the forward and backward
    matmuls of N weights, plus 12·L·H·T for attention's scores and weighted sums over T positions in L layers
    of width H. A frozen weight (LoRA's base) counts 4: its forward and the gradient of its input, not of
    itself. Recomputed activations do not count: that is hardware, not model, FLOPs."""
    config = model.config
    # transformers' counts (a 4-bit weight's packed halves included), also through a PEFT model.
    total, trainable = model.num_parameters(), model.num_parameters(only_trainable=True)
    embedding = model.get_input_embeddings().weight
    if not config.tie_word_embeddings:  # the input embedding is a lookup, not a matmul, unless tied to the output layer (then counted once)
        total -= embedding.numel()
        trainable -= embedding.numel() if embedding.requires_grad else 0
    return 6 * trainable + 4 * (total - trainable) + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def enable_gradient_checkpointing(model: LlamaForCausalLM) -> None:
    # transformers' default is non-reentrant torch.utils.checkpoint, which DDP, FSDP2 and ZeRO-3 all accept.
    model.gradient_checkpointing_enable()


def save_pretrained(model: LlamaForCausalLM, directory) -> None:
    model.save_pretrained(directory)


def from_pretrained(name_or_path, **load_options) -> nn.Module:
    """A causal LM, or a PEFT adapter directory with its base (adapter_config.json names it)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    if Path(name_or_path, "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(name_or_path, **load_options)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **load_options)


FAMILY = ModelFamily(name="gpt", build=build, compute_loss=compute_loss, flavors=FLAVORS, data=("text", "preference"), task="generate",
                     shard_classes=shard_classes, derived_metrics=derived_metrics, derived_metric_names=DERIVED_METRICS,
                     enable_gradient_checkpointing=enable_gradient_checkpointing, flops_per_token=flops_per_token,
                     save_pretrained=save_pretrained, from_pretrained=from_pretrained, pretrained=True,
                     finetuning_types=FINETUNING_TYPES, peft_task_type=PEFT_TASK_TYPE,
                     inputs="text")
