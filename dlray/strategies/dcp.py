"""torch.distributed.checkpoint (DCP) save/load shared by the ddp and fsdp strategies.

DCP writes one shard file per rank plus a metadata file; replicated (DDP) tensors are written
once. The same files load back under a different world size, and offline for export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

SCALER_FILE = "grad_scaler.json"


def save(directory: str, model, optimizers, scaler: torch.amp.GradScaler | None = None) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizers)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)
    if scaler is not None and scaler.is_enabled() and torch.distributed.get_rank() == 0:
        Path(directory, SCALER_FILE).write_text(json.dumps(scaler.state_dict()))


def load(directory: str, model, optimizers, scaler: torch.amp.GradScaler | None = None) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if scaler is not None and Path(directory, SCALER_FILE).exists():
        scaler.load_state_dict(json.loads(Path(directory, SCALER_FILE).read_text()))


def load_weights_offline(directory: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) model weights from a DCP checkpoint, in one process, no process group."""
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=directory, no_dist=True)
    return state["model"]
