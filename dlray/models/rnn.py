"""Recurrent sequence classifier: stacked LSTM or GRU layers (model.cell), one or both directions
(model.bidirectional), dropout between layers (model.dropout), a linear head on the last hidden state.

A sample is a sequence (T, F): T steps of F numbers. Image data is read row by row, (C, H, W) as H steps
of C*W features (the bundled 8x8 digits: 8 steps of 8), so any image source trains it, as does a source of sequences (dlray.data.sequences):

    model: {family: rnn, flavor: small, cell: gru, bidirectional: true}

Recurrent networks need gradient clipping (their gradients can grow along the steps): train.max_grad_norm,
which every strategy applies (on by default, 1.0).
"""

from __future__ import annotations

import torch
from torch import nn

from dlray.models.classification import classification_losses
from dlray.models.family import ModelFamily

FLAVORS = {
    "debug": {"hidden_size": 16, "num_layers": 1},
    "small": {"hidden_size": 64, "num_layers": 2},
    "base": {"hidden_size": 256, "num_layers": 3},
}
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


def sequence_shape(data_info: dict) -> tuple[int, int]:
    """(steps, features) of the sequences the model takes: an image's rows, or the sequences' own shape."""
    if "image_shape" in data_info:
        channels, height, width = data_info["image_shape"]
        return height, channels * width
    steps, features = data_info["sequence_shape"]
    return steps, features


def feature_statistics(data_info: dict) -> tuple[list[float], list[float]]:
    """Each feature's mean and std: an image's per-channel ones repeated along the row (features are channel-major)."""
    if "image_shape" in data_info:
        width = data_info["image_shape"][2]
        return [m for m in data_info["mean"] for _ in range(width)], [s for s in data_info["std"] for _ in range(width)]
    return data_info["mean"], data_info["std"]


class RecurrentLayer(nn.Module):
    """One layer (both directions when bidirectional): what FSDP shards on its own."""

    def __init__(self, cell: str, in_features: int, hidden_size: int, bidirectional: bool):
        super().__init__()
        self.rnn = CELLS[cell](in_features, hidden_size, batch_first=True, bidirectional=bidirectional)
        if cell == "lstm":
            # Forget-gate bias 1 (gates ordered input, forget, cell, output): remember by default, so the
            # gradient reaches early steps from the first step on (Jozefowicz et al., 2015).
            for name, bias in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    nn.init.ones_(bias[hidden_size : 2 * hidden_size])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, in) -> every step's output (B, T, directions * hidden), and the last hidden state of each direction, concatenated."""
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU autocast sends an LSTM to oneDNN's bf16 kernel, which fails on CPUs without native bf16 ("could
            # not create a primitive descriptor" on AVX2): the recurrence runs in its weights' dtype instead.
            with torch.autocast("cpu", enabled=False):
                out, state = self.rnn(x.to(self.rnn.weight_ih_l0.dtype))
        else:
            out, state = self.rnn(x)
        hidden = state[0] if isinstance(state, tuple) else state  # an LSTM's (h, c), a GRU's h
        return out, torch.cat(list(hidden), dim=-1)


class RecurrentClassifier(nn.Module):
    def __init__(self, *, cell: str, hidden_size: int, num_layers: int, bidirectional: bool, features: int, num_classes: int,
                 dropout: float, mean, std):
        super().__init__()
        # Normalisation lives in the model so the served artifact takes the raw values.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        directions = 2 if bidirectional else 1
        self.layers = nn.ModuleList(RecurrentLayer(cell, features if i == 0 else directions * hidden_size, hidden_size, bidirectional)
                                    for i in range(num_layers))
        self.dropout = nn.Dropout(dropout)  # between layers, as nn.LSTM's `dropout`, and before the head
        self.head = nn.Linear(directions * hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # images (B, C, H, W), read row by row: H steps of C*W features
            x = x.permute(0, 2, 1, 3).flatten(2)
        # In the input's dtype: FSDP's mixed precision hands us bf16 inputs but leaves buffers fp32.
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        for layer in self.layers:
            x, last = layer(x)
            x = self.dropout(x)
        return self.head(self.dropout(last))


def build(model_cfg: dict, data_info: dict) -> RecurrentClassifier:
    """`data_info` needs class_names, mean, std, and image_shape or sequence_shape (dlray.data's image and sequence sources)."""
    flavor = FLAVORS[model_cfg["flavor"]]
    mean, std = feature_statistics(data_info)
    return RecurrentClassifier(
        cell=model_cfg["cell"],
        hidden_size=model_cfg["hidden_size"] or flavor["hidden_size"],
        num_layers=model_cfg["num_layers"] or flavor["num_layers"],
        bidirectional=model_cfg["bidirectional"],
        features=sequence_shape(data_info)[1],
        num_classes=len(data_info["class_names"]),
        dropout=model_cfg["dropout"],
        mean=mean,
        std=std,
    )


def compute_loss(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    sequences, labels = batch
    return classification_losses(model(sequences), labels)


FAMILY = ModelFamily(name="rnn", build=build, compute_loss=compute_loss, flavors=FLAVORS, data=("image", "sequence"), task="classify",
                     inputs="sequence", metrics=("accuracy",), shard_classes=lambda: (RecurrentLayer,),
                     extra_model_keys=("cell", "bidirectional", "hidden_size", "num_layers"))
