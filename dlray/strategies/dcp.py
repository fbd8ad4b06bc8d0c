"""torch.distributed.checkpoint (DCP) save/load shared by the ddp and fsdp strategies.

DCP writes one shard file per rank plus a metadata file; replicated (DDP) tensors are written
once. The same files load back under a different world size, and offline for export.
With `trainable_only` (every finetuning_type but full) only the weights that train are saved
and loaded: the frozen rest comes from model.name_or_path (and may be packed 4-bit integers).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dlray.finetune import trainable_names
from dlray.strategies.scaler import load_scaler, save_scaler


def save(directory: str, model, optimizers, scaler: torch.amp.GradScaler | None = None, trainable_only: bool = False) -> None:
    model_sd, optim_sd = state_dicts(model, optimizers, trainable_only)
    # Replicated tensors from rank 0: by default DCP spreads their writes over the ranks, and buffers are not
    # always equal across them (rank 1's BatchNorm statistics include its own last batch until DDP next
    # broadcasts rank 0's). A run resumed from another rank's statistics drifts from the uninterrupted one.
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory, planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    save_scaler(directory, scaler)


def load(directory: str, model, optimizers, scaler: torch.amp.GradScaler | None = None, trainable_only: bool = False) -> None:
    model_sd, optim_sd = state_dicts(model, optimizers, trainable_only)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=not trainable_only))
    load_scaler(directory, scaler)


def state_dicts(model, optimizers, trainable_only: bool) -> tuple[dict, dict]:
    model_sd, optim_sd = get_state_dict(model, optimizers)
    if trainable_only:  # not only frozen parameters: also a 4-bit weight's quantisation state (absmax, ...)
        model_sd = {k: v for k, v in model_sd.items() if k in trainable_names(model)}
    return model_sd, optim_sd


def load_weights_offline(directory: str, model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) model weights, or those that trained, from a DCP checkpoint, in one process, no process group."""
    keep = trainable_names(model) if trainable_only else model.state_dict().keys()
    state = {"model": {k: v.clone() for k, v in model.state_dict().items() if k in keep}}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming ... a single process": as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=directory, no_dist=True)
    return state["model"]
