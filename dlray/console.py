"""What a user watches while dlray trains: what starts where, a live progress bar over the run's step
budget, a line per validation (each epoch's end, every train.val_every_n_steps) and a closing summary,
rendered in one place, the driver.

    console = Console(cfg)                      # dlray train does this; --verbose keeps Ray's own INFO lines
    with console:
        result = fit(cfg, console=console)
    console.summary(result)

The workers report their progress through Ray Train (`ray.train.report`; dlray.loop), the Train
controller's `ConsoleRelay` callback puts every report on a Ray queue, and a thread here renders
it: a `rich` progress bar when stdout is a terminal, plain lines every `run.progress_interval_s`
seconds when it is not (a log file, `ray job logs`), so logs stay readable.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import ray
from ray.train import UserCallback

from dlray import reports
from dlray.config import JobConfig
from dlray.reports import Kind

# Keys of an epoch report the epoch line leaves to metrics.csv and TensorBoard.
NOT_SHOWN = {"epoch", "global_step", "step_in_epoch", "first_step_unix_time", "resumed_from_step", "num_nodes", "peak_rss_mib", "peak_private_mib",
             "skipped_rows", "bad_validations", "tokens_seen", "data_time_s", "data_time_spread"}
RAY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data", "ray.serve")


def quiet_ray_logging() -> dict:
    """Ray's INFO lines off in this process (its WARNING and ERROR lines still show); returns what
    ray.init needs to do the same in every worker and actor of this job."""
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return {"logging_level": logging.WARNING}


class ConsoleRelay(UserCallback):
    """In the Train controller: every report, from every rank, and every worker failure, to the driver."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(("report", metrics))

    def after_exception(self, run_context, worker_exceptions):
        self.queue.put(("failure", {rank: one_line(error) for rank, error in worker_exceptions.items()}))


