"""Fine-tuning methods (`finetune.finetuning_type`): which weights of a pretrained model train.

    full           every weight (also training from scratch)
    freeze         only the family's HEAD_MODULES, e.g. a classifier head (feature extraction)
    lora           PEFT LoRA adapters on the frozen weights (`lora_r`, `lora_alpha`, `lora_dropout`,
                   `lora_target_modules`)
    qlora          the same over base weights loaded in 4 bits (bitsandbytes NF4, double quantisation,
                   compute in the job's precision) and prepared with `prepare_model_for_kbit_training`
    prompt_tuning  PEFT prompt tuning: `num_virtual_tokens` trained embeddings before each input

What the weights learn is `finetune.objective`: sft (the family's own loss), or a preference objective
on data.name preference (dlray.data.preference), with TRL's definitions and metric names:

    dpo  Direct Preference Optimization: -log sigmoid(beta * margin) (loss_type sigmoid, with cDPO's
         label_smoothing), (margin' - 1/(2 beta))^2 (ipo, margin' of per-token means) or relu(1 - beta * margin)
         (hinge), where margin is the policy's log-ratio to the reference of the chosen completion minus the rejected's
    orpo the chosen completion's NLL minus beta * log sigmoid(its log odds ratio over the rejected one); no reference
    kto  1 - sigmoid(beta * (ratio - kl)) for a desirable completion, 1 - sigmoid(beta * (kl - ratio)) for an
         undesirable one, kl estimated from mismatched prompt-completion pairs of the batch (detached, clamped at 0)

The reference model is the starting point: for lora and qlora the same model with its adapters disabled
(PEFT's disable_adapter, no second copy); for full fine-tunes a frozen copy made before training, which
costs each worker the model's weights once more (4 bytes a parameter in fp32; not sharded by FSDP or
ZeRO-3), no gradients and no optimizer state. Dropout is off under the preference objectives, as TRL's
disable_dropout does by default: the policy and the reference must score a sequence alike at the start.

Everything but `full` starts from `model.name_or_path`, so a checkpoint holds only the weights that
train (and their optimizer state): the frozen rest is reloaded from there. `dlray export` writes an
adapter in the PEFT layout (adapter_config.json + adapter_model.safetensors), or with `--merge-lora`
the base with the adapters merged in, as a plain transformers model.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
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


# --- preference objectives ----------------------------------------------------------------------

IGNORE_INDEX = -100  # the label of a position not trained on (prompt, padding), as in dlray.data.preference

def objective(family, cfg, model: nn.Module, device: torch.device):
    """The family with compute_loss the objective's (unchanged for sft). Call it with the model as built, before
    the strategy wraps it: a full fine-tune's reference is a frozen copy of it, on `device`."""
    finetune = cfg.finetune
    if finetune.objective == "sft":
        return family
    for module in model.modules():  # TRL's disable_dropout; the reference copy below inherits it
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # transformers' attention modules keep a rate, not a module
            module.attention_dropout = 0.0
    reference = None
    if finetune.objective != "orpo" and not finetune.adapter:
        reference = copy.deepcopy(model).requires_grad_(False).eval().to(device)
    loss = {"dpo": dpo_compute_loss, "orpo": orpo_compute_loss, "kto": kto_compute_loss}[finetune.objective]
    return dataclasses.replace(family, compute_loss=partial(loss, finetune, reference), metrics=family.metrics + finetune.objective_metrics(),
                               derived_metrics=partial(without_perplexity, family.derived_metrics))


def without_perplexity(derived_metrics, metrics: dict[str, float], data_info: dict) -> dict[str, float]:
    """The family's derived metrics but perplexity, which a preference loss is not the log of."""
    return {key: value for key, value in derived_metrics(metrics, data_info).items() if not key.endswith("perplexity")}


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-probability of its labelled tokens (labels already shifted), and how many there are."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, -labels.shape[1]:]
    token_logps = -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    return token_logps.view_as(labels).sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


