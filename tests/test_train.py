"""Ray Train end to end on a real local Ray: accuracy, strategies, failures, resume, early stopping."""

import math
import tempfile
from pathlib import Path

import pytest
import torch

from dlray import reports
from dlray.artifact import load_artifact
from dlray.checkpoint import checkpoint_name
from dlray.config import load_config
from dlray.data import build_data
from dlray.export import export
from dlray.runfiles import read_history
from dlray.train import fit, run_dir

from helpers import KILLED_RUN_TRAINING, REPO, wandb_offline_runs

pytestmark = pytest.mark.slow


def debug_job(storage, name, *overrides):
    return load_config(REPO / "jobs/debug/cnn_cpu.yaml", [f"run.storage_path={storage}", f"run.name={name}", *overrides])


def test_cnn_digits_reaches_97_percent_test_accuracy(digits_run):
    cfg, result, directory, _ = digits_run
    history = read_history(directory)
    final = history[-1]
    assert final["test_accuracy"] >= 0.97, final
    losses = [r["train_loss"] for r in reports.epochs(history)]
    assert losses[-1] < 0.5 * losses[0]
    # What the user looks at: curves, TensorBoard events, one checkpoint directory per kept epoch.
    assert (Path(directory) / "curves.png").stat().st_size > 10_000
    assert list((Path(directory) / "tensorboard").glob("events.out.tfevents.*"))
    assert len(result.best_checkpoints) <= cfg.run.checkpoint_num_to_keep


def assert_trained_and_exported(cfg, history, tmp_path):
    """A sharded run's validations: its loss fell, one optimizer step per gradient_accumulation_steps micro-batches
    of each rank's shard, the gradient norm before clipping reported, and its export far better than chance."""
    losses = [r["train_loss"] for r in history]
    assert losses[-1] < losses[0], losses
    train_size = len(build_data(cfg.data, seed=cfg.train.seed).train)
    micro_batches = math.ceil(math.ceil(train_size / cfg.scaling.num_workers) / cfg.train.micro_batch_size)
    assert history[0]["global_step"] == micro_batches // cfg.train.gradient_accumulation_steps
    # From FSDP's sharded gradients and from DeepSpeed's engine alike.
    assert all(0 < r["grad_norm"] < math.inf for r in history), [r["grad_norm"] for r in history]
    model, config = load_artifact(export(run_dir(cfg), tmp_path / "artifact"))
    assert config["metrics"]["val_accuracy"] > 0.3, "the best checkpoint is far better than chance (0.1)"


def test_fsdp_trains_on_ray_and_exports(ray_cluster, storage, tmp_path):
    """FSDP with SGD and the plateau schedule, in `precision: auto`: bf16 where the CPU has it natively, fp32 where it
    would be emulated ~20x slower (the strategy matrix, test_strategies.py, covers each strategy in bf16 on every CPU
    kind, without Ray). DeepSpeed on Ray: test_rerun_with_same_name_continues_the_run."""
    cfg = debug_job(storage, "fsdp", "strategy.name=fsdp", "optim.name=sgd", "optim.lr=0.1", "scheduler.name=plateau", "train.num_epochs=5")
    result = fit(cfg)
    assert result.error is None, result.error
    history = reports.epochs(read_history(run_dir(cfg)))
    assert_trained_and_exported(cfg, history, tmp_path)
    # When the first optimizer step ended (start-up latency, as `dlray bench cluster` reads it): in the first epoch only.
    assert ["first_step_unix_time" in r for r in history] == [True] + [False] * (len(history) - 1)


