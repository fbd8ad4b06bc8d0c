"""Variational autoencoder (Kingma & Welling, 2014): a convolutional encoder gives the mean and
log-variance of a diagonal Gaussian q(z|x) over `latent_dim` latents, a sample of it
(reparameterised, so gradients flow through) is decoded back to the image, and training minimises
the negative ELBO per image:

    loss = recon_loss + model.kl_weight * kl      (kl_weight != 1: a beta-VAE, Higgins et al., 2017)
    recon_loss = -log p(x|z), a Gaussian with mean decoder(z) (tanh, in [-1, 1]) and fixed
                 standard deviation PIXEL_STD, summed over pixels and channels, without the constant
                 log-normaliser (so it is >= 0)
    kl = KL(q(z|x) || N(0, I)), summed over latents

Sums, not means: the ELBO's own scale, so kl_weight 1 is the true bound whatever the image size.
Evaluation too draws one z per image (a one-sample estimate of the bound). Sampling decodes
z ~ N(0, I) and returns the decoder's mean image, in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from dlray.models.convnets import Decoder, Down, Encoder, Up, image_side, latents
from dlray.models.family import ModelFamily

# widths: channels after each halving of the resolution (the decoder mirrors them).
FLAVORS = {
    "debug": {"widths": (32, 64), "latent_dim": 8},  # 16x16 digits on CPU (16 latents: noisier samples)
    "small": {"widths": (64, 128, 256), "latent_dim": 64},  # 32x32
    "base": {"widths": (64, 128, 256, 512), "latent_dim": 128},  # 64x64
}
METRICS = ("recon_loss", "kl")
OPTIMIZERS = ("model",)
SHARD_CLASSES = (Down, Up)
# In [-1, 1] units (0.15 of the [0, 1] range). A smaller one buys sharper reconstructions with
# latents that stray further from N(0, I), so noisier samples; 0.3 gave the cleanest digits.
PIXEL_STD = 0.3


class VAE(nn.Module):
    def __init__(self, *, widths, latent_dim: int, channels: int, side: int, kl_weight: float):
        super().__init__()
        self.encoder = Encoder(channels, side, widths, 2 * latent_dim)  # mean and log-variance
        self.decoder = Decoder(latent_dim, channels, side, widths)
        self.latent_dim, self.kl_weight = latent_dim, kl_weight

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image losses of `images` in [-1, 1]. The whole loss is computed here so that a DDP,
        FSDP or DeepSpeed wrapper sees one forward per backward."""
        mean, logvar = self.encoder(images).float().chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        # Drawn in fp32 and cast: FSDP's mixed precision hands the decoder bf16 parameters.
        reconstruction = self.decoder(z.to(images.dtype)).float()
        recon_loss = ((reconstruction - images.float()) / PIXEL_STD).square().sum(dim=(1, 2, 3)) / 2
        kl = (mean.square() + logvar.exp() - 1 - logvar).sum(dim=1) / 2
        return {"loss": recon_loss + self.kl_weight * kl, "recon_loss": recon_loss, "kl": kl}


def build(model_cfg, data_info) -> VAE:
    """`data_info` needs image_shape (see dlray.data.ImageData)."""
    flavor = FLAVORS[model_cfg["flavor"]]
    side = image_side(model_cfg, data_info["image_shape"], len(flavor["widths"]))
    return VAE(**flavor, channels=data_info["image_shape"][0], side=side, kl_weight=model_cfg["kl_weight"])


def compute_loss(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    images, _ = batch
    return model(images * 2 - 1)


@torch.no_grad()
def sample(model: VAE, generators: list[torch.Generator], **options) -> torch.Tensor:
    """One image per generator, in [-1, 1]. `options` (a diffusion model's steps, scheduler) do not apply."""
    return model.decoder(latents(generators, model.latent_dim, next(model.decoder.parameters()))).float()


FAMILY = ModelFamily(name="vae", build=build, compute_loss=compute_loss, flavors=FLAVORS, data=("image",), task="images",
                     metrics=METRICS, shard_classes=lambda: SHARD_CLASSES, sample=sample, extra_model_keys=("kl_weight",))
