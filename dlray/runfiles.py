"""What a run leaves behind: metrics.csv, TensorBoard event files,
a loss/metrics curve PNG and, for generative families, samples/epoch_NNNN.png grids in the run directory.

`MetricsLogger` is a Ray Train `UserCallback`: it runs in the Train controller, which receives
every `ray.train.report`, so workers never write run files themselves.

    tensorboard --logdir ~/dlray_runs/<run name>/tensorboard
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ray.train import UserCallback

from dlray import reports
from dlray.reports import Kind


class MetricsLogger(UserCallback):
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.history: list[dict] | None = None
        self._writer = None

    def after_report(self, run_context, metrics, checkpoint):
        record = metrics[0]  # rank 0's: the loop all-reduces before reporting, so ranks agree
        kind = reports.kind(record)
        if kind in (Kind.START, Kind.STEP, Kind.CHECKPOINT):  # progress, for the console (and trackers' step metrics)
            return
        if checkpoint is not None:
            self._copy_samples(checkpoint, record["epoch"])
        if self.history is None:  # a resumed run continues the file it left behind
            self.history = read_history(self.run_dir)
        if kind is Kind.EPOCH:  # validations replayed after a restart replace their lost originals
            self.history = [r for r in self.history if r.get("global_step", -1) < record["global_step"]]
        self.history.append(record)
        run_dir = Path(self.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_csv(self.history, run_dir / "metrics.csv")
        self._tensorboard(reports.metrics(record))
        plot_curves(self.history, run_dir / "curves.png")

    def _copy_samples(self, checkpoint, epoch: int):
        """The epoch's sample grid, kept in the run directory after its checkpoint is pruned."""
        from dlray.checkpoint import SAMPLES_FILE

        with checkpoint.as_directory() as directory:
            grid = Path(directory, SAMPLES_FILE)
            if grid.exists():
                target = Path(self.run_dir, "samples", f"epoch_{epoch:04d}.png")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(grid.read_bytes())

    def _tensorboard(self, record: dict):
        from tensorboardX import SummaryWriter

        if self._writer is None:
            self._writer = SummaryWriter(str(Path(self.run_dir) / "tensorboard"))
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "global_step"):
                self._writer.add_scalar(key, value, record.get("global_step", 0))
        self._writer.flush()


def write_csv(history: list[dict], path: Path) -> None:
    """The run's epoch and final reports, one row each, their metrics as columns (no kind column: see reports.from_row)."""
    rows = [reports.metrics(record) for record in history]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def read_history(run_dir: str | Path) -> list[dict]:
    """The run's epoch and final reports, as written to metrics.csv (numbers parsed back; reports.kind reads their kind)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [reports.from_row({k: float(v) if k not in ("epoch", "global_step") else int(float(v)) for k, v in row.items() if v != ""})
                for row in csv.DictReader(f)]


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(k for r in history for k in r if k.split("_")[0] in ("train", "val", "test")))
    losses = [k for k in keys if k.endswith("loss")]
    scores = [k for k in keys if not k.endswith("loss")]  # accuracy, a VAE's KL term, ...
    panels = [losses, scores] if scores else [losses]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, keys in zip(axes[0], panels):
        for key in keys:
            points = [(r["global_step"], r[key]) for r in history if key in r and math.isfinite(r[key])]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, "o" if key.startswith("test") else "-o", label=key, markersize=3 if not key.startswith("test") else 7)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
