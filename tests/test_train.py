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

from helpers import KILLED_AFTER_STEP, KILLED_RUN_TRAINING, REPO, fit_losing_a_worker, wandb_offline_runs

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


SHARDED = {
    # FSDP with SGD and the plateau schedule; ZeRO-3 with DeepSpeed's own gradient accumulation. In `precision: auto`:
    # bf16 where the CPU has it natively, fp32 where it would be emulated ~20x slower (the strategy matrix,
    # test_strategies.py, covers each strategy in bf16 on every CPU kind, without Ray).
    "fsdp-sgd-plateau": ["strategy.name=fsdp", "optim.name=sgd", "optim.lr=0.1", "scheduler.name=plateau", "train.num_epochs=5"],
    "zero3-accumulate2": ["strategy.name=deepspeed", "strategy.zero_stage=3", "train.gradient_accumulation_steps=2"],
}


@pytest.mark.parametrize("overrides", SHARDED.values(), ids=SHARDED.keys())
def test_sharded_strategies_train_on_ray_and_export(ray_cluster, storage, overrides, tmp_path):
    cfg = debug_job(storage, "sharded", *overrides)
    result = fit(cfg)
    assert result.error is None, result.error
    history = reports.epochs(read_history(run_dir(cfg)))
    losses = [r["train_loss"] for r in history]
    assert losses[-1] < losses[0], losses
    # One optimizer step per gradient_accumulation_steps micro-batches of each rank's shard.
    train_size = len(build_data(cfg.data, seed=cfg.train.seed).train)
    micro_batches = math.ceil(math.ceil(train_size / cfg.scaling.num_workers) / cfg.train.micro_batch_size)
    assert history[0]["global_step"] == micro_batches // cfg.train.gradient_accumulation_steps
    # The gradient norm before clipping, from FSDP's sharded gradients and from DeepSpeed's engine alike.
    assert all(0 < r["grad_norm"] < math.inf for r in history), [r["grad_norm"] for r in history]
    # When the first optimizer step ended (start-up latency, as `dlray bench cluster` reads it): in the first epoch only.
    assert ["first_step_unix_time" in r for r in history] == [True] + [False] * (len(history) - 1)
    model, config = load_artifact(export(run_dir(cfg), tmp_path / "artifact"))
    assert config["metrics"]["val_accuracy"] > 0.3, "the best checkpoint is far better than chance (0.1)"


def test_workers_killed_mid_epoch_resume_at_the_next_batch_and_end_where_the_uninterrupted_runs_end(killed_worker_run, ray_cluster, storage, tmp_path):
    """Streamed (the session's run that lost a worker, conftest.py) and in memory: checkpoints every 7 steps of
    20-step epochs, a worker killed after one taken mid-epoch 1. The restarted group restores the weights,
    optimizer, schedule and RNG streams and takes the rest of the epoch's order (dlray.batches): the same
    validations and final weights as the same job uninterrupted. And streamed trains as well as in memory."""
    in_memory = debug_job(storage, "in-memory", *KILLED_RUN_TRAINING)
    reference = debug_job(storage, "uninterrupted", *KILLED_RUN_TRAINING, "data.streaming=true")
    assert fit(in_memory).error is None and fit(reference).error is None
    killed_in_memory = debug_job(storage, "killed-in-memory", *KILLED_RUN_TRAINING, "run.max_failures=1")
    killed = {"streamed": (killed_worker_run["epochs"], Path(killed_worker_run["run_dir"]), reference),
              "in memory": (fit_losing_a_worker(killed_in_memory, step=KILLED_AFTER_STEP), Path(run_dir(killed_in_memory)), in_memory)}
    for mode, (history, directory, uninterrupted) in killed.items():
        expected = reports.epochs(read_history(run_dir(uninterrupted)))
        assert [r["global_step"] for r in history] == [r["global_step"] for r in expected] == [20, 40, 60, 80], mode
        assert 20 < history[1]["resumed_from_step"] < 40, f"{mode}: resumed mid-epoch 1, not at an epoch's end"
        for got, want in zip(history, expected):
            assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4), (mode, got, want)
        # The train loss of the validation after the restart covers the steps trained since; the others, whole epochs.
        for got, want in [(history[0], expected[0]), *zip(history[2:], expected[2:])]:
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4), (mode, got, want)
        final = [load_artifact(export(Path(run, checkpoint_name(80)), tmp_path / f"{mode}-{i}"))[0].state_dict()
                 for i, run in enumerate((directory, Path(run_dir(uninterrupted))))]
        for key, value in final[1].items():
            assert torch.allclose(final[0][key], value, atol=1e-4), (mode, key)
    history = killed["streamed"][0]
    assert all(r["skipped_rows"] == 0 for r in history)
    # A worker's own memory (what streaming keeps flat) is part of its resident memory, the object store's pages it read being the rest.
    assert all(0 < r["peak_private_mib"] <= r["peak_rss_mib"] for r in history), history
    # The same images in another order: the same quality, within what the seed alone changes (seeds 1-3
    # and 42 gave test accuracies of 0.91-0.99 on either path, test losses 0.07-0.27).
    streamed, loaded = read_history(run_dir(reference))[-1], read_history(run_dir(in_memory))[-1]
    assert streamed["test_accuracy"] == pytest.approx(loaded["test_accuracy"], abs=0.08), (streamed, loaded)
    assert max(streamed["test_loss"], loaded["test_loss"]) < 0.35, (streamed, loaded)


def test_rerun_with_same_name_continues_the_run(ray_cluster, storage):
    """The run, and its MLflow and W&B runs (tests/test_tracking.py tracks a run through a worker kill).
    The first run uploads its checkpoint asynchronously (the default), the second synchronously."""
    tracked = ["scheduler.name=constant", "tracking.mlflow={}", "tracking.wandb.mode=offline"]
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
