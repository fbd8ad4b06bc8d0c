"""DDPM image diffusion with the `diffusers` library: a UNet2DModel predicts the noise that
DDPMScheduler added at a random timestep (Ho et al., 2020); sampling runs DDPM (every step) or
DDIM (few steps, Song et al., 2021) over the same trained model.

Images enter as [0, 1] (dlray's data convention) and are scaled to [-1, 1] here; samples come
out in [-1, 1]. An exported model is a plain diffusers pipeline directory (see dlray.export).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dlray.models.family import ModelFamily

# diffusers takes seconds to import: it is imported where a model is built or sampled, so that
# checking a config (`dlray validate`, every CLI command) does not pay for it.
if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel

# block_out_channels per resolution level; `attention`: self-attention at the lowest resolution
# (DDPM's choice); the CPU flavor goes without, which trains digits about twice as fast.
FLAVORS = {
    "debug": {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8, "attention": False},  # 16x16 digits on CPU
    "small": {"block_out_channels": (64, 128, 256), "layers_per_block": 2, "norm_num_groups": 32, "attention": True},  # 32x32
    "base": {"block_out_channels": (128, 256, 256, 512), "layers_per_block": 2, "norm_num_groups": 32, "attention": True},  # 64x64
}
METRICS = ()
OPTIMIZERS = ("model",)
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # dlray name -> diffusers name
DEFAULT_SAMPLE_STEPS = 50
ARTIFACT_INDEX = "model_index.json"  # what save_pretrained writes in place of model.safetensors (see dlray.export)


def shard_classes() -> tuple[type[nn.Module], ...]:
    """The blocks FSDP shards one by one (imported here, so diffusers loads only when FSDP asks)."""
    from diffusers.models.unets.unet_2d_blocks import AttnDownBlock2D, AttnUpBlock2D, DownBlock2D, UNetMidBlock2D, UpBlock2D

    return (DownBlock2D, AttnDownBlock2D, UNetMidBlock2D, UpBlock2D, AttnUpBlock2D)


class Diffusion(nn.Module):
    """The UNet plus the noise schedule it is trained for (the schedule holds no parameters)."""

    def __init__(self, unet: UNet2DModel, noise_scheduler: DDPMScheduler):
        super().__init__()
        self.unet, self.noise_scheduler = unet, noise_scheduler

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(noisy, timesteps, class_labels=class_labels).sample


def build(model_cfg, data_info) -> Diffusion:
    """`data_info` needs image_shape and class_names (see dlray.data.ImageData)."""
    from diffusers import DDPMScheduler, UNet2DModel

    flavor = dict(FLAVORS[model_cfg["flavor"]])
    attention = flavor.pop("attention")
    channels, height, width = data_info["image_shape"]
    levels = len(flavor["block_out_channels"])
    if height % 2 ** (levels - 1) or height != width:
        raise ValueError(f"model.flavor {model_cfg['flavor']!r} needs square images whose side divides by {2 ** (levels - 1)}; "
                         f"got {height}x{width} (set data.image_size)")
    unet = UNet2DModel(
        sample_size=height,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D" if attention else "DownBlock2D",),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        add_attention=attention,  # the middle block's
        dropout=model_cfg["dropout"],
        num_class_embeds=len(data_info["class_names"]) if model_cfg["class_conditional"] else None,
        **flavor,
    )
    scheduler = DDPMScheduler(num_train_timesteps=model_cfg["num_train_timesteps"], beta_schedule=BETA_SCHEDULES[model_cfg["beta_schedule"]])
    return Diffusion(unet, scheduler)


def compute_loss(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """Noise-prediction MSE per image at a uniformly drawn timestep."""
    images, labels = batch
    clean = images * 2 - 1
    noise = torch.randn_like(clean)
    diffusion = unwrap(model)
    timesteps = torch.randint(0, diffusion.noise_scheduler.config.num_train_timesteps, (len(clean),), device=clean.device)
    noisy = diffusion.noise_scheduler.add_noise(clean, noise, timesteps)
    predicted = model(noisy, timesteps, labels if diffusion.unet.config.num_class_embeds else None)
    return {"loss": F.mse_loss(predicted.float(), noise, reduction="none").mean(dim=(1, 2, 3))}


def unwrap(model: nn.Module) -> Diffusion:
    """The Diffusion module under a DDP or DeepSpeed wrapper (FSDP2 shards in place)."""
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def sample(model: Diffusion, generators: list[torch.Generator], num_inference_steps: int = DEFAULT_SAMPLE_STEPS,
           scheduler: str = "ddim", class_labels: list[int] | None = None) -> torch.Tensor:
    """One image per generator, in [-1, 1].

    The same computation as diffusers' DDPMPipeline / DDIMPipeline (eta 0), one generator per
    image: an image depends only on its own seed, never on what else is in the batch.
    """
    return denoise(model.unet, model.noise_scheduler.config, generators, num_inference_steps, scheduler, class_labels)


def denoise(unet: UNet2DModel, scheduler_config, generators, num_inference_steps: int, scheduler: str, class_labels=None) -> torch.Tensor:
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    sampler = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[scheduler].from_config(scheduler_config)
    sampler.set_timesteps(num_inference_steps)
    config = unet.config
    shape = (len(generators), config.in_channels, config.sample_size, config.sample_size)
    if config.num_class_embeds and class_labels is None:
        class_labels = [i % config.num_class_embeds for i in range(len(generators))]  # a grid shows every class in turn
    labels = torch.tensor(class_labels, device=unet.device) if config.num_class_embeds else None
    image = randn_tensor(shape, generator=generators, device=unet.device, dtype=unet.dtype)
    for t in sampler.timesteps:
        noise = unet(image, t, class_labels=labels).sample
        image = sampler.step(noise, t, image, generator=generators).prev_sample
    return image.float().clamp(-1, 1)


def save_pretrained(model: Diffusion, directory) -> None:
    """diffusers' own layout (model_index.json, unet/, scheduler/, safetensors): loads with
    `DDPMPipeline.from_pretrained(directory)` or `DDIMPipeline.from_pretrained(directory)`."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=model.unet, scheduler=model.noise_scheduler).save_pretrained(directory)


def from_pretrained(directory) -> Diffusion:
    from diffusers import DDPMScheduler, UNet2DModel

    return Diffusion(UNet2DModel.from_pretrained(directory, subfolder="unet"), DDPMScheduler.from_pretrained(directory, subfolder="scheduler"))


FAMILY = ModelFamily(name="diffusion", build=build, compute_loss=compute_loss, flavors=FLAVORS, data=("image",), task="images",
                     shard_classes=shard_classes, sample=sample, save_pretrained=save_pretrained, from_pretrained=from_pretrained,
                     artifact_index=ARTIFACT_INDEX, extra_model_keys=("num_train_timesteps", "beta_schedule", "class_conditional"),
                     sample_options=("num_inference_steps", "scheduler"))
