"""Model families. Each module exports:

    FLAVORS              dict of named sizes; every family has `debug` (seconds on CPU)
    build(model_cfg, data_info) -> nn.Module
    compute_loss(model, batch) -> dict of per-sample tensors: {"loss": [B], <each of METRICS>: [B]}
    METRICS              names compute_loss returns besides "loss" (reported as val_<name>, test_<name>)
    OPTIMIZERS           one name per optimizer; more than one (a GAN's) means the family also has
                         param_groups(model) -> one parameter list per optimizer, and
                         compute_loss(model, batch, phase) -> the loss that optimizer minimises
    SHARD_CLASSES        block classes that FSDP shards one by one

Generative families also export
    sample(model, generators, **options) -> images in [-1, 1], one per torch.Generator
which the loop uses for each epoch's sample grid (on the EMA weights when `train.ema_decay` is set).

Optional, each used where present:
    derived_metrics(metrics, data_info) -> dict
                         more metrics computed from the reported ones, after each epoch and after
                         the final test (gpt: val_/test_perplexity = exp(loss), tokens_per_sec)
    DERIVED_METRICS      the names derived_metrics adds to every epoch (train.metric may be one)
    flops_per_token(model, seq_len) -> training FLOPs per token, for the loop's `mfu` on GPUs (gpt)
    enable_gradient_checkpointing(model)
                         what `train.gradient_checkpointing` calls; the config refuses it without
    save_pretrained(model, directory), from_pretrained(directory)
                         the family's own library layout for `dlray export` instead of
                         model.safetensors (ARTIFACT_INDEX: its file that marks a complete artifact)
    FINETUNING_TYPES     the `finetune.finetuning_type` values it takes (without it: only full)
    HEAD_MODULES         sub-modules that train under `freeze` (and, unquantised, beside qlora's adapters)
    PEFT_TASK_TYPE       PEFT's task type, for lora / qlora / prompt_tuning (gpt: CAUSAL_LM); such a
                         family's build also takes dlray.finetune.load_options (qlora's 4-bit load)

Adding a family: one file here, one line in FAMILIES, one jobs/debug/<family>_cpu.yaml.
Models know nothing of Ray.
"""

from dlray.models import bert, cnn, diffusion, gan, gpt, vae, vit

FAMILIES = {"cnn": cnn, "diffusion": diffusion, "vae": vae, "gan": gan, "gpt": gpt, "vit": vit, "bert": bert}
