"""MLflow and W&B tracking (dlray/trackers.py): what a report logs, the checks before Ray starts, and a
tracked `dlray train` that loses a worker, then exported (conftest.py's killed_worker_run, which
test_train's killed-worker test shares), read back from MLflow's store and from W&B's offline run
files. (Sweeps: tests/test_tune.py's interrupted sweep is tracked.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlray import reports, trackers
from dlray.config import ConfigError, load_config

from helpers import REPO, SECRET, wandb_offline_runs

JOB = REPO / "jobs/debug/cnn_cpu.yaml"


def test_step_reports_log_under_step_and_epoch_reports_under_their_names():
    step = reports.step(epoch=1, global_step=57, step_in_epoch=17, steps_per_epoch=40, train_loss=0.8, lr=1e-3, samples_per_sec=512.0,
                        data_time_s=0.05, nonfinite_steps=1)
    epoch = reports.epoch({"epoch": 1, "global_step": 80, "train_loss": 0.7, "val_loss": 0.9, "val_accuracy": 0.6, "resumed_from_step": 0})
    final = reports.final({"epoch": 1, "global_step": 80, "best_val_loss": 0.9, "test_accuracy": 0.61})
    assert trackers.tracked_metrics(step) == {"step/train_loss": 0.8, "step/lr": 1e-3, "step/samples_per_sec": 512.0, "step/data_time_s": 0.05,
                                              "step/nonfinite_steps": 1.0}
    assert trackers.tracked_metrics(epoch) == {"epoch": 1.0, "train_loss": 0.7, "val_loss": 0.9, "val_accuracy": 0.6, "resumed_from_step": 0.0}
    assert trackers.tracked_metrics(final) == {"epoch": 1.0, "best_val_loss": 0.9, "test_accuracy": 0.61}
    assert trackers.tracked_metrics(reports.epoch({"epoch": 0, "global_step": 1, "diverged": True, "note": "x"})) == {"epoch": 0.0}


def test_params_are_the_flattened_job_config():
    cfg = load_config(JOB, ["optim.lr=0.003", "tracking.wandb.mode=offline"])
    params = trackers.flatten(cfg.model_dump(mode="json"))
    assert params["optim.lr"] == "0.003" and params["tracking.wandb.mode"] == "offline" and params["optim.betas"] == "[0.9, 0.999]"
    assert params["scaling.resources_per_worker"] == "None" and "tune" in params  # every key, set or not


def test_mlflow_store_is_the_config_then_the_environment_then_sqlite_beside_the_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(JOB, [f"run.storage_path={tmp_path}", "tracking.mlflow={}"])
    assert trackers.mlflow_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert trackers.mlflow_uri(cfg) == "http://127.0.0.1:5000"
    cfg.tracking.mlflow.tracking_uri = "databricks"
    assert trackers.mlflow_uri(cfg) == "databricks"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    on_s3 = load_config(JOB, ["run.storage_path=s3://bucket/runs", "tracking.mlflow={}"])
    with pytest.raises(trackers.TrackingError, match="set tracking.mlflow.tracking_uri or MLFLOW_TRACKING_URI"):
        trackers.check(on_s3)


def test_tracking_mistakes_are_named_before_ray_starts(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="tracking.mlflow.tracking_uri must not hold credentials"):
        load_config(JOB, ["tracking.mlflow.tracking_uri=https://ann:hunter2@mlflow.example.com"])
    with pytest.raises(ConfigError, match="tracking.wandb.mode: must be 'online', 'offline' or 'disabled'"):
        load_config(JOB, ["tracking.wandb.mode=local"])
    # W&B online with no key and no `wandb login`: the CLI says how to fix it, exit 2, before Ray starts.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    probe = ("import sys; from typer.testing import CliRunner; from dlray.cli import app; "
             "r = CliRunner().invoke(app, ['train', sys.argv[1], 'tracking.wandb.project=p']); import ray; print(r.exit_code, ray.is_initialized()); print(r.output)")
    out = subprocess.run([sys.executable, "-c", probe, str(JOB)], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.startswith("2 False") and "WANDB_API_KEY" in out and "tracking.wandb.mode=offline" in out, out


@pytest.mark.slow
def test_a_run_that_lost_a_worker_is_one_mlflow_run_with_params_metrics_and_artifacts(killed_worker_run):
    import mlflow
    from mlflow import MlflowClient

    history = reports.epochs(killed_worker_run["history"])
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert any(r["resumed_from_step"] > 0 for r in history), "the killed worker's group did not restart"
    mlflow.set_tracking_uri(killed_worker_run["uri"])
    try:
        runs = mlflow.search_runs(experiment_names=["tracked"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    # Params: the flattened job config.
    assert run.data.params == trackers.flatten(killed_worker_run["cfg"].model_dump(mode="json"))
    # Every epoch's metrics at its global_step, those before the restart and after it; the test metrics last.
    client = MlflowClient(tracking_uri=killed_worker_run["uri"])
    val_loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert val_loss == {r["global_step"]: pytest.approx(r["val_loss"]) for r in history}
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")) > 0
    assert run.data.metrics["test_accuracy"] == pytest.approx(killed_worker_run["history"][-1]["test_accuracy"])
    # The curves, and the exported artifact (`dlray export` of the run).
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "artifact")}
    assert {"curves.png", "artifact/dlray.json", "artifact/model.safetensors"} <= artifacts, artifacts
    curves = client.download_artifacts(run.info.run_id, "curves.png", str(killed_worker_run["storage"] / "download"))
    assert Path(curves).read_bytes() == (Path(killed_worker_run["run_dir"]) / "curves.png").read_bytes()


@pytest.mark.slow
def test_the_same_run_is_one_wandb_run_id_in_its_offline_files(killed_worker_run):
    runs = wandb_offline_runs(killed_worker_run["run_dir"])
    assert list(runs) == [trackers.wandb_run_id(killed_worker_run["run_dir"])]
    # The killed run (one W&B run through the restart), then its exports (the fixture's; test_train's, where it ran first).
    training, *exports = runs[next(iter(runs))]
    assert training["run"].display_name == "tracked" and training["run"].project == "dlray"
    logged = {h["global_step"]: h["val_loss"] for h in training["history"] if "val_loss" in h}
    assert logged == {r["global_step"]: pytest.approx(r["val_loss"]) for r in reports.epochs(killed_worker_run["history"])}
    assert any("test_accuracy" in h for h in training["history"])
    assert exports and all(exported["artifacts"] == ["tracked-model"] for exported in exports)
    assert (next(Path(killed_worker_run["run_dir"]).glob("wandb/offline-run-*/files/curves.png"))).stat().st_size > 10_000


@pytest.mark.slow
def test_credentials_from_the_environment_are_nowhere_in_the_run(killed_worker_run):
    assert SECRET not in killed_worker_run["output"]
    assert "[dlray] MLflow run" in killed_worker_run["output"] and "[dlray] W&B run" in killed_worker_run["output"]
    # Params, W&B's config, metrics.csv, checkpoints, the exported artifact, MLflow's database: no file holds it.
    leaks = [p for p in killed_worker_run["storage"].rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
