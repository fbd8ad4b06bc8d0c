"""Model families. Each module exports:

    FLAVORS              dict of named sizes; every family has `debug` (seconds on CPU)
    build(model_cfg, data_info) -> nn.Module
    compute_loss(model, batch) -> dict of per-sample tensors, at least {"loss": [B]}
    SHARD_CLASSES        block classes that FSDP shards one by one

Adding a family: one file here, one line in FAMILIES, one jobs/debug/<family>_cpu.yaml.
Models know nothing of Ray.
"""

from dlray.models import cnn

FAMILIES = {"cnn": cnn}