@torch.no_grad()
def reference_logps(model: nn.Module, reference: nn.Module | None, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sequence_logps under the reference: the frozen copy, or the model itself with its adapters disabled."""
    if reference is not None:
        return sequence_logps(reference, input_ids, labels)[0]
    peft_model = getattr(model, "module", model)  # DDP's and DeepSpeed's wrappers; FSDP2 keeps the module
    with peft_model.disable_adapter():
        return sequence_logps(peft_model, input_ids, labels)[0]


def dpo_compute_loss(finetune, reference: nn.Module | None, model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """DPO over a batch of (chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels): per pair, the loss and TRL's metrics."""
    input_ids, labels = torch.cat(batch[0::2]), torch.cat(batch[1::2])  # chosen then rejected, one forward as TRL's concatenated_forward
    ref_chosen, ref_rejected = reference_logps(model, reference, input_ids, labels).chunk(2)
    logps, counts = sequence_logps(model, input_ids, labels)
    (chosen, rejected), (chosen_len, rejected_len) = logps.chunk(2), counts.chunk(2)
    loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, finetune.beta, finetune.loss_type,
                                                      finetune.label_smoothing, chosen_len, rejected_len)
    return {"loss": loss} | pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_len: torch.Tensor | None = None,
             rejected_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the loss, and the rewards beta * (policy - reference) log-probability of the chosen and the rejected
    completion. From summed log-probabilities; ipo divides the log-ratios by the completions' lengths (TRL's ipo)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        assert chosen_len is not None and rejected_len is not None
        loss = (chosen_ratio / chosen_len.clamp_min(1) - rejected_ratio / rejected_len.clamp_min(1) - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"finetune.loss_type must be 'sigmoid', 'ipo' or 'hinge', got {loss_type!r}")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    """TRL's per-pair metrics (its logs average them over pairs, as dlray's validation does)."""
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(), "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps.detach(), "logps/rejected": rejected_logps.detach()}


def orpo_compute_loss(finetune, reference: None, model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """ORPO over paired batches: the chosen completion's mean NLL per token (dlray's SFT loss, per pair) minus
    beta * log sigmoid(log odds ratio), from per-token mean log-probabilities as TRL's ORPO."""
    logps, counts = sequence_logps(model, torch.cat(batch[0::2]), torch.cat(batch[1::2]))
    chosen, rejected = (logps / counts.clamp_min(1)).chunk(2)
    odds_loss, log_odds_ratio, log_odds = orpo_odds_ratio_loss(chosen, rejected, finetune.beta)
    nll = -chosen
    metrics = pair_metrics(finetune.beta * chosen.detach(), finetune.beta * rejected.detach(), chosen, rejected)
    return {"loss": nll - odds_loss} | metrics | {"nll_loss": nll.detach(), "log_odds_ratio": log_odds_ratio, "log_odds_chosen": log_odds}


def orpo_odds_ratio_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's odds_ratio_loss per pair, from mean log-probabilities: beta * log sigmoid(log odds), the log
    sigmoid, and the log odds log(p/(1-p)) of chosen minus rejected (what ORPO subtracts from the NLL, and logs)."""
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return beta * ratio, ratio.detach(), log_odds.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (Maechler's switch at -log 2)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kto_compute_loss(finetune, reference: nn.Module | None, model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """KTO over (input_ids, labels, kl_input_ids, kl_labels, label): per completion, its loss, and the batch's KL estimate."""
    input_ids, labels, kl_input_ids, kl_labels, desirable = batch
    ref_logps, ref_kl_logps = reference_logps(model, reference, torch.cat([input_ids, kl_input_ids]), torch.cat([labels, kl_labels])).chunk(2)
    with torch.no_grad():  # TRL computes the KL term's log-probabilities without gradients
        kl_logps = sequence_logps(model, kl_input_ids, kl_labels)[0]
    logps = sequence_logps(model, input_ids, labels)[0]
    loss, kl = kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, desirable > 0.5, finetune.beta)
    return {"loss": loss, "kl": kl.expand_as(loss)}


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, desirable: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's KTO loss per completion (desirable and undesirable weights 1), and its KL estimate: the batch's
    mean log-ratio on mismatched pairs, clamped at 0 and detached (TRL also averages it over the ranks; here each rank's own)."""
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    return torch.where(desirable, 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio))), kl
