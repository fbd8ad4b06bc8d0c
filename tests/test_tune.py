"""Ray Tune sweeps over dlray training runs, on the session's local Ray: ASHA, PBT, failures,
resume, and the hand-off of the best trial to `dlray train`, `dlray export` and serving."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from dlray.artifact import read_artifact_config
from dlray.checkpoint import read_meta
from dlray.config import ConfigError, config_from_dict, load_config
from dlray.data import build_data
from dlray.export import resolve_checkpoint
from dlray.png import png_bytes
from dlray.runfiles import read_history

from helpers import REPO, wait_for, wandb_offline_runs

SWEEP_JOB = REPO / "jobs/sweep_cnn_asha.yaml"


def sweep_config(storage, name, tune, *overrides):
    """jobs/sweep_cnn_asha.yaml with another `tune:` section; 1-worker trials, so two run at once. No hang
    watchdog (tests/test_watchdog.py tests it): one actor process fewer to start for each trial's Train run."""
    job = yaml.safe_load(SWEEP_JOB.read_text())
    job["tune"] = tune
    path = storage / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return load_config(path, [f"run.storage_path={storage}", f"run.name={name}", "scaling.num_workers=1", "run.hang_timeout_s=null", *overrides])


def results(sweep_dir):
    import csv

    with open(Path(sweep_dir) / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_an_unknown_search_space_path_fails_before_anything_starts(tmp_path):
    job = yaml.safe_load(SWEEP_JOB.read_text())
    job["tune"]["search_space"]["optim.learning_rate"] = {"loguniform": [1e-4, 1e-1]}
    with pytest.raises(ConfigError, match=r"tune\.search_space\.optim\.learning_rate: unknown key 'optim\.learning_rate'"):
        config_from_dict(job)
    # And through the CLI: exit 2 with the path named, before Ray is even imported.
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(job))
    probe = ("import sys; from typer.testing import CliRunner; from dlray.cli import app; "
             "r = CliRunner().invoke(app, ['tune', sys.argv[1]]); print(r.exit_code, 'ray' in sys.modules); print(r.output)")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("2 False") and "optim.learning_rate" in out, out


@pytest.mark.parametrize(
    "tune, message",
    [
        ({"search_space": {"optim.lr": {"loguniform": [1e-3, 1e-1]}}, "search_alg": {"name": "grid"}}, "needs choice or grid entries"),
        ({"search_space": {"optim.lr": {"choice": [0.1]}}, "scheduler": {"name": "pbt"}, "search_alg": {"name": "optuna"}}, "needs tune.search_alg.name 'random'"),
        ({"search_space": {"optim.momentum": {"uniform": [0.5, 0.9], "when": {"optim.name": "sgd"}}}}, "must be a choice or grid entry"),
        ({"search_space": {"optim.lr": {"loguniform": [0.0, 0.1]}}}, "low must be positive"),
        ({"search_space": {"run.name": {"choice": ["a"]}}}, "cannot be searched"),
        ({"search_space": {"optim.name": {"choice": ["adamw", "lion"]}}}, "optim.name: must be"),
    ],
)
def test_search_space_mistakes_are_named(tune, message):
    job = yaml.safe_load(SWEEP_JOB.read_text()) | {"tune": tune}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(job)


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, tmp_path_factory):
    """3 trials, ASHA, two at a time: a good learning rate, one that diverges to NaN, one far too small.
    The grid's order makes the small one start only when the diverging one has failed (a few steps
    into its first epoch), so it reaches ASHA's first rung a whole Train run's start (20 s or more)
    after the good one has recorded its first epoch there, and is stopped at it."""
    from dlray.tune import run_sweep

    storage = tmp_path_factory.mktemp("sweeps")
    tune = {
        "num_samples": 1,
        "max_concurrent_trials": 2,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "search_alg": {"name": "grid"},
        "search_space": {"optim.lr": {"grid": [0.03, 1.0e30, 3.0e-6]}},
    }
    cfg = sweep_config(storage, "asha", tune, "train.num_epochs=4", "optim.name=adamw")
    grid = run_sweep(cfg)
    return cfg, grid, storage / "asha"


