"""The servable artifact `dlray export` writes and Serve replicas load: what its files are, writing
one, and loading it back. Serving imports this module and never the training side (dlray.export,
dlray.checkpoint, ...): tests/test_imports.py holds it to that.

An artifact is `dlray.json` (model config, data info such as class names and input shape,
serving defaults) plus the weights: `model.safetensors`, or for families with their own library
layout that layout (diffusion: a diffusers pipeline, loadable by `DDPMPipeline.from_pretrained`;
gpt: a transformers model with its tokenizer, loadable by `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained`, whose `config.json` is why dlray's file has a name of its
own). Adapter fine-tunes (lora, qlora, prompt_tuning) hold the adapter in PEFT's layout
(adapter_config.json, adapter_model.safetensors: `PeftModel.from_pretrained(base, artifact)`).
Loading an artifact never unpickles anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dlray.config import FinetuneConfig
from dlray.models import FAMILIES
from dlray.precision import PRECISION_DTYPES

WEIGHTS_FILE = "model.safetensors"
ADAPTER_INDEX = "adapter_config.json"  # PEFT's, in an adapter artifact
CONFIG_FILE = "dlray.json"


def write_artifact(model: torch.nn.Module, artifact_config: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    family = FAMILIES[artifact_config["model"]["family"]]
    if family.save_pretrained:  # a PEFT model saves its adapter
        family.save_pretrained(model, out)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(artifact_config, indent=2))
    return out


def load_artifact(directory: str | Path) -> tuple[torch.nn.Module, dict]:
    """The exported model in eval mode, and its dlray.json."""
    directory = Path(directory)
    config = read_artifact_config(directory)
    family = FAMILIES[config["model"]["family"]]
    if family.from_pretrained:
        # transformers loads an adapter directory's base (model.name_or_path) and attaches the adapter;
        # a QLoRA adapter's base is quantised as it was in training, so it computes what was trained.
        options = load_options(FinetuneConfig(**config["finetune"]), config["precision"], family) if config.get("adapter") else {}
        return family.from_pretrained(directory, **options).eval(), config
    model = family.build(config["model"], config["data_info"])
    model.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=True)
    return model.eval(), config


def read_artifact_config(directory: str | Path) -> dict:
    path = Path(directory, CONFIG_FILE)
    config = json.loads(path.read_text()) if path.exists() else None
    weights = WEIGHTS_FILE
    if config:
        weights = ADAPTER_INDEX if config.get("adapter") else FAMILIES[config["model"]["family"]].artifact_index
    if config is None or not Path(directory, weights).exists():
        raise FileNotFoundError(f"{directory} is not a dlray artifact (needs {CONFIG_FILE} and its weights, {weights}); create one with `dlray export`")
    return config


def load_options(finetune: FinetuneConfig, precision: str, family) -> dict:
    """Keyword arguments for the family's from_pretrained (and build): qlora quantises the base as it
    loads, in training (dlray.finetune) as in a replica loading a QLoRA adapter's base."""
    if finetune.finetuning_type != "qlora":
        return {}
    from transformers import BitsAndBytesConfig

    # 4-bit weights are dequantised to the job's precision for each matmul. A classifier's new head
    # stays unquantised (transformers keeps a causal LM's output layer so by itself): it is trained whole.
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=finetune.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=finetune.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=PRECISION_DTYPES[precision],
        llm_int8_skip_modules=list(family.head_modules) or None)}
