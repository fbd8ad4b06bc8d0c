"""A family's model trained, evaluated and exported in one process (no Ray, no process group),
with the loop's own pieces: build_model, the family's training_loss, the optimizer and schedule of the config."""

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.utils.data import DataLoader

from dlray.checkpoint import META_FILE, TOKENIZER_DIR
from dlray.config import config_from_dict
from dlray.data import build_data
from dlray.export import export
from dlray.loop import build_model
from dlray.models import FAMILIES
from dlray.optim import build_optimizer, build_scheduler


def train(cfg, steps: int, batch_size: int):
    """`steps` optimizer steps on shuffled training batches; the data and the model, in eval mode."""
    torch.manual_seed(0)
    family = FAMILIES[cfg.model.family]
    data = build_data(cfg.data, seed=cfg.train.seed)
    model = build_model(family, cfg, data.info)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps, 1, cfg.train.mode)
    loader = DataLoader(data.train, batch_size, shuffle=True, drop_last=True)
    batches = (batch for _ in range(steps) for batch in loader)
    model.train()
    for _, batch in zip(range(steps), batches):
        family.training_loss(model, batch, "model").backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return data, model.eval()


def evaluate(family, model, dataset) -> dict[str, float]:
    """The mean of each per-sample value compute_loss returns, over the dataset."""
    with torch.no_grad():
        values = [family.compute_loss(model, batch) for batch in DataLoader(dataset, 256)]
    return {key: torch.cat([v[key] for v in values]).mean().item() for key in values[0]}


def export_trained(cfg, data, model, directory: Path) -> Path:
    """`dlray export` of a checkpoint laid out as checkpoint.report_with_checkpoint writes one
    (weights in DCP, meta.json, the tokenizer of text data)."""
    checkpoint = directory / "checkpoint"
    dcp.save({"model": model.state_dict()}, checkpoint_id=checkpoint, no_dist=True)
    meta = {"format": "dcp", "config": cfg.model_dump(mode="json"), "data_info": data.info, "metrics": {}, "progress": {"global_step": 0}}
    (checkpoint / META_FILE).write_text(json.dumps(meta))
    if data.tokenizer is not None:
        data.tokenizer.save_pretrained(checkpoint / TOKENIZER_DIR)
    return export(checkpoint, directory / "artifact")


def checkpointing_gradients(job: dict, data) -> tuple[list, list[torch.Tensor]]:
    """Two models of the job from the same seed, without and with train.gradient_checkpointing, and
    the gradients of each on the same 4 training samples."""
    family = FAMILIES[job["model"]["family"]]
    batch = next(iter(DataLoader(data.train, 4)))
    models, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(family, config_from_dict({**job, "train": {"gradient_checkpointing": checkpointing}}), data.info)
        family.training_loss(model.train(), batch, "model").backward()
        models.append(model)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return models, grads
