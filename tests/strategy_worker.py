"""Worker for test_strategies: runs in each of 2 processes of a plain gloo process group.

For every (family, strategy, precision) case: train the family's debug model on fixed batches,
checkpoint, keep training, then rebuild from the checkpoint and replay the same steps. Rank 0
writes the losses (summed over the phases of a family with several optimizers), the replayed
losses, which sub-modules training changed, the restored model's per-sample evaluation losses and
its weights as `strategy.gather(strategy.local_state())` puts them together from the ranks' parts;
the test compares them and exports the checkpoint. A case whose debug job sets `train.ema_decay`
keeps the loop's sharded EMA too: saved beside the checkpoint (in `<id>-ema/`, which exports the
EMA), restored with it, and each rank's bytes of it recorded.
"""

import functools
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from bitsandbytes.nn import Linear4bit
from safetensors.torch import save_file
from torch.utils.data import Subset, default_collate

from dlray import precision
from dlray.checkpoint import EMA_FILE, TrainState, write_meta
from dlray.config import config_from_dict
from dlray.data import SOURCES, build_data, data_config
from dlray.ema import EMA
from dlray.finetune import trainable_names
from dlray.loop import build_model, make_optimizers, with_precision
from dlray.models import FAMILIES
from dlray.step import EpochTotals, evaluate, train_step
from dlray.strategies import STRATEGIES

from toy_family import TOY, TOY_JOB

STEPS, SAVE_AT = 12, 8
# A pretrained causal LM for the finetuning cases ("llm"), made by make_llm_base before the workers start.
LLM_BASE = Path(tempfile.gettempdir(), "dlray-test-llm-base")
# A pretrained BERT encoder without a head, as the Hub ships one, for feature extraction ("freeze"); made by make_bert_base.
BERT_BASE = Path(tempfile.gettempdir(), "dlray-test-bert-base")
# Each family trains its debug job's model on its debug job's data, with its optimizer settings
# (jobs/debug/<family>_cpu.yaml; the toy family's job is TOY_JOB): a new family's job puts it in the matrix.
DEBUG_JOBS = Path(__file__).resolve().parents[1] / "jobs/debug"
# The causal-LM fine-tunes ("llm" cases) train a small pretrained base on chat data.
LLM_JOB = {"model": {"family": "gpt", "name_or_path": str(LLM_BASE)}, "optim": {"lr": 0.02},
           "data": {"name": "text", "type": "chat_template", "chat_template": "zephyr", "max_seq_len": 48}}


def debug_job(family: str) -> dict:
    """A family's debug job as the matrix trains it: its model, data and optimizer sections and its
    EMA, without dropout or augmentation (the replay must repeat the computation exactly)."""
    job = TOY_JOB if family == TOY.name else yaml.safe_load((DEBUG_JOBS / f"{family}_cpu.yaml").read_text())
    config = {section: dict(job.get(section, {})) for section in ("model", "data", "optim")}
    config["train"] = {key: value for key, value in job.get("train", {}).items() if key == "ema_decay"}
    config["model"]["dropout"] = 0.0
    if SOURCES[config["data"].get("name", "digits")].kind == "image":
        config["data"]["augment"] = False
    return config


