"""A family added the way the README's recipe says, to show the recipe works: this file, one registry
entry (made by the tests, where dlray/models/__init__.py would hold the line) and a debug job
(TOY_JOB, what jobs/debug/toy_cpu.yaml would hold). The strategy matrix trains it and exports it like the shipped ones.

A two-layer perceptron over the pixels of any image data.
"""

import torch
from torch import nn

from dlray.models.classification import classification_losses
from dlray.models.family import ModelFamily

FLAVORS = {"debug": {"hidden": 32}}


class Block(nn.Module):
    """A hidden layer: what FSDP shards on its own."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.linear = nn.Linear(width_in, width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


def build(model_cfg: dict, data_info: dict) -> nn.Module:
    pixels = int(torch.tensor(data_info["image_shape"]).prod())
    hidden = FLAVORS[model_cfg["flavor"]]["hidden"]
    return nn.Sequential(nn.Flatten(), Block(pixels, hidden), nn.Linear(hidden, len(data_info["class_names"])))


def compute_loss(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    images, labels = batch
    return classification_losses(model(images), labels)


# `FAMILY` in a family module; here TOY, so that nothing but the tests that want it registers it
# (the line in FAMILIES is made by test_strategies' fixture and by strategy_worker).
TOY = ModelFamily(name="toy", build=build, compute_loss=compute_loss, flavors=FLAVORS, data=("image",), task="classify",
                  metrics=("accuracy",), shard_classes=lambda: (Block,))

# Its debug job, as jobs/debug/toy_cpu.yaml would hold it.
TOY_JOB = {"model": {"family": "toy", "flavor": "debug"}, "optim": {"lr": 0.01}, "train": {"num_epochs": 3, "micro_batch_size": 32},
           "scaling": {"num_workers": 2}}
