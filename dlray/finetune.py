"""Fine-tuning methods (`finetune.finetuning_type`): which weights of a pretrained model train.

    full           every weight (also training from scratch)
    freeze         only the family's HEAD_MODULES, e.g. a classifier head (feature extraction)
    lora           PEFT LoRA adapters on the frozen weights (`lora_r`, `lora_alpha`, `lora_dropout`,
                   `lora_target_modules`)
    qlora          the same over base weights loaded in 4 bits (bitsandbytes NF4, double quantisation,
                   compute in the job's precision) and prepared with `prepare_model_for_kbit_training`
    prompt_tuning  PEFT prompt tuning: `num_virtual_tokens` trained embeddings before each input

Everything but `full` starts from `model.name_or_path`, so a checkpoint holds only the weights that
train (and their optimizer state): the frozen rest is reloaded from there. `dlray export` writes an
adapter in the PEFT layout (adapter_config.json + adapter_model.safetensors), or with `--merge-lora`
the base with the adapters merged in, as a plain transformers model.
"""

from __future__ import annotations

from torch import nn

from dlray.artifact import load_options  # qlora's 4-bit base, loaded alike for training and for serving


def apply(model: nn.Module, family, cfg) -> nn.Module:
    """The model with only the method's weights trainable (a PEFT model for the adapter methods)."""
    kind = cfg.finetune.finetuning_type
    if kind == "full":
        return model
    if kind == "freeze":
        heads = tuple(f"{name}." for name in family.head_modules)
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(heads))
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if kind == "qlora":
        # Freezes the base and keeps the small unquantised weights (norms, embeddings) in fp32 for
        # stable training; gradient checkpointing is the loop's business (train.gradient_checkpointing).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, peft_config(family, cfg.finetune))


def rebuild(family, cfg, data_info: dict) -> nn.Module:
    """The trained model's structure, outside training, for `dlray export`. A 4-bit base is
    dequantised to plain linears: these are exactly the weights QLoRA trained over, and merging
    adapters into them is plain arithmetic (merging into the original full-precision weights, or
    into re-quantised ones, would give another model)."""
    base = family.build(cfg.model.model_dump(), data_info, **load_options(cfg.finetune, cfg.precision, family))
    if cfg.finetune.finetuning_type == "qlora":
        base.dequantize()
    return apply(base, family, cfg)


def merge(model: nn.Module, finetune) -> nn.Module:
    """The base model with the trained adapters folded into its weights (PEFT's merge_and_unload)."""
    if finetune.finetuning_type == "prompt_tuning":
        raise ValueError("prompt tuning trains virtual tokens, not weights: there is nothing to merge (export without --merge-lora)")
    return model.merge_and_unload()


def peft_config(family, finetune):
    from peft import LoraConfig, PromptTuningConfig

    if finetune.finetuning_type == "prompt_tuning":
        return PromptTuningConfig(task_type=family.peft_task_type, num_virtual_tokens=finetune.num_virtual_tokens)
    return LoraConfig(task_type=family.peft_task_type, r=finetune.lora_r, lora_alpha=finetune.lora_alpha,
                      lora_dropout=finetune.lora_dropout, target_modules=finetune.lora_target_modules)


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the weights a checkpoint keeps when the base is frozen (as in the unwrapped model's state_dict)."""
    model = getattr(model, "module", model)  # DDP's wrapper; FSDP2 and DeepSpeed keep the names
    return {name for name, param in model.named_parameters() if param.requires_grad}