def test_workers_killed_mid_epoch_resume_at_the_next_batch_and_end_where_the_uninterrupted_run_ends(killed_worker_run, ray_cluster, storage, tmp_path):
    """The session's streamed run that lost a worker (conftest.py): checkpoints every 7 steps of 20-step epochs, a
    worker killed after one taken mid-epoch 1. The restarted group restores the weights, optimizer, schedule and RNG
    streams and takes the rest of the epoch's order (dlray.batches): the same validations and final weights as the
    same job uninterrupted. (In memory, the rest of an epoch's order is test_data's, and a restored checkpoint's
    replay of the steps is the strategy matrix's, test_strategies.py, without Ray.)"""
    reference = debug_job(storage, "uninterrupted", *KILLED_RUN_TRAINING, "data.streaming=true")
    assert fit(reference).error is None
    history, expected = killed_worker_run["epochs"], reports.epochs(read_history(run_dir(reference)))
    assert [r["global_step"] for r in history] == [r["global_step"] for r in expected] == [20, 40, 60, 80]
    assert 20 < history[1]["resumed_from_step"] < 40, "resumed mid-epoch 1, not at an epoch's end"
    for got, want in zip(history, expected):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4), (got, want)
    # The train loss of the validation after the restart covers the steps trained since; the others, whole epochs.
    for got, want in [(history[0], expected[0]), *zip(history[2:], expected[2:])]:
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4), (got, want)
    final = [load_artifact(export(Path(run, checkpoint_name(80)), tmp_path / f"artifact-{i}"))[0].state_dict()
             for i, run in enumerate((killed_worker_run["run_dir"], run_dir(reference)))]
    for key, value in final[1].items():
        assert torch.allclose(final[0][key], value, atol=1e-4), key
    assert all(r["skipped_rows"] == 0 for r in history)
    # A worker's own memory (what streaming keeps flat) is part of its resident memory, the object store's pages it read being the rest.
    assert all(0 < r["peak_private_mib"] <= r["peak_rss_mib"] for r in history), history
    # Streamed, the digits train as well as in memory (seeds 1-3 and 42 gave test accuracies of 0.91-0.99 on
    # either path, test losses 0.07-0.27; the same samples either way: test_data).
    final_record = read_history(run_dir(reference))[-1]
    assert final_record["test_accuracy"] >= 0.88 and final_record["test_loss"] < 0.35, final_record


def test_rerun_with_same_name_continues_the_run(ray_cluster, storage, tmp_path):
    """The run, and its MLflow and W&B runs (tests/test_tracking.py tracks a run through a worker kill), under DeepSpeed
    ZeRO-3 with its own gradient accumulation: each rank's partition of the weights and the optimizer goes on.
    The first run uploads its checkpoint asynchronously (the default), the second synchronously."""
    tracked = ["scheduler.name=constant", "tracking.mlflow={}", "tracking.wandb.mode=offline",
               "strategy.name=deepspeed", "strategy.zero_stage=3", "train.gradient_accumulation_steps=2"]
    first = debug_job(storage, "continued", "train.num_epochs=1", *tracked)
    assert first.run.checkpoint_upload == "async"
    assert fit(first).error is None
    second = debug_job(storage, "continued", "train.num_epochs=2", "run.checkpoint_upload=sync", *tracked)
    assert fit(second).error is None
    history = reports.epochs(read_history(run_dir(second)))
    assert [r["epoch"] for r in history] == [0, 1]
    # The second run found the first one's checkpoint committed, with both ranks' train states.
    assert history[1]["resumed_from_step"] == history[0]["global_step"]
    # Each rank staged its part in a local directory of its own, which Ray deleted once it was uploaded.
    assert not list(Path(tempfile.gettempdir()).glob("dlray-ckpt-continued-*"))

    from mlflow import MlflowClient

    from dlray.trackers import mlflow_uri, wandb_run_id

    client = MlflowClient(mlflow_uri(second))
    runs = client.search_runs([client.get_experiment_by_name("dlray").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")) == [r["global_step"] for r in history]
    wandb_runs = wandb_offline_runs(run_dir(second))
    assert list(wandb_runs) == [wandb_run_id(run_dir(second))] and len(wandb_runs[wandb_run_id(run_dir(second))]) == 2  # one id, started twice
    assert_trained_and_exported(second, history, tmp_path)


def test_early_stopping_stops_and_finishes_on_the_best_checkpoint(ray_cluster, storage):
    # A learning rate this small cannot improve val_loss meaningfully, so patience 1 stops at epoch 2,
    # and rising val_loss would be ignored in favour of the best epoch's weights.
    cfg = debug_job(storage, "early", "train.num_epochs=8", "train.early_stopping_patience=1", "optim.lr=1e-9", "optim.name=sgd", "optim.momentum=0", "model.dropout=0")
    assert fit(cfg).error is None
    history = read_history(run_dir(cfg))
    trained = reports.epochs(history)
    assert len(trained) < 8, "training did not stop early"
    best = min(trained, key=lambda r: r["val_loss"])
    assert history[-1]["best_val_loss"] == pytest.approx(best["val_loss"])
