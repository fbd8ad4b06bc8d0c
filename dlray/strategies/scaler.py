"""An fp16 loss scaler's state beside a checkpoint, so a resumed run starts from the scale it had
reached rather than from 2**16 (a few skipped steps of overflow to find it again)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

SCALER_FILE = "grad_scaler.json"


class Scaler(Protocol):
    """What of torch.amp.GradScaler (the DDP strategy's) this needs; the DeepSpeed strategy's LossScale has it too."""

    def is_enabled(self) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def save_scaler(directory: str, scaler: Scaler | None) -> None:
    # Plain numbers (the scale is a Python float in state_dict), so CUDA and CPU runs read each other's.
    if scaler is not None and scaler.is_enabled() and torch.distributed.get_rank() == 0:
        Path(directory, SCALER_FILE).write_text(json.dumps(scaler.state_dict()))


def load_scaler(directory: str, scaler: Scaler | None) -> None:
    if scaler is not None and Path(directory, SCALER_FILE).exists():
        scaler.load_state_dict(json.loads(Path(directory, SCALER_FILE).read_text()))
