"""The autoencoder trio (convolutional, fully connected, variational) and a small
discriminator for the optional adversarial term.

Every model maps float images N×C×H×W in [0, 1] to :class:`Reconstruction` (images in
[0, 1] through a sigmoid, plus the per-image KL divergence for the VAE, else ``None``).
No batch normalisation: a reconstruction never depends on the other images in the batch.

The convolutional decoders upsample in one of two ways (``upsample``): ``transpose``
(stride-2 4×4 transposed convolutions) or ``nearest`` (nearest-neighbour ×2 resize, then
a 3×3 convolution: the "resize-convolution" of Odena et al. 2016, "Deconvolution and
Checkerboard Artifacts", Distill). Transposed convolutions readily learn checkerboard
patterns; a loss that does not see them (e.g. a deep-feature loss whose network starts
with a stride-2 convolution) never removes them, a resize-convolution cannot make them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from generation.config import ARCHITECTURES, UPSAMPLING


@dataclass
class Reconstruction:
    """``images``: N×C×H×W in [0, 1]; ``kl``: N per-image KL(q(z|x) ‖ N(0, I)) or None."""

    images: torch.Tensor
    kl: torch.Tensor | None = None


def _halvings(size: int) -> int:
    """Stride-2 stages until the feature map side is ≤ 4 or odd."""
    count = 0
    while size % 2 == 0 and size > 4:
        size //= 2
        count += 1
    return count


class _ConvEncoder(nn.Module):
    def __init__(self, channels: int, size: int, width: int, out_features: int):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, ch = channels, width
        for _ in range(_halvings(size)):
            layers += [nn.Conv2d(in_ch, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            in_ch, ch = ch, min(ch * 2, width * 8)
        self.features = nn.Sequential(*layers)
        side = size >> _halvings(size)
        self.flat = in_ch * side * side
        self.head = nn.Linear(self.flat, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _upsampling_layer(in_ch: int, out_ch: int, upsample: str) -> nn.Module:
    """Doubles the feature map side: transposed conv (4×4, stride 2) or resize + 3×3 conv."""
    if upsample == "transpose":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)
    if upsample == "nearest":
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        )
    raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {upsample!r}")


class _ConvDecoder(nn.Module):
    def __init__(
        self, channels: int, size: int, width: int, latent: int, upsample: str = "transpose"
    ):
        super().__init__()
        depth = _halvings(size)
        widths = [min(width * 2**i, width * 8) for i in range(depth)]
        self.side = size >> depth
        self.start = widths[-1] if widths else width
        self.fc = nn.Linear(latent, self.start * self.side * self.side)
        layers: list[nn.Module] = [nn.LeakyReLU(0.2)]
        in_ch = self.start
        for ch in reversed(widths[:-1]):
            layers += [_upsampling_layer(in_ch, ch, upsample), nn.LeakyReLU(0.2)]
            in_ch = ch
        if depth:
            layers.append(_upsampling_layer(in_ch, channels, upsample))
        else:
            layers.append(nn.Conv2d(in_ch, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], self.start, self.side, self.side)
        return torch.sigmoid(self.body(x))


class ConvAutoencoder(nn.Module):
    """Conv encoder (stride-2 4×4 convs, widths ×2 up to 8×width) → latent → mirror
    (upsampling by ``upsample``: ``transpose`` or ``nearest``)."""

    architecture = "conv"

    def __init__(
        self,
        channels: int,
        size: int,
        latent: int = 64,
        width: int = 32,
        upsample: str = "transpose",
    ):
        super().__init__()
        self.encoder = _ConvEncoder(channels, size, width, latent)
        self.decoder = _ConvDecoder(channels, size, width, latent, upsample)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Reconstruction:
        return Reconstruction(self.decoder(self.encoder(x)))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).images


class FCAutoencoder(nn.Module):
    """Fully connected: C·H·W → 16·width → 8·width → latent → 8·width → 16·width → C·H·W."""

    architecture = "fc"

    def __init__(
        self,
        channels: int,
        size: int,
        latent: int = 64,
        width: int = 32,
        upsample: str = "transpose",
    ):
        super().__init__()  # ``upsample`` is accepted for a uniform signature; no convolutions
        pixels = channels * size * size
        self.shape = (channels, size, size)
        self.encoder = nn.Sequential(
            nn.Flatten(),
            nn.Linear(pixels, 16 * width),
            nn.LeakyReLU(0.2),
            nn.Linear(16 * width, 8 * width),
            nn.LeakyReLU(0.2),
            nn.Linear(8 * width, latent),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, 8 * width),
            nn.LeakyReLU(0.2),
            nn.Linear(8 * width, 16 * width),
            nn.LeakyReLU(0.2),
            nn.Linear(16 * width, pixels),
        )

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Reconstruction:
        flat = self.decoder(self.encoder(x))
        return Reconstruction(torch.sigmoid(flat).view(x.shape[0], *self.shape))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).images


class VariationalAutoencoder(nn.Module):
    """Conv VAE: encoder → (μ, log σ²); z = μ + σ·ε while training (ε from ``generator``);
    reconstruction from z; ``kl`` = ½ Σ (μ² + σ² − log σ² − 1) per image (nats).

    ``noise_shard = (rank, world)``: ε is drawn for the whole global batch (``world`` ×
    this batch) and this process takes rows ``rank::world`` — the rows its images have in
    the global batch — so data-parallel ranks together use the noise one process would."""

    architecture = "vae"
    noise_shard = (0, 1)

    def __init__(
        self,
        channels: int,
        size: int,
        latent: int = 64,
        width: int = 32,
        upsample: str = "transpose",
    ):
        super().__init__()
        self.latent = latent
        self.encoder = _ConvEncoder(channels, size, width, 2 * latent)
        self.decoder = _ConvDecoder(channels, size, width, latent, upsample)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Reconstruction:
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        if self.training:
            rank, world = self.noise_shard
            shape = (mu.shape[0] * world, *mu.shape[1:])
            noise = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
            noise = noise[rank::world]
            z = mu + torch.exp(0.5 * logvar) * noise
        else:
            z = mu
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=1)
        return Reconstruction(self.decoder(z), kl)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction from the posterior mean."""
        mu, _ = self.encoder(x).chunk(2, dim=1)
        return self.decoder(mu)

    def posterior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) per image, nats: the rate the model spends on each image."""
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=1)


class Discriminator(nn.Module):
    """Small conv critic for the adversarial term: N×C×H×W in [0, 1] → N logits."""

    def __init__(self, channels: int, size: int, width: int = 16):
        super().__init__()
        self.body = _ConvEncoder(channels, size, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2.0 - 1.0).squeeze(1)


MODELS = {"conv": ConvAutoencoder, "fc": FCAutoencoder, "vae": VariationalAutoencoder}


def build_model(
    architecture: str,
    *,
    channels: int,
    size: int,
    latent: int,
    width: int,
    upsample: str = "transpose",
) -> nn.Module:
    """An autoencoder by name (``conv``, ``fc``, ``vae``); ``upsample`` (``transpose`` or
    ``nearest``) picks the conv decoders' upsampling layers (ignored by ``fc``)."""
    if architecture not in MODELS:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    if upsample not in UPSAMPLING:
        raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {upsample!r}")
    return MODELS[architecture](channels, size, latent=latent, width=width, upsample=upsample)
