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


def wandb_offline_runs(run_dir) -> dict[str, list[dict]]:
    """What W&B wrote offline under a run directory (<run_dir>/wandb/offline-run-*/run-<id>.wandb), by
    run id: each start of the run's records, as {"run": RunRecord, "history": [{key: value}], "artifacts": [names]}.

    A .wandb file is W&B's transaction log (what `wandb sync` uploads): a 7-byte header (":W&B", magic,
    version), then protobuf `Record`s in LevelDB's log format (32 KiB blocks of chunks, each a 7-byte
    header: CRC32, little-endian length, type 1 full / 2 first / 3 middle / 4 last). wandb 0.31 ships no
    Python reader of it."""
    import json

    from wandb.proto.wandb_internal_pb2 import Record

    runs: dict[str, list[dict]] = {}
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        start = {"run": None, "history": [], "artifacts": []}
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = Record()
                record.ParseFromString(pending)
                pending = b""
                which = record.WhichOneof("record_type")
                if which == "run":
                    start["run"] = record.run
                elif which == "history":
                    start["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
                elif which == "artifact":
                    start["artifacts"].append(record.artifact.name)
        if start["run"] is not None:  # None: the process was killed before W&B first flushed the log (every 15 s)
            runs.setdefault(start["run"].run_id, []).append(start)
    return runs


def decode_png(data: bytes):
    """A PNG's pixels as a numpy array, (H, W) or (H, W, C); fails on anything but a PNG."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image)
