"""What a user sees while dlray trains: the console renders the workers' reports (dlray.console), and
`dlray train --verbose` brings Ray's own lines back. The quiet default, end to end over `ray job
submit`, is checked in test_job_submit.py."""

import io
from types import SimpleNamespace

import pytest

from dlray import reports
from dlray.checkpoint import checkpoint_name
from dlray.config import load_config
from dlray.console import Console, ConsoleRelay
from dlray.reports import Kind
from dlray.runfiles import read_history, write_csv

from helpers import REPO

START = reports.start(node="a1b2c3d4e5f6 (10.0.0.1)", num_nodes=2, device="cuda:0", precision="fp32",
                      precision_why="precision auto: this CPU (AVX2) emulates bf16", precision_warning="", epoch=0, global_step=0,
                      steps_per_epoch=20, total_steps=60, num_epochs=3, tokens_per_step=0, resumed_from="")


def step(epoch, step_in_epoch, loss, **extra):
    return reports.step(epoch=epoch, global_step=epoch * 20 + step_in_epoch, step_in_epoch=step_in_epoch, steps_per_epoch=20,
                        lr=0.01, train_loss=loss, samples_per_sec=100.0, **extra)


def epoch(index, val_accuracy):
    return reports.epoch({"epoch": index, "global_step": 20 * (index + 1), "train_loss": 1.0 / (index + 1), "val_loss": 0.5,
                          "val_accuracy": val_accuracy, "lr": 0.01, "samples_per_sec": 200.0, "peak_rss_mib": 600.0})


def console(overrides=(), tty=False):
    cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml", ["train.num_epochs=3", "train.metric=val_accuracy", "train.mode=max", *overrides])
    stream = io.StringIO()
    stream.isatty = lambda: tty
    return Console(cfg, stream=stream), stream


def finished(kept=((40, 0.9),), error=None):
    """The parts of ray.train.Result the summary reads: the kept checkpoints, (step, val_accuracy) each."""
    return SimpleNamespace(error=error, best_checkpoints=[(SimpleNamespace(path=f"/runs/r/{checkpoint_name(step)}"), {"global_step": step, "val_accuracy": accuracy})
                                                          for step, accuracy in kept])


