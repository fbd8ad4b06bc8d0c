"""What every Serve replica does first: pick its device and its threads, and load its model there.

A replica given a GPU (`serve.num_gpus_per_replica`, Ray's `ray_actor_options.num_gpus`) computes on it;
one without computes on one CPU thread: on a CPU node, more replicas, not more threads, scale it.
The model is held in `serve.dtype` (dlray.precision.serve_dtype): bf16 or fp16 on a GPU, fp32 on a CPU.
"""

import ray
import torch

from dlray import precision
from dlray.artifact import load_artifact


def replica_device() -> torch.device:
    if ray.get_gpu_ids():  # Ray has set CUDA_VISIBLE_DEVICES to the replica's own GPUs
        return torch.device("cuda")
    torch.set_num_threads(1)
    return torch.device("cpu")


def load_replica_model(artifact: str, dtype: str) -> tuple[torch.nn.Module, dict, str]:
    """The artifact's model on this replica's device in the dtype `serve.dtype` resolves to, its dlray.json,
    and that dtype's name. A QLoRA adapter's 4-bit base stays as it loads (bitsandbytes computes in the
    training precision; a quantised model refuses a cast)."""
    device = replica_device()
    model, config = load_artifact(artifact)
    if config.get("adapter") and config["finetune"]["finetuning_type"] == "qlora":
        return model.to(device), config, config["precision"]
    chosen = precision.serve_dtype(dtype, precision.detect(device))
    if device.type == "cuda" and chosen == "fp32":
        precision.set_tf32(False)  # asked-for fp32 is full fp32: torch's cuDNN convolutions default to TF32
    return model.to(device, precision.PRECISION_DTYPES[chosen]), config, chosen
