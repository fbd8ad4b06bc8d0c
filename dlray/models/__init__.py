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

Adding a family: one file here, one line in FAMILIES, one jobs/debug/<family>_cpu.yaml.
Models know nothing of Ray.
"""

from dlray.models import cnn, diffusion, gan, vae

FAMILIES = {"cnn": cnn, "diffusion": diffusion, "vae": vae, "gan": gan}
