"""What the classifier families (cnn, vit, bert) share (not a family itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_losses(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample cross-entropy (in fp32 whatever the compute dtype) and accuracy."""
    return {
        "loss": F.cross_entropy(logits.float(), labels, reduction="none"),
        "accuracy": (logits.argmax(-1) == labels).float(),
    }


def head_config(model_cfg, data_info) -> dict:
    """The transformers config entries of a classifier for data_info's classes (vit, bert), with
    model.dropout as its hidden and attention dropout."""
    names = data_info["class_names"]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)},
            "hidden_dropout_prob": model_cfg["dropout"], "attention_probs_dropout_prob": model_cfg["dropout"]}