def test_reports_say_their_kind_and_metrics_csv_rows_read_back_as_theirs(tmp_path):
    final = reports.final({"epoch": 2, "global_step": 60, "best_val_loss": 0.1, "test_loss": 0.2})
    assert [reports.kind(r) for r in (START, step(0, 5, 1.0), epoch(0, 0.5), final)] == [Kind.START, Kind.STEP, Kind.EPOCH, Kind.FINAL]
    # metrics.csv keeps its columns (no kind column), and its rows read back as the reports written
    history = [epoch(0, 0.5), final, epoch(1, 0.6)]  # a run resumed after it finished: its first final row stays
    write_csv(history, tmp_path / "metrics.csv")
    assert "report" not in (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert [reports.kind(r) for r in read_history(tmp_path)] == [Kind.EPOCH, Kind.FINAL, Kind.EPOCH]
    assert reports.epochs(read_history(tmp_path)) == [epoch(0, 0.5), epoch(1, 0.6)]


def test_plain_lines_show_where_it_runs_the_steps_the_epochs_and_a_summary():
    view, out = console(["run.progress_interval_s=0"])
    second = dict(START, node="0f0e0d0c0b0a (10.0.0.2)")
    view.handle("report", [START, START, second, second])
    view.handle("report", [step(0, 5, 2.0), step(0, 5, 1.0), step(0, 5, 1.0), step(0, 5, 2.0)])  # loss: the ranks' mean; throughput: their sum
    view.handle("report", [epoch(0, 0.6)] * 4)
    view.handle("report", [epoch(1, 0.9)] * 4)
    view.handle("report", [epoch(2, 0.8)] * 4)
    view.handle("report", [reports.final({"epoch": 2, "global_step": 60, "best_val_accuracy": 0.9, "bad_validations": 1, "test_accuracy": 0.88, "test_loss": 0.3})] * 4)
    view.summary(finished(), "/runs/r")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[dlray] 4 workers on 2 node(s), cuda: ranks 0,1 on a1b2c3d4e5f6 (10.0.0.1); ranks 2,3 on 0f0e0d0c0b0a (10.0.0.2)"
    assert lines[1] == "[dlray] precision fp32: precision auto: this CPU (AVX2) emulates bf16"
    assert lines[2].startswith("[dlray] epoch 1/3 step 5/60 | loss 1.5  lr 0.01  400 samples/s  eta ")
    assert lines[3] == "[dlray] epoch 1/3 step 20/60 | train_loss 1  val_accuracy 0.6  val_loss 0.5  lr 0.01  200 samples/s"  # no peak_rss_mib: metrics.csv has it
    assert lines[6].startswith("[dlray] finished in ") and lines[6].endswith(": best val_accuracy 0.9 at epoch 2 step 40 (3 validations)")
    assert lines[7].split() == ["test", "accuracy", "0.88", "loss", "0.3"]
    assert "tensorboard --logdir /runs/r/tensorboard" in lines[8] and lines[9] == "        best checkpoint /runs/r/checkpoint_step00000040"
    assert lines[10] == f"        next: dlray export /runs/r out/{view.cfg.run.name}"


def test_plain_step_lines_come_at_most_every_progress_interval():
    view, out = console(["run.progress_interval_s=3600"])
    view.handle("report", [START])
    for i in range(1, 20):
        view.handle("report", [step(0, i, 1.0)])
    assert "step 5/60" not in out.getvalue() and out.getvalue().count("\n") == 2  # where it runs, and the precision


def test_a_restart_and_a_failure_are_told():
    view, out = console()
    view.handle("report", [START])
    relayed = []
    ConsoleRelay(SimpleNamespace(put=relayed.append)).after_exception(None, {1: RuntimeError("Traceback ...\n  File ...\nworker died")})
    view.handle(*relayed[0])
    view.handle("report", [dict(START, epoch=1, global_step=20, resumed_from="/runs/r/checkpoint_step00000020", precision_warning="precision bf16 on this CPU is emulated")])
    text = out.getvalue()
    assert "[dlray] rank 1 failed: RuntimeError: worker died" in text
    assert "[dlray] restarted: epoch 2, step 20 of /runs/r/checkpoint_step00000020" in text
    assert "[dlray] warning: precision bf16 on this CPU is emulated" in text


def test_early_stopping_is_named_in_the_summary():
    view, out = console(["train.early_stopping_patience=2"])
    for index, accuracy in enumerate([0.9, 0.8, 0.7]):
        view.handle("report", [epoch(index, accuracy)])
    view.handle("report", [reports.final({"epoch": 2, "global_step": 60, "best_val_accuracy": 0.9, "bad_validations": 2})])
    assert view.summary(finished(), "/runs/r").splitlines()[0].endswith(
        "best val_accuracy 0.9 at epoch 1 step 20 (3 validations) (stopped early: no better val_accuracy for 2 validations)")


def test_of_equally_scored_validations_the_summary_names_the_later_and_its_checkpoint():
    """Ray Train keeps the later of equally scored checkpoints; the summary's best validation is that one's."""
    view, out = console()
    for index, accuracy in enumerate([0.9, 0.9, 0.7]):
        view.handle("report", [epoch(index, accuracy)])
    lines = view.summary(finished(kept=((20, 0.9), (40, 0.9), (60, 0.7))), "/runs/r").splitlines()
    assert lines[0].endswith("best val_accuracy 0.9 at epoch 2 step 40 (3 validations)") and lines[2] == "        best checkpoint /runs/r/checkpoint_step00000040"


def test_a_step_budget_shows_steps_of_the_budget_tokens_seen_validations_and_checkpoints_within_the_epoch():
    view, out = console(["run.progress_interval_s=0"])
    view.handle("report", [dict(START, steps_per_epoch=50_000, total_steps=10_000, num_epochs=1, tokens_per_step=4096)])
    view.handle("report", [step(0, 1200, 2.0, tokens_seen=4_915_200)])
    view.handle("report", [reports.checkpoint(epoch=0, global_step=1500, step_in_epoch=1500, reason="every 500 steps", metric="val_loss", mode="min")])
    view.handle("report", [reports.epoch({"epoch": 0, "global_step": 2000, "step_in_epoch": 2000, "train_loss": 1.5, "val_loss": 1.25,
                                          "samples_per_sec": 20.0, "tokens_per_sec": 81920.0, "tokens_seen": 8_192_000})])
    lines = out.getvalue().splitlines()
    assert lines[2].startswith("[dlray] epoch 1/1 step 1,200/10,000 | loss 2  lr 0.01  100 samples/s  4,915,200 tokens seen  eta ")
    assert lines[3] == "[dlray] checkpoint at step 1,500 (every 500 steps)"
    assert lines[4] == "[dlray] epoch 1/1 step 2,000/10,000 | train_loss 1.5  val_loss 1.25  81,920 tokens/s  8,192,000 tokens seen"


def test_a_terminal_gets_a_progress_bar():
    view, out = console(tty=True)
    view.open()
    view.handle("report", [START])
    view.handle("report", [step(0, 5, 1.25, tokens_per_sec=4096.0)])
    view._progress.refresh()
    view.close()
    text = out.getvalue()
    assert "epoch 1/3" in text and "5/60" in text and "loss 1.25" in text and "4,096 tokens/s" in text and "eta" in text


@pytest.mark.slow
def test_verbose_brings_back_rays_own_lines(killed_worker_run):
    """`dlray train --verbose` as a user runs it (the session's tracked run that loses a worker, conftest.py): Ray
    Train's per-report lines are back, with dlray's own."""
    output = killed_worker_run["output"]
    assert "TrainingReport(" in output
    assert "[dlray] finished in " in output and "next: dlray export" in output
