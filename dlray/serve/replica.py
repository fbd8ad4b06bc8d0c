"""What every Serve replica does first: pick its device and its threads.

A replica given a GPU (`serve.num_gpus_per_replica`, Ray's `ray_actor_options.num_gpus`) computes on it;
one without computes on one CPU thread: on a CPU node, more replicas, not more threads, scale it.
"""

import ray
import torch


def replica_device() -> torch.device:
    if ray.get_gpu_ids():  # Ray has set CUDA_VISIBLE_DEVICES to the replica's own GPUs
        return torch.device("cuda")
    torch.set_num_threads(1)
    return torch.device("cpu")
