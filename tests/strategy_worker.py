"""Worker for test_strategies: runs in each of 2 processes of a plain gloo process group.

For every (strategy, precision) case: train the debug CNN on fixed batches, checkpoint, keep
training, then rebuild from the checkpoint and replay the same steps. Rank 0 writes the losses,
the replayed losses and the restored model's logits; the test compares them and exports the checkpoint.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dlray.config import config_from_dict
from dlray.data import build_data
from dlray.models import FAMILIES
from dlray.optim import build_optimizer
from dlray.strategies import STRATEGIES

STEPS, SAVE_AT = 12, 8


def run_case(case: dict, out: Path, rank: int, world: int) -> dict:
    # No dropout: the replay must see the same computation (the Ray loop checkpoints RNG state for that).
    cfg = config_from_dict({"strategy": case["strategy"], "precision": case["precision"], "model": {"dropout": 0.0}, "optim": {"lr": 0.01}})
    data = build_data(cfg.data, seed=0)
    info = {"image_shape": data.image_shape, "class_names": data.class_names, "mean": data.mean, "std": data.std}
    images, labels = data.train.images[: 16 * world * 4], data.train.labels[: 16 * world * 4]
    batches = [(images[i::world * 4][rank::world], labels[i::world * 4][rank::world]) for i in range(4)]
    family = FAMILIES["cnn"]

    def fresh():
        torch.manual_seed(0)
        strategy = STRATEGIES[cfg.strategy.name](cfg, torch.device("cpu"), family.SHARD_CLASSES)
        model, _ = strategy.prepare(family.build(cfg.model.model_dump(), info), lambda p: build_optimizer(cfg.optim, p))
        return strategy, model

    def train_step(strategy, model, step):
        model.train()
        with strategy.autocast():
            loss = family.compute_loss(model, batches[step % 4])["loss"].mean()
        strategy.backward(loss, sync=True)
        strategy.step()
        value = loss.detach().float()
        dist.all_reduce(value)
        return value.item() / world

    strategy, model = fresh()
    checkpoint = out / case["id"]
    losses = []
    for step in range(STEPS):
        if step == SAVE_AT:
            strategy.save(str(checkpoint))
        losses.append(train_step(strategy, model, step))

    # Restored from the step-8 checkpoint: its logits are what `dlray export` must reproduce,
    # and training on from it must replay the uninterrupted run's losses.
    strategy, model = fresh()
    strategy.load(str(checkpoint))
    saved_logits = eval_logits(strategy, model, data.val.images[:64])
    replayed = [train_step(strategy, model, step) for step in range(SAVE_AT, STEPS)]
    if rank == 0:
        meta = {"format": strategy.CHECKPOINT_FORMAT, "config": cfg.model_dump(mode="json"), "data_info": info,
                "metrics": {}, "progress": {"global_step": SAVE_AT}}
        (checkpoint / "meta.json").write_text(json.dumps(meta))
    return {"losses": losses, "replayed": replayed, "saved_logits": saved_logits.tolist()}


@torch.no_grad()
def eval_logits(strategy, model, images):
    model.eval()
    with strategy.autocast():
        return model(images).float()


def main(out: str, cases: str):
    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment, as torchrun sets them
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {case["id"]: run_case(case, Path(out), rank, world) for case in json.loads(cases)}
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