@pytest.mark.slow
def test_asha_stops_bad_trials_early_and_finds_a_better_one(asha_sweep):
    cfg, grid, sweep = asha_sweep
    rows = {float(r["optim.lr"]): r for r in results(sweep)}
    assert len(rows) == 3
    # Before its last epoch: 4 epochs is also ASHA's last rung (max_t), where a trial that arrives after a better one is
    # stopped too, with all its validations (seen once: lr 0.03 at 0.922 after lr 0.01 at 0.927).
    stopped = [r for r in rows.values() if r["status"].startswith("stopped early") and int(r["epochs"]) < 4]
    assert stopped, rows
    assert rows[3.0e-6]["status"].startswith("stopped early"), rows[3.0e-6]
    scored = [float(r["val_accuracy"]) for r in rows.values() if r["val_accuracy"]]
    best = results(sweep)[0]
    assert float(best["optim.lr"]) == 0.03 and rows[0.03]["status"] == "completed" and float(best["val_accuracy"]) > min(scored) + 0.3, rows
    # Every epoch reached Tune: the best trial's Tune log has one row per epoch plus the final one.
    best_result = next(r for r in grid if r.config["optim.lr"] == float(best["optim.lr"]))
    assert list(best_result.metrics_dataframe["epoch"])[:4] == [0, 1, 2, 3]
    assert (sweep / "trials.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_diverging_trial_is_marked_failed_and_the_sweep_goes_on(asha_sweep):
    _, _, sweep = asha_sweep
    rows = {float(r["optim.lr"]): r for r in results(sweep)}
    assert rows[1.0e30]["status"].startswith("failed") and "diverged" in rows[1.0e30]["status"], rows[1.0e30]
    assert any(r["status"] == "completed" for r in rows.values())


@pytest.mark.slow
def test_best_config_is_a_job_file_that_trains(asha_sweep, storage):
    """The file `dlray train` runs is, in every key but the run's name and place, the config the best trial
    trained with (its checkpoints' meta.json): that Train run is the proof that it trains, without another."""
    cfg, _, sweep = asha_sweep
    best_file = sweep / "best_config.yaml"
    assert best_file.read_text().startswith(f"# dlray train {best_file}")
    best = load_config(best_file, [f"run.storage_path={storage}"])
    assert best.tune is None and best.optim.lr == float(results(sweep)[0]["optim.lr"])
    trained = read_meta(resolve_checkpoint(sweep))["config"]
    assert best.precision == cfg.precision  # (the trial's meta holds what `precision: auto` chose)

    def job(config, run_keys=("name", "storage_path")):
        return {**config, "precision": None, "run": {k: v for k, v in config["run"].items() if k not in run_keys}}

    assert job(best.model_dump(mode="json")) == job(trained), (best.model_dump(mode="json"), trained)
    assert best.run.name.startswith("best_config-")  # a fresh run per `dlray train`, not the trial's


def test_a_sweeps_export_skips_a_checkpoint_written_after_its_trial_was_stopped(tmp_path):
    """ASHA stops a trial after a report; its workers can still write the next epoch's checkpoint,
    which Tune and results.csv never saw (seen once: lr 0.03's unreported 0.94 beat the listed best 0.93)."""
    def trial(name, steps_reported, checkpoints):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text("epoch,global_step,train_loss,val_accuracy\n" + "".join(f"{i},{s},1.0,0.5\n" for i, s in enumerate(steps_reported)))
        for step, accuracy in checkpoints:
            (run / f"checkpoint_{step}").mkdir()
            (run / f"checkpoint_{step}" / "meta.json").write_text(json.dumps({
                "config": {"train": {"metric": "val_accuracy", "mode": "max"}}, "metrics": {"val_accuracy": accuracy}, "progress": {"global_step": step}}))
        return run

    stopped = trial("stopped", [40, 80], [(80, 0.66), (120, 0.94)])
    best = trial("best", [40, 80, 120], [(80, 0.90), (120, 0.93)])
    assert resolve_checkpoint(tmp_path) == best / "checkpoint_120"
    assert resolve_checkpoint(stopped) == stopped / "checkpoint_80"


@pytest.mark.slow
def test_export_of_the_sweep_serves_the_best_trials_best_checkpoint(asha_sweep, serve_artifact, tmp_path):
    from dlray.export import export

    cfg, _, sweep = asha_sweep
    artifact = export(sweep, tmp_path / "best")
    source = read_meta(read_artifact_config(artifact)["source_checkpoint"])
    assert source["config"]["optim"]["lr"] == float(results(sweep)[0]["optim.lr"])
    base = serve_artifact(artifact)
    test = build_data(cfg.data, seed=cfg.train.seed).test
    correct = 0
    for i in range(40):
        image, label = test[i]
        answer = httpx.post(f"{base}/v1/classify", content=png_bytes(image * 2 - 1), headers={"content-type": "image/png"}, timeout=60)  # png_bytes takes [-1, 1]
        assert answer.status_code == 200, answer.text
        correct += answer.json()["label_index"] == int(label)
    assert correct / 40 > 0.3


@pytest.mark.slow
def test_pbt_continues_a_trial_from_another_trials_checkpoint(ray_cluster, storage):
    """Synchronous PBT makes the exploit certain: at epoch 3 each trial waits (paused) until both have
    reported, and then, with two trials and quantile 0.5, the lower one always copies the upper one and
    trains epoch 4 from its checkpoint. One perturbation only (the next would be at Tune iteration 6, past
    the final report at 5): each costs a pause and a restart of a Train run."""
    from dlray.tune import run_sweep

    tune = {
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "scheduler": {"name": "pbt", "perturbation_interval": 3, "quantile_fraction": 0.5, "synch": True},
        "search_space": {"optim.lr": {"choice": [0.03, 1.0e-5]}},
    }
    cfg = sweep_config(storage, "pbt", tune, "train.num_epochs=4", "tune.search_alg.seed=3")
    run_sweep(cfg)
    exploited = []
    for run in (storage / "pbt" / "runs").iterdir():
        checkpoints = sorted(run.glob("checkpoint_step*"))  # named by step: they sort in the order they were taken
        start = checkpoints and read_meta(checkpoints[0])["config"]["run"]["resume_from_checkpoint"]
        if start and run.name.split("-")[0] not in start:  # started from another trial's checkpoint
            exploited.append((run, read_history(run)))
    assert exploited, "no PBT exploit: every Train run started from scratch or from its own trial"
    run, history = exploited[0]
    assert history[0]["resumed_from_step"] > 0 and history[0]["epoch"] > 0, history[0]


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, storage):
    """`dlray tune` in a subprocess (joined to this session's Ray), interrupted with Ctrl-C once
    the first of two trials has finished (the second has started), then `dlray tune <same job file> --resume`:
    the finished trial is left alone, the interrupted one continues under its name."""
    from dlray.cli import app

    tune = {"num_samples": 1, "max_concurrent_trials": 1, "scheduler": {"name": "fifo"}, "search_alg": {"name": "grid"},
            "search_space": {"optim.lr": {"grid": [0.03, 0.01]}}}
    job = sweep_config(storage, "resumable", tune, "train.num_epochs=2").model_dump(mode="json")
    job["run"]["name"] = None  # named per invocation, as users' job files are: --resume finds the newest
    job["tracking"] = {"mlflow": {}, "wandb": {"mode": "offline"}}  # each trial a run of the sweep's, once, across the resume
    job_file = storage / "resumable.yaml"
    job_file.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    process = subprocess.Popen([sys.executable, "-m", "dlray.cli", "tune", str(job_file)], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(list(storage.glob("resumable-*/runs/*"))) >= 2, 300, "the sweep's second trial started (when its first ended)", 0.5)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    sweep, = storage.glob("resumable-*")
    runs = sweep / "runs"
    assert "sweep interrupted with 1 of 2 trials ended" in output, output[-3000:]
    assert not (sweep / "results.csv").exists()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/metrics.csv") if "best_val_accuracy" in p.read_text()}
    assert len(finished) == 1, output[-3000:]

    resumed = CliRunner().invoke(app, ["tune", str(job_file), "--resume"])
    assert resumed.exit_code == 0 and f"resuming sweep {sweep}" in resumed.output, resumed.output[-3000:]
    assert sorted(r["status"] for r in results(sweep)) == ["completed"] * 2
    assert len(list(runs.iterdir())) == 2  # no trial ran twice under a new name
    assert {p: (runs / p / "metrics.csv").stat().st_mtime_ns for p in finished} == finished  # the finished trial was left alone

    # Tracked: one MLflow run for the sweep with the 2 trials' runs under it (the interrupted one continued,
    # not doubled), and the trials in one W&B group.
    from mlflow import MlflowClient

    from dlray.trackers import RUN_DIR_TAG, wandb_run_id

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    experiment = client.get_experiment_by_name("dlray").experiment_id
    parent, = client.search_runs([experiment], filter_string=f"tags.`{RUN_DIR_TAG}` = '{sweep}'")
    assert parent.info.run_name == sweep.name and parent.info.status == "FINISHED"
    assert "results.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    trials = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in trials) == sorted(p.name for p in runs.iterdir())
    assert {r.info.status for r in trials} == {"FINISHED"}  # the interrupted trial's too, once resumed
    assert len(client.search_runs([experiment])) == 3
    for trial in runs.iterdir():
        starts = wandb_offline_runs(trial)
        assert list(starts) == [wandb_run_id(str(trial))]
        assert {s["run"].run_group for s in starts[wandb_run_id(str(trial))]} == {sweep.name}


