"""Each of 2 ranks of a plain gloo group for test_guards (spawned: kept to torch and dlray's Ray-free step, which
import in seconds): six DDP steps of a linear layer whose loss is NaN on rank 1 alone at steps 3 and 4."""

import math
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from dlray.step import EpochTotals, train_step
from dlray.strategies.ddp import DDPStrategy

BAD = (2, 3)  # 0-based steps


class NaNOnRank1:
    optimizers = ("main",)

    def __init__(self):
        self.calls = 0

    def training_loss(self, model, batch, phase):
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        self.calls += 1
        return loss * math.nan if dist.get_rank() == 1 and self.calls - 1 in BAD else loss


def run(rank: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/init", rank=rank, world_size=2)
    cfg = SimpleNamespace(train=SimpleNamespace(max_grad_norm=1.0, compile=False), finetune=SimpleNamespace(trainable_only=False), precision="fp32")
    torch.manual_seed(0)
    strategy = DDPStrategy(cfg, torch.device("cpu"))
    model, _ = strategy.prepare(nn.Linear(4, 1), lambda module: [torch.optim.AdamW(module.parameters(), lr=0.1)])
    totals, family = EpochTotals.zeros(1, torch.device("cpu")), NaNOnRank1()
    torch.manual_seed(rank)  # each rank its own batches
    found, weights = [], []
    for _ in range(6):
        found.append(train_step(model, family, strategy, [([torch.randn(8, 4), torch.randn(8, 1)], None, None)], totals))
        weights.append(model.module.weight.detach().clone())
    torch.save({"found": found, "weights": weights, "nonfinite": totals.nonfinite}, f"{directory}/rank{rank}.pt")
    dist.destroy_process_group()
