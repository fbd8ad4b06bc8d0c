"""BERT-style text classifier (Devlin et al., 2019): `transformers`' BertForSequenceClassification,
trained from scratch on a flavor's sizes with the tokenizer of dlray.data.text_classification, or
fine-tuned from a pretrained base (`model.name_or_path`, whose tokenizer `data.tokenizer` defaults to):
whole, head only (`freeze`), or with LoRA / QLoRA adapters.

An exported model is a plain transformers directory with its tokenizer:
`AutoModelForSequenceClassification.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`; an adapter's export is
PEFT's layout with the new head's config.json beside it (`bert.from_pretrained` loads both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dlray.models.classification import classification_losses, head_config
from dlray.models.family import ModelFamily

# transformers takes seconds to import: it is imported where a model is built or loaded, so that
# checking a config (`dlray validate`, every CLI command) does not pay for it.
if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Parameter counts with the default data.vocab_size 2048 (and BERT's 30,522-token vocabulary):
# debug 0.24M (2.1M), small 14.0M (28.8M, BERT-Small), base 87.3M (109.5M, BERT-base).
FLAVORS = {
    "debug": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},  # seconds on CPU
    "small": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 2048},  # BERT-Small (Turc et al., 2019)
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},  # BERT-base
}
METRICS = ("accuracy",)
OPTIMIZERS = ("model",)
HEAD_MODULES = ("classifier",)  # what stays trainable when only the head is fine-tuned
# LoRA and QLoRA as PEFT does them for classifiers: the new head trains whole beside the adapters.
PEFT_TASK_TYPE = "SEQ_CLS"
# No prompt tuning: its virtual tokens would need positions beyond data.max_seq_len, which a debug
# flavor's learned position table (sized to it) does not have.
FINETUNING_TYPES = ("full", "freeze", "lora", "qlora")


def shard_classes() -> tuple[type[nn.Module], ...]:
    """The blocks FSDP shards one by one (imported here, so transformers loads only when FSDP asks)."""
    from transformers.models.bert.modeling_bert import BertLayer

    return (BertLayer,)


def build(model_cfg, data_info, **load_options) -> PreTrainedModel:
    """`data_info` needs vocab_size, pad_token_id, max_seq_len and class_names (see dlray.data.text_classification);
    `load_options` (dlray.finetune.load_options) go to from_pretrained."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    base = model_cfg.get("name_or_path")
    if not base:
        config = BertConfig(
            vocab_size=data_info["vocab_size"],
            max_position_embeddings=data_info["max_seq_len"],  # learned positions: the model reads at most this many tokens
            pad_token_id=data_info["pad_token_id"],
            attn_implementation=model_cfg.get("attn_implementation"),
            **FLAVORS[model_cfg["flavor"]],
            **head_config(model_cfg, data_info),
        )
        return BertForSequenceClassification(config)
    config = AutoConfig.from_pretrained(base, **head_config(model_cfg, data_info))
    if data_info["vocab_size"] > config.vocab_size:
        raise ValueError(f"data.tokenizer has {data_info['vocab_size']} tokens, model.name_or_path {base!r} embeds {config.vocab_size}: use its own tokenizer")
    if data_info["max_seq_len"] > config.max_position_embeddings:
        raise ValueError(f"data.max_seq_len {data_info['max_seq_len']} exceeds the {config.max_position_embeddings} positions of model.name_or_path {base!r}")
    # ignore_mismatched_sizes: a base that is itself a classifier gets a new head for these classes.
    return AutoModelForSequenceClassification.from_pretrained(base, config=config, ignore_mismatched_sizes=True,
                                                              attn_implementation=model_cfg.get("attn_implementation"), **load_options)


def compute_loss(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    input_ids, attention_mask, labels = batch
    return classification_losses(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    # transformers' default is non-reentrant torch.utils.checkpoint, which DDP, FSDP2 and ZeRO-3 all accept.
    model.gradient_checkpointing_enable()


def save_pretrained(model: PreTrainedModel, directory) -> None:
    """A model, or an adapter with its model's config: the base it names has no head for these classes."""
    model.save_pretrained(directory)
    if hasattr(model, "peft_config"):
        model.get_base_model().config.save_pretrained(directory)


def from_pretrained(directory, **load_options) -> PreTrainedModel:
    """A classifier, or a PEFT adapter directory over its base (adapter_config.json names it) with a
    head sized by the config.json beside it."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not Path(directory, "adapter_config.json").is_file():
        return AutoModelForSequenceClassification.from_pretrained(directory)
    from peft import PeftConfig, PeftModel

    base = PeftConfig.from_pretrained(directory).base_model_name_or_path
    model = AutoModelForSequenceClassification.from_pretrained(base, config=AutoConfig.from_pretrained(directory), ignore_mismatched_sizes=True, **load_options)
    return PeftModel.from_pretrained(model, directory)


FAMILY = ModelFamily(name="bert", build=build, compute_loss=compute_loss, flavors=FLAVORS, data=("labelled text",), task="classify",
                     metrics=METRICS, shard_classes=shard_classes, enable_gradient_checkpointing=enable_gradient_checkpointing,
                     save_pretrained=save_pretrained, from_pretrained=from_pretrained, pretrained=True,
                     finetuning_types=FINETUNING_TYPES, head_modules=HEAD_MODULES, peft_task_type=PEFT_TASK_TYPE,
                     inputs="text")