def test_optuna_samples_conditional_entries_only_when_active_and_repeats_with_its_seed():
    from dlray.tune import search_space, trial_values

    job = yaml.safe_load(SWEEP_JOB.read_text())
    job["tune"]["search_alg"] = {"name": "optuna", "seed": 7}
    cfg = config_from_dict(job)

    def suggestions():
        _, searcher = search_space(cfg, max_concurrent=64)
        searcher.set_search_properties(cfg.train.metric, cfg.train.mode, {})
        return [searcher.suggest(f"t{i}") for i in range(12)]

    first = suggestions()
    assert first == suggestions()  # same seed, same trials
    for config in first:
        assert ("optim.momentum" in config) == (config["optim.name"] == "sgd"), config
        assert 1e-4 <= config["optim.lr"] <= 0.3 and config["train.micro_batch_size"] in (16, 32, 64)
        assert trial_values(cfg.tune, config) == config
    assert {c["optim.name"] for c in first} == {"adamw", "sgd"}


@pytest.mark.parametrize("name, ray_class", [("fifo", "FIFOScheduler"), ("asha", "AsyncHyperBandScheduler"), ("hyperband", "HyperBandScheduler"),
                                             ("median", "MedianStoppingRule"), ("pbt", "PopulationBasedTraining")])
