"""DCGAN (Radford et al., 2016): a generator maps z ~ N(0, I) to an image (tanh, in [-1, 1]) and a
discriminator scores images as real or generated. Both minimise the non-saturating loss of
Goodfellow et al. (2014), each with its own optimizer: on every batch the loop runs the
discriminator's phase, then the generator's (OPTIMIZERS order).

Each phase's whole computation happens in GAN.forward, so a DDP wrapper sees one forward per
backward. No validation score says one GAN is better than another: jobs keep the newest
checkpoints (train.metric: epoch, mode: max), and val_d_real / val_d_fake (the discriminator's
mean probability of "real" on real and on generated images) show the balance of the two players.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from dlray.models.convnets import Decoder, Down, Encoder, Up, image_side, latents
from dlray.models.family import ModelFamily

# widths: the discriminator's channels after each halving of the resolution (the generator mirrors them).
FLAVORS = {
    "debug": {"widths": (32, 64), "latent_dim": 32},  # 16x16 digits on CPU
    "small": {"widths": (64, 128, 256), "latent_dim": 100},  # 32x32
    "base": {"widths": (64, 128, 256, 512), "latent_dim": 100},  # 64x64, DCGAN's sizes
}
METRICS = ("d_loss", "g_loss", "d_real", "d_fake")
OPTIMIZERS = ("discriminator", "generator")
SHARD_CLASSES = (Down, Up)


class GAN(nn.Module):
    def __init__(self, *, widths, latent_dim: int, channels: int, side: int):
        super().__init__()
        self.generator = Decoder(latent_dim, channels, side, widths)
        self.discriminator = Encoder(channels, side, widths, 1)  # a logit
        self.latent_dim = latent_dim
        # DCGAN's initialisation: with PyTorch's default the discriminator soon wins outright on
        # the small digits set, and the generator's samples stop changing.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, real: torch.Tensor, phase: str | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses of one phase ("discriminator", "generator"), or of both and the
        discriminator's scores (None: evaluation), on `real` images in [-1, 1] and as many fakes."""
        # Drawn in fp32 whatever the precision (the same z under every strategy), then cast:
        # FSDP's mixed precision hands the generator bf16 parameters.
        z = torch.randn(len(real), self.latent_dim, device=real.device).to(real.dtype)
        with torch.no_grad() if phase == "discriminator" else nullcontext():  # D's step needs no gradient of G
            fake = self.generator(z)
        if phase == "generator":
            return {"loss": F.softplus(-self.discriminator(fake).float().squeeze(1))}  # -log D(G(z))
        # One pass over real and fake together: GroupNorm is per-sample, so this scores each as alone.
        real_logit, fake_logit = self.discriminator(torch.cat([real, fake])).float().squeeze(1).chunk(2)
        d_loss = F.softplus(-real_logit) + F.softplus(fake_logit)  # -log D(x) - log(1 - D(G(z)))
        if phase == "discriminator":
            return {"loss": d_loss}
        g_loss = F.softplus(-fake_logit)
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss, "d_real": torch.sigmoid(real_logit), "d_fake": torch.sigmoid(fake_logit)}


def build(model_cfg, data_info) -> GAN:
    """`data_info` needs image_shape (see dlray.data.ImageData)."""
    flavor = FLAVORS[model_cfg["flavor"]]
    side = image_side(model_cfg, data_info["image_shape"], len(flavor["widths"]))
    return GAN(**flavor, channels=data_info["image_shape"][0], side=side)


def param_groups(module: GAN) -> list[list[nn.Parameter]]:
    """One parameter list per optimizer, in OPTIMIZERS order."""
    return [list(module.discriminator.parameters()), list(module.generator.parameters())]


def compute_loss(model: nn.Module, batch, phase: str | None = None) -> dict[str, torch.Tensor]:
    images, _ = batch
    return model(images * 2 - 1, phase)


@torch.no_grad()
def sample(model: GAN, generators: list[torch.Generator], **options) -> torch.Tensor:
    """One image per generator, in [-1, 1]. `options` (a diffusion model's steps, scheduler) do not apply."""
    return model.generator(latents(generators, model.latent_dim, next(model.generator.parameters()))).float()


FAMILY = ModelFamily(name="gan", build=build, compute_loss=compute_loss, flavors=FLAVORS, data=("image",), task="images",
                     metrics=METRICS, shard_classes=lambda: SHARD_CLASSES, optimizers=OPTIMIZERS, param_groups=param_groups, sample=sample)