class Console:
    def __init__(self, cfg: JobConfig, verbose: bool = False, stream=None):
        self.cfg, self.verbose = cfg, verbose
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.validations: dict[int, dict] = {}  # each validation's report by global_step, a replayed one replacing the lost original
        self.final: dict = {}
        self.failures: set[str] = set()  # the ranks' errors as printed, which the summary does not repeat
        self.starts = 0
        self.started_at = time.time()
        self._last_line = 0.0
        self._queue = self._thread = self._progress = self._task = None
        # The run's shape, from the start report (until then, the config's epochs).
        self.num_epochs, self.total_steps = cfg.train.num_epochs, 0
        self._began = (time.monotonic(), 0)  # when and at which step this worker group began, for the plain lines' ETA

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Console:
        from ray.util.queue import Queue

        self._queue = Queue(actor_options={"num_cpus": 0})
        self.open()
        self._thread = threading.Thread(target=self._render, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._queue.put(None)
        self._thread.join()
        self.close()
        ray.kill(self._queue.actor)

    def open(self) -> None:
        """Start the live display (a terminal only)."""
        if self.tty:
            from rich.console import Console as RichConsole
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=RichConsole(file=self.stream),
                                      redirect_stdout=True, redirect_stderr=True, transient=True)
            self._progress.start()

    def close(self) -> None:
        if self._progress:
            self._progress.stop()

    @property
    def queue(self):
        """What other parts of the run put ("warning", line) on to have it printed here (dlray.watchdog)."""
        return self._queue

    def callbacks(self) -> list[UserCallback]:
        return [ConsoleRelay(self._queue)]

    def print(self, line: str) -> None:
        if self._progress:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)
        self._last_line = time.monotonic()

    # ------------------------------------------------------------------ rendering

    def _render(self) -> None:
        while (item := self._queue.get()) is not None:
            self.handle(*item)

    def handle(self, kind: str, payload) -> None:
        """One message from ConsoleRelay: ("report", one record per rank) or ("failure", {rank: error})."""
        if kind == "warning":  # dlray.watchdog's: a hang, a straggler
            self.print(payload)
            return
        if kind == "failure":
            ranks_by_error: dict[str, list[str]] = {}  # every rank of a diverged run fails alike: one line for them all
            for rank, error in payload.items():
                ranks_by_error.setdefault(error, []).append(str(rank))
            for error, ranks in ranks_by_error.items():
                self.failures.add(error.partition(": ")[2])
                self.print(f"[dlray] rank{'s' if len(ranks) > 1 else ''} {','.join(ranks)} failed: {error}")
            return
        record = payload[0]  # rank 0's; the loop reduces epoch metrics over ranks before reporting
        {Kind.START: self._start, Kind.STEP: self._step, Kind.EPOCH: self._validation, Kind.CHECKPOINT: self._checkpoint,
         Kind.FINAL: self._final}[reports.kind(record)](payload)

    def _start(self, ranks: list[dict]) -> None:
        first = ranks[0]
        self.starts += 1
        if self.starts > 1 or first["resumed_from"]:
            self.print(f"[dlray] {'restarted' if self.starts > 1 else 'resuming'}: epoch {first['epoch'] + 1}, step {first['global_step']}"
                       + (f" of {first['resumed_from']}" if first["resumed_from"] else " (no checkpoint yet: from the start)"))
        where: dict[str, list[int]] = {}
        for rank, record in enumerate(ranks):
            where.setdefault(record["node"], []).append(rank)
        placement = "; ".join(f"ranks {','.join(map(str, r))} on {node}" for node, r in where.items())
        self.print(f"[dlray] {len(ranks)} workers on {first['num_nodes']} node(s), {first['device'].split(':')[0]}: {placement}")
        self.print(f"[dlray] precision {first['precision']}: {first['precision_why']}")
        if first["precision_warning"]:
            self.print(f"[dlray] warning: {first['precision_warning']}")
        self.num_epochs, self.total_steps = first["num_epochs"], first["total_steps"]
        self._began = (time.monotonic(), first["global_step"])
        self._bar(first["global_step"], first["epoch"])

    def _step(self, ranks: list[dict]) -> None:
        record = ranks[0]
        loss = sum(r["train_loss"] for r in ranks) / len(ranks)
        speed = throughput({k: sum(r.get(k, 0.0) for r in ranks) for k in ("samples_per_sec", "tokens_per_sec")})
        stats = f"loss {loss:.4g}  lr {record['lr']:.3g}  {speed}" + seen(record)
        if self._progress:
            self._bar(record["global_step"], record["epoch"], stats)
        elif time.monotonic() - self._last_line >= self.cfg.run.progress_interval_s:
            (began, first_step), step = self._began, record["global_step"]
            eta = (time.monotonic() - began) / max(step - first_step, 1) * (self.total_steps - step)
            self.print(f"[dlray] {position(record, self.num_epochs, self.total_steps)} | {stats}  eta {eta:.0f} s")

    def _validation(self, ranks: list[dict]) -> None:
        record = ranks[0]
        self.validations[record["global_step"]] = record
        self.print(format_epoch(record, self.num_epochs, self.total_steps))
        if record.get("nonfinite_steps"):
            self.print(f"[dlray] warning: {record['nonfinite_steps']} optimizer steps skipped since the last validation: non-finite loss or "
                       f"gradient norm (train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps} in a row end the run)")
        self._bar(record["global_step"], record["epoch"])

    def _checkpoint(self, ranks: list[dict]) -> None:
        record = ranks[0]
        self.print(f"[dlray] checkpoint at step {record['global_step']:,} ({record['reason']})")

    def _final(self, ranks: list[dict]) -> None:
        self.final = ranks[0]
        self._bar(None, None)

    def _bar(self, global_step: int | None, epoch: int | None, stats: str | None = None) -> None:
        """The run's progress bar at `global_step` (None: remove it), named after the epoch it is in."""
        if not self._progress:
            return
        if global_step is None:
            if self._task is not None:
                self._progress.remove_task(self._task)
                self._task = None
            return
        if self._task is None:
            self._task = self._progress.add_task("", total=self.total_steps, stats="")
        update = {"stats": stats} if stats is not None else {}
        self._progress.update(self._task, completed=global_step, total=self.total_steps, description=f"epoch {epoch + 1}/{self.num_epochs}", **update)

    # ------------------------------------------------------------------ the end

    def summary(self, result, run_dir: str) -> str:
        """The closing lines: the best validation, the test scores, where the files are, what to run next."""
        metric, mode = self.cfg.train.metric, self.cfg.train.mode
        lines = [f"[dlray] {'failed' if result.error else 'finished'} in {time.time() - self.started_at:.0f} s"]
        best = reports.best(list(self.validations.values()), metric, mode)  # the validation of the best checkpoint named below
        if best:
            lines[0] += (f": best {metric} {best[metric]:.4g} at epoch {best['epoch'] + 1} step {best['global_step']:,}"
                         f" ({len(self.validations)} validations)")
        patience = self.cfg.train.early_stopping_patience
        if patience and self.final.get("bad_validations", 0) >= patience:
            lines[0] += f" (stopped early: no better {metric} for {patience} validations)"
        tests = {k: v for k, v in self.final.items() if k.startswith("test_")}
        if tests:
            lines.append("        test " + "  ".join(f"{k.removeprefix('test_')} {v:.4g}" for k, v in sorted(tests.items())))
        lines.append(f"        run directory {run_dir}: metrics.csv, curves.png, tensorboard/ (tensorboard --logdir {run_dir}/tensorboard)")
        kept = reports.best(result.best_checkpoints, metric, mode, lambda checkpoint_and_metrics: checkpoint_and_metrics[1])
        best_checkpoint = kept[0] if kept else None
        if best_checkpoint is not None:
            lines.append(f"        best checkpoint {best_checkpoint.path}")
            lines.append(f"        next: dlray export {run_dir} out/{self.cfg.run.name}")
        if result.error and not any(failure and failure in one_line(result.error) for failure in self.failures):
            lines.append(f"        error: {one_line(result.error)}")
        text = "\n".join(lines)
        self.print(text)
        return text


