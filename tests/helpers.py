"""What several test modules share (fixtures live in conftest.py)."""

import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wait_for_committed_checkpoint(run_dir, epoch: int, timeout_s: float = 300) -> None:
    """Block until Ray Train has committed the checkpoint of `epoch` (its controller lists it in
    checkpoint_manager_snapshot.json); a checkpoint still being uploaded is, rightly, not one to
    resume from, so failures injected earlier would restart from scratch."""
    snapshot, name = Path(run_dir) / "checkpoint_manager_snapshot.json", f"checkpoint_epoch{epoch:04d}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if snapshot.exists() and name in snapshot.read_text():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name} was not committed within {timeout_s} s")