def test_each_scheduler_name_builds_rays_scheduler(name, ray_class):
    from dlray.tune import trial_scheduler

    job = yaml.safe_load(SWEEP_JOB.read_text())
    job["tune"]["scheduler"] = {"name": name}
    if name == "pbt":
        job["tune"]["search_space"] = {"optim.lr": {"loguniform": [1e-4, 1e-1]}}
        job["tune"]["scheduler"]["synch"] = True
    scheduler = trial_scheduler(config_from_dict(job))
    assert type(scheduler).__name__ == ray_class
    if name == "pbt":  # perturbation_interval counts epochs (Tune iterations), not Ray's default of seconds
        assert (scheduler._time_attr, scheduler._synch) == ("training_iteration", True)


def test_a_restored_optimizer_takes_the_new_configs_hyperparameters_and_keeps_its_schedule():
    """What a PBT exploit relies on: the donor's optimizer and schedule state, the trial's own lr / weight decay."""
    import torch

    from dlray.config import OptimConfig, SchedulerConfig
    from dlray.optim import apply_hyperparameters, build_optimizer, build_scheduler

    def make(optim_cfg):
        params = [torch.nn.Parameter(torch.ones(3))]
        optimizer = build_optimizer(optim_cfg, params)
        return optimizer, build_scheduler(SchedulerConfig(name="cosine"), optimizer, steps_per_epoch=10, total=20, mode="max")

    donor_cfg, trial_cfg = OptimConfig(name="adamw", lr=0.1), OptimConfig(name="adamw", lr=0.02, weight_decay=0.01)
    donor, donor_schedule = make(donor_cfg)
    for _ in range(5):  # a quarter of the way down the cosine
        donor.step()
        donor_schedule.step()
    optimizer, schedule = make(trial_cfg)
    optimizer.load_state_dict(donor.state_dict())
    schedule.load_state_dict(donor_schedule.state_dict())
    apply_hyperparameters(optimizer, schedule, trial_cfg, saved_base_lr=donor_cfg.lr)

    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(donor.param_groups[0]["lr"] * 0.2) and group["weight_decay"] == 0.01
    schedule.step()
    donor_schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(donor.param_groups[0]["lr"] * 0.2)  # the schedule goes on, rescaled
