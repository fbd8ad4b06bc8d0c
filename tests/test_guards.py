"""A run that cannot fail silently: the non-finite guard (dlray.step.train_step, NonFiniteGuard) Ray-free on one
rank and on two, and a diverging `dlray train` run's end on a real local Ray."""

import math

import guard_worker
import pytest
import torch
import torch.multiprocessing as mp

from dlray.config import load_config
from dlray.data import build_data
from dlray.loop import build_model, make_optimizers
from dlray.models import FAMILIES
from dlray.step import EpochTotals, NonFiniteError, NonFiniteGuard, train_step
from dlray.strategies import STRATEGIES

from helpers import REPO
from single_process import CPU, one_rank


def test_an_absurd_learning_rate_stops_at_the_limit_naming_the_first_bad_step_on_the_last_good_weights():
    cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml", ["optim.lr=1e30", "train.max_nonfinite_steps=4", "precision=fp32", "model.dropout=0"])
    family = FAMILIES["cnn"]
    data = build_data(cfg.data, seed=cfg.train.seed)
    batch = list(torch.utils.data.default_collate([data.train[i] for i in range(32)]))
    torch.manual_seed(0)
    with one_rank():
        strategy = STRATEGIES["ddp"](cfg, CPU)
        model, _ = strategy.prepare(build_model(family, cfg, data.info), lambda module: make_optimizers(family, module, cfg))
        totals, guard = EpochTotals.zeros(1, CPU), NonFiniteGuard(cfg.train.max_nonfinite_steps)
        found = []
        with pytest.raises(NonFiniteError) as error:
            for step in range(1, 20):
                found.append(train_step(model, family, strategy, [(batch, None, None)], totals))
                if not found[-1]:
                    good = {k: v.clone() for k, v in model.named_parameters()}
                guard.check(step, found[-1])
    first_bad = found.index("loss and grad norm") + 1
    assert found[first_bad - 1:] == ["loss and grad norm"] * 4 and all(f == "" for f in found[:first_bad - 1]), found
    assert f"4 optimizer steps in a row were non-finite, from step {first_bad} on (non-finite: loss and grad norm)" in str(error.value)
    assert "diverged" in str(error.value)
    # The skipped steps moved no weight, and all are finite (BatchNorm's running statistics, updated by the forward, are not: a validation then fails).
    assert all(torch.equal(v, good[k]) for k, v in model.named_parameters())
    assert all(v.isfinite().all() for v in model.parameters())
    assert totals.nonfinite == 4 and totals.steps == len(found)
    assert math.isfinite(totals.train_metrics(family.optimizers)["train_loss"]), "the skipped steps' losses stay out of the sums"


def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    mp.spawn(guard_worker.run, args=(str(tmp_path),), nprocs=2)
    out = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    expected = ["", "", "loss and grad norm", "loss and grad norm", "", ""]
    assert out[0]["found"] == expected and out[1]["found"] == expected, out
    assert out[0]["nonfinite"] == out[1]["nonfinite"] == 2
    for rank in (0, 1):
        weights = out[rank]["weights"]
        assert torch.equal(weights[1], weights[3]), "the skipped steps moved the weights"
        assert not torch.equal(weights[3], weights[4]) and weights[5].isfinite().all()
    assert all(torch.equal(a, b) for a, b in zip(out[0]["weights"], out[1]["weights"])), "the ranks' weights parted"


def test_the_guard_counts_steps_in_a_row_only():
    guard = NonFiniteGuard(3)
    for step, found in enumerate(["loss", "grad norm", "", "grad norm", "loss", ""], 1):
        guard.check(step, found)  # never 3 in a row
    guard.check(7, "grad norm")
    guard.check(8, "loss")
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row were non-finite, from step 7 on \(non-finite: grad norm\)"):
        guard.check(9, "loss")


def test_a_diverging_run_ends_non_zero_within_its_first_epoch_with_one_message(ray_cluster, storage):
    from typer.testing import CliRunner

    from dlray.cli import app

    result = CliRunner().invoke(app, ["train", str(REPO / "jobs/debug/cnn_cpu.yaml"), f"run.storage_path={storage}", "run.name=diverged",
                                      "optim.lr=1e30", "train.max_nonfinite_steps=3", "train.num_epochs=1", "precision=fp32"])
    assert result.exit_code == 1, result.output
    failures = [line for line in result.output.splitlines() if "failed:" in line and "training diverged" in line]
    assert len(failures) == 1 and "ranks 0,1 failed: NonFiniteError" in failures[0], result.output
    assert "3 optimizer steps in a row were non-finite, from step 2 on (non-finite: loss and grad norm)" in failures[0]
    lines = [line for line in result.output.splitlines() if line.startswith("[dlray]") or line.startswith("        ")]
    assert sum("training diverged" in line for line in lines) == 1, lines
    assert any(line.startswith("[dlray] failed in") for line in lines), lines
    assert isinstance(result.exception, SystemExit), "the CLI ends on its summary, not a traceback"