def format_epoch(record: dict, num_epochs: int, total_steps: int | None = None) -> str:
    """A validation's line: `[dlray] epoch 4/15 step 80/300 | train_loss 0.26  val_loss 0.16  val_accuracy 0.94  lr 0.0089  2407 samples/s`"""
    metrics = {k: v for k, v in record.items() if isinstance(v, float) and k not in NOT_SHOWN and not k.endswith("_per_sec")}
    order = sorted(metrics, key=lambda k: (not k.startswith("train"), not k.startswith("val"), k))
    shown = [f"{k} {metrics[k]:.4g}" for k in order]
    return f"[dlray] {position(record, num_epochs, total_steps)} | " + "  ".join(shown + [throughput(record)]) + seen(record)


def position(record: dict, num_epochs: int, total_steps: int | None) -> str:
    """`epoch 2/3 step 1,200/10,000` (the budget where it is known)."""
    return f"epoch {record['epoch'] + 1}/{num_epochs} step {record['global_step']:,}" + (f"/{total_steps:,}" if total_steps else "")


def seen(record: dict) -> str:
    """`  3,072,000 tokens seen` for data made of tokens, else ""."""
    return f"  {record['tokens_seen']:,} tokens seen" if "tokens_seen" in record else ""


def throughput(record: dict) -> str:
    """Tokens per second for language models (samples are windows of tokens), samples per second otherwise."""
    if record.get("tokens_per_sec"):
        return f"{record['tokens_per_sec']:,.0f} tokens/s"
    return f"{record.get('samples_per_sec', 0):,.0f} samples/s"


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"