def make_llm_base(directory: Path = LLM_BASE, steps: int = 60) -> Path:
    """A small pretrained Llama as save_pretrained writes it, with its tokenizer: what from_pretrained
    reads. A few full-training steps on Python's help texts give its layers something for adapters to build on."""
    from dlray.data.text import bundled_documents, pack, tokenize, train_tokenizer
    from dlray.models import gpt

    documents = bundled_documents()
    tokenizer = train_tokenizer(documents, 512)
    torch.manual_seed(0)
    model = gpt.build({"flavor": "debug", "dropout": 0.0}, {"vocab_size": len(tokenizer), "max_seq_len": 256, "bos_token_id": tokenizer.bos_token_id,
                                                          "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    windows = pack(tokenize(tokenizer, documents), tokenizer.eos_token_id, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        window = windows[step * 16 : (step + 1) * 16]
        gpt.compute_loss(model, (window[:, :-1], window[:, 1:]))["loss"].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_bert_base(directory: Path = BERT_BASE, steps: int = 40) -> Path:
    """The bert case's model trained a few steps on its data, saved without its classification head
    (BertModel, and the tokenizer): what `model.name_or_path` of an encoder checkpoint reads."""
    cfg = case_config({"strategy": {"name": "ddp"}, "precision": "fp32", "config": debug_job("bert")})
    data = data_once(cfg.data.model_dump_json())
    torch.manual_seed(0)
    model = build_model(FAMILIES["bert"], cfg, data.info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    for step in range(steps):
        FAMILIES["bert"].training_loss(model, first_samples(Subset(data.train, range(step * 32, step * 32 + 32)), 32), "model").backward()
        optimizer.step()
        optimizer.zero_grad()
    model.bert.save_pretrained(directory)
    data.tokenizer.save_pretrained(directory)
    return directory


def case_config(case: dict):
    """The case's job config, its precision resolved for this CPU as a Ray worker resolves `auto`."""
    cfg = config_from_dict({"strategy": case["strategy"], "precision": case["precision"], "finetune": case.get("finetune", {}), **case["config"],
                            "train": {**case["config"].get("train", {}), **case.get("train", {})}})
    return with_precision(cfg, precision.detect(torch.device("cpu")))[0]


def run_case(case: dict, out: Path, rank: int, world: int) -> dict:
    # No dropout: the replay must see the same computation (the Ray loop checkpoints RNG state for that).
    cfg = case_config(case)
    data = data_once(cfg.data.model_dump_json())
    samples = first_samples(data.train, 16 * world * 4)
    batches = [[field[i::world * 4][rank::world] for field in samples] for i in range(4)]
    family = FAMILIES[cfg.model.family]

    def fresh():
        torch.manual_seed(0)
        strategy = STRATEGIES[cfg.strategy.name](cfg, torch.device("cpu"), family.shard_classes())
        model, _ = strategy.prepare(build_model(family, cfg, data.info), lambda module: make_optimizers(family, module, cfg))
        return strategy, model

    def take_step(strategy, model, step):
        """One optimizer step per phase, as the loop takes them (dlray.step.train_step); the sum of the phases' losses."""
        model.train()
        torch.manual_seed(1000 * step + rank)  # losses that draw noise (diffusion, vae, gan): the same draws on replay
        totals = EpochTotals.zeros(len(family.optimizers), torch.device("cpu"))
        train_step(model, family, strategy, [(batches[step % 4], None, None)], totals)
        totals.all_reduce()
        return totals.train_metrics(family.optimizers)["train_loss"]

    def fitted_loss(strategy, model):
        """The loss on the 4 training batches as evaluation measures it (dlray.step.evaluate: eval mode; fixed noise),
        over the ranks: the same number before training and after, unless training changed the model."""
        torch.manual_seed(0)
        return evaluate(model, family, [(batch, torch.ones(len(batch[-1]))) for batch in batches], torch.device("cpu"), strategy.autocast)["loss"]

    strategy, model = fresh()
    ema = EMA(strategy, cfg.train.ema_decay) if cfg.train.ema_decay else None
    initial = strategy.gather(strategy.local_state())  # on rank 0, whose results the test reads; empty elsewhere
    fitted_before = fitted_loss(strategy, model)
    checkpoint, ema_checkpoint = out / case["id"], out / f"{case['id']}-ema"
    losses = []
    for step in range(STEPS):
        if step == SAVE_AT:
            strategy.save(str(checkpoint))
            if ema:
                ema_checkpoint.mkdir(exist_ok=True)
                ema.save(ema_checkpoint / EMA_FILE)
        losses.append(take_step(strategy, model, step))
        if ema:
            ema.update()
    fitted_after = fitted_loss(strategy, model)
    # The top-level sub-modules whose weights training changed (a GAN must train both players),
    # and any weight that changed though it was frozen (an adapter fine-tune must leave the base alone).
    final = strategy.gather(strategy.local_state())
    changed_keys = {k for k, v in final.items() if not torch.equal(v, initial[k])}
    changed = sorted({k.split(".")[0] for k in changed_keys})
    # Within bf16 rounding: bitsandbytes casts a 4-bit layer's bias to the compute dtype in place on
    # its first forward, which rounds it but does not train it.
    changed_frozen = sorted(k for k in changed_keys - trainable_names(model)
                            if not torch.allclose(final[k].float(), initial[k].float(), rtol=2**-8, atol=0)) if cfg.finetune.trainable_only else []
    linear4bit = sum(isinstance(m, Linear4bit) for m in model.modules())  # bitsandbytes' own (PEFT's LoRA layer around it is another)
    # The modules nn.Module.compile() compiled in place, by class: the DDP wrapper itself, or FSDP's blocks.
    compiled = sorted({type(m).__name__ for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None})

    # Restored from the step-8 checkpoint: its evaluation is what `dlray export` must reproduce,
    # and training on from it must replay the uninterrupted run's losses.
    strategy, model = fresh()
    strategy.load(str(checkpoint))
    saved = eval_losses(strategy, model, family, first_samples(data.val, 64))
    gathered = strategy.gather(strategy.local_state())  # every rank: a collective under FSDP and ZeRO-3
    result = {}
    if ema:  # as the loop resumes: an EMA of the new weights, then the saved average
        uninterrupted, ema = ema.gather(), EMA(strategy, cfg.train.ema_decay)
        ema.load(ema_checkpoint / EMA_FILE)
        result["ema_bytes"] = [0] * world  # this rank's average: its own part of each tensor, once
        dist.all_gather_object(result["ema_bytes"], sum(t.nbytes for t in {id(t): t for t in ema.shadow.values()}.values()))
    replayed = []
    for step in range(SAVE_AT, STEPS):
        replayed.append(take_step(strategy, model, step))
        if ema:
            ema.update()
    if ema:
        resumed = ema.gather()
        result |= {"model_bytes": sum(t.nbytes for t in uninterrupted.values()),
                   "ema_resume_max_diff": max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) if rank == 0 else None}
    if rank == 0:
        for directory in (checkpoint, ema_checkpoint) if ema else (checkpoint,):
            write_meta(directory, strategy.CHECKPOINT_FORMAT, cfg, data.info, TrainState(global_step=SAVE_AT), {})
        save_file({k: v.float().contiguous() for k, v in gathered.items()}, out / f"{case['id']}-full_state.safetensors")
    return result | {"losses": losses, "fitted": [fitted_before, fitted_after], "replayed": replayed, "saved_eval": saved.tolist(),
                     "changed": changed, "changed_frozen": changed_frozen, "linear4bit": linear4bit, "compiled": compiled}


@functools.cache
def data_once(data_config_json: str):
    """The data of a data config (as JSON), built once per process: text data trains a tokenizer, seconds each case would repeat."""
    return build_data(data_config(json.loads(data_config_json)), seed=0)


def first_samples(dataset, n: int):
    """The dataset's first n samples (all, if it has fewer) as one batch: one tensor per field
    ((inputs, targets), gpt's (input_ids, [position_ids,] labels), bert's (input_ids, attention_mask, labels))."""
    return default_collate([dataset[i] for i in range(min(n, len(dataset)))])


@torch.no_grad()
def eval_losses(strategy, model, family, batch):
    """Per-sample losses on a fixed batch (and fixed noise: diffusion's, the vae's, the gan's)."""
    model.eval()
    torch.manual_seed(0)
    with strategy.autocast():
        return family.compute_loss(model, batch)["loss"].float()


def main(out: str, cases: str):
    # The toy family's registry line, as test_strategies makes it in its own process (here, in main:
    # test_strategies imports this module, and its own registration must end with its tests).
    FAMILIES[TOY.name] = TOY
    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment, as torchrun sets them
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {case["id"]: run_case(case, Path(out), rank, world) for case in json.loads(cases)}
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
