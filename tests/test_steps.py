"""Runs measured in steps (dlray.step.step_budget, dlray.optim): the budget and the schedule over it. The
loop's use of them runs end to end in test_train (a worker killed mid-epoch) and test_gpt (a streamed
step budget, validated and checkpointed by steps, whose driver is killed)."""

import pytest
import torch

from dlray.config import load_config
from dlray.optim import build_scheduler
from dlray.step import step_budget

from helpers import REPO


@pytest.mark.parametrize("max_steps, max_tokens, expected", [
    (None, None, 3 * 20),  # num_epochs whole epochs
    (25, None, 25),  # ends 5 steps into the second epoch
    (500, None, 500),  # more than num_epochs: the budget overrides it
    (None, 10 * 4096 + 1, 11),  # the step that reaches the token budget counts
    (7, 10 * 4096, 7),  # both: the smaller
])
def test_the_step_budget_overrides_epochs(max_steps, max_tokens, expected):
    assert step_budget(3, max_steps, max_tokens, steps_per_epoch=20, tokens_per_step=4096) == expected


def test_warmup_and_cosine_run_over_the_step_budget():
    cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml", ["scheduler.name=cosine", "scheduler.warmup_steps=10", "scheduler.min_lr_ratio=0.1"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=1000, total=110, mode="min")
    lrs = []
    for _ in range(110):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0), "warmup over the first 10 steps"
    assert lrs[60] == pytest.approx(0.55, abs=0.01), "half-way down the cosine at half the budget after warmup"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1), "the floor at the budget's end, though the epoch has 1000 steps"
