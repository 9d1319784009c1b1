"""The degeneracy guard: is a condition's set of reconstructions usable as stimuli?

A loss, a weight or a starting parameter that does not suit training gives stimuli that
look alike whatever the loss (flat colour, the same image for every input, black) or
show the training's artefacts rather than the loss's (8-px block grids, checkerboards).
A study on such stimuli measures nothing. :func:`check_reconstructions` compares one
condition's reconstructions of the test images with the references and with two simple
baselines, and names each failure with its likely fix:

``nonfinite``
    NaN or ±inf in the model's output (before quantisation).
``flat``
    the images have almost no spatial contrast: median over images of the spatial
    standard deviation of the reconstruction / that of its reference < ``FLAT_RATIO``.
``same_for_all``
    (nearly) one image for every input: the variance across images of each pixel,
    averaged, is < ``SAME_RATIO`` × the references' (posterior collapse).
``no_content``
    not closer to the references than a *heavily blurred* reference is, by a wide
    margin: with the mean test image as the zero-information baseline, the
    reconstruction recovers less than ``CONTENT_SHARE`` of the MSE improvement that a
    Gaussian blur of σ = side/8 px (only the coarse layout and colours left) achieves.
``clipped``
    black or saturated: the share of pixels at 0–2 or 253–255 exceeds the references'
    share by more than ``CLIPPED_EXCESS``.
``stamped``
    the same fine pattern on every image, whatever the input (a texture or lattice the
    decoder draws everywhere): of the fine detail (image − its Gaussian blur, σ = 2 px),
    the share common to all test images (their mean) exceeds ``STAMPED_SHARE`` and the
    references' share by ``STAMPED_EXCESS`` (independent images share ~1/N), with an rms
    of at least ``GRID_MIN_LEVELS`` grey levels.
``grid``
    periodic artefacts with period 8 px (block grids) or 2 px (checkerboards): of the
    high-pass energy (image − its Gaussian blur, σ = 1 px) the share that repeats from
    one 8×8 tile to the next (the tile-averaged pattern) exceeds ``GRID_SHARE`` and the
    references' share by ``GRID_EXCESS``, with an rms amplitude of at least
    ``GRID_MIN_LEVELS`` grey levels. Natural images put ~1/K of that energy (K tiles per
    image) in the repeating part.

The thresholds are deliberately loose: they flag what no loss should produce, not
blurry or imperfect reconstructions (tests/test_generation_guard.py feeds synthetic
degenerate and healthy sets; docs/generation.md lists the values measured on real runs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

FLAT_RATIO = 0.2
SAME_RATIO = 0.1
CONTENT_SHARE = 0.25
CLIPPED_EXCESS = 0.3
STAMPED_SHARE = 0.4
STAMPED_EXCESS = 0.25
GRID_SHARE = 0.35
GRID_EXCESS = 0.2
GRID_MIN_LEVELS = 2.0
TILE = 8

KINDS = ("nonfinite", "flat", "same_for_all", "no_content", "clipped", "stamped", "grid")

_COLLAPSE_FIX = (
    "the model learned an average image: train longer (train.steps) or raise train.lr, and "
    "check the loss's starting parameters (Watson: loss_options.start: calibrated); for a "
    "VAE train at equal rate (train.kl_target) instead of a fixed recon_weight"
)
_VAE_COLLAPSE_FIX = (
    "posterior collapse (the KL outweighs the reconstruction): train at equal rate with "
    "train.kl_target (e.g. 800 nats per 64×64 image, as the paper preset) instead of a fixed "
    "recon_weight, or raise recon_weight; under kl_target, train longer or raise the target"
)
FIXES = {
    "nonfinite": "training diverged: lower train.lr and check the loss for NaN on this data",
    "flat": _COLLAPSE_FIX,
    "same_for_all": _COLLAPSE_FIX,
    "no_content": _COLLAPSE_FIX,
    "clipped": (
        "black or saturated output: the loss rewards extreme values; for watson-* use the "
        "calibrated starting parameters (loss_options.start: calibrated, the default), "
        "otherwise lower train.lr"
    ),
    "stamped": (
        "a texture independent of the input: use model.upsample: nearest (resize-convolution "
        "decoder); for watson-* loss_options: {shift_augment: true}; train longer or lower "
        "train.lr"
    ),
    "grid": (
        "block-grid or checkerboard artefacts: use model.upsample: nearest (resize-"
        "convolution decoder) and, for watson-*, loss_options: {shift_augment: true}"
    ),
}


@dataclass
class Problem:
    kind: str
    message: str
    fix: str


@dataclass
class Verdict:
    """The guard's result for one condition; ``stats`` holds every measured value."""

    ok: bool
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return [problem.kind for problem in self.problems]

    def summary(self) -> str:
        """``ok`` or ``DEGENERATE (flat, same_for_all)``."""
        return "ok" if self.ok else f"DEGENERATE ({', '.join(self.kinds)})"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite statistics become None)."""
        data = asdict(self)
        data["verdict"] = self.summary()
        data["stats"] = {
            key: (value if math.isfinite(value) else None) for key, value in self.stats.items()
        }
        return data


def _as_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders (window ±3σ, at most the side)."""
    n, c, h, w = images.shape
    radius = max(1, min(int(math.ceil(3 * sigma)), min(h, w) - 1))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.device)
    flat = images.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def periodic_share(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the share of high-pass energy in the 8×8-tile-periodic pattern, and that
    pattern's rms amplitude (grey levels). Images are cropped to multiples of 8 px."""
    n, c, h, w = images.shape
    h8, w8 = h // TILE * TILE, w // TILE * TILE
    residual = images - _gaussian_blur(images, 1.0)
    residual = residual[..., :h8, :w8]
    tiles = residual.reshape(n, c, h8 // TILE, TILE, w8 // TILE, TILE)
    pattern = tiles.mean(dim=(2, 4))  # N×C×8×8, the part that repeats in every tile
    periodic = pattern.square().mean(dim=(1, 2, 3))
    total = residual.square().mean(dim=(1, 2, 3))
    share = periodic / total.clamp_min(1e-12)
    return share, periodic.sqrt() * 255.0


def common_detail(images: torch.Tensor) -> tuple[float, float]:
    """The share of the fine detail (image − Gaussian blur σ = 2 px) that all images have
    in common (their mean), and that common part's rms in grey levels."""
    detail = images - _gaussian_blur(images, 2.0)
    common = detail.mean(0)
    share = common.square().mean() / detail.square().mean().clamp_min(1e-12)
    return float(share), float(common.square().mean().sqrt()) * 255.0


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().flatten(1).mean(1)


def check_reconstructions(
    references: torch.Tensor,
    reconstructions: torch.Tensor,
    *,
    nonfinite: int | None = None,
    architecture: str | None = None,
) -> Verdict:
    """The guard's verdict on one condition.

    ``references`` and ``reconstructions``: N×C×H×W, uint8 or float in [0, 1], the same
    test images in the same order (N ≥ 2 for the across-image checks). ``nonfinite``:
    count of NaN/inf values in the model's output before quantisation (uint8 stimuli
    cannot show them); float ``reconstructions`` are also checked directly.
    ``architecture`` (``vae``, ``conv``, ``fc``) only tailors the suggested fixes.
    """
    if references.shape != reconstructions.shape or references.dim() != 4:
        raise ValueError(
            f"references {tuple(references.shape)} and reconstructions "
            f"{tuple(reconstructions.shape)} must be the same N×C×H×W"
        )
    ref = _as_float(references).cpu()
    rec = _as_float(reconstructions).cpu()
    bad = int((~torch.isfinite(rec)).sum()) + int(nonfinite or 0)
    stats: dict[str, float] = {"nonfinite": float(bad)}
    problems: list[Problem] = []

    def fail(kind: str, message: str) -> None:
        fix = FIXES[kind]
        if architecture == "vae" and fix == _COLLAPSE_FIX:
            fix = _VAE_COLLAPSE_FIX
        problems.append(Problem(kind, message, fix))

    if bad:
        fail("nonfinite", f"{bad} NaN/inf values in the reconstructions")
        rec = torch.nan_to_num(rec, nan=0.0, posinf=1.0, neginf=0.0)
    rec = rec.clamp(0, 1)
    n, _, h, w = ref.shape

    spatial = rec.flatten(2).std(2).mean(1) / ref.flatten(2).std(2).mean(1).clamp_min(1e-6)
    stats["contrast_ratio"] = float(spatial.median())
    if stats["contrast_ratio"] < FLAT_RATIO:
        fail(
            "flat",
            f"flat images: spatial contrast {stats['contrast_ratio']:.2f}× the references' "
            f"(median; healthy > {FLAT_RATIO})",
        )

    if n >= 2:
        across = rec.var(0).mean() / ref.var(0).mean().clamp_min(1e-12)
        stats["across_image_ratio"] = float(across)
        if stats["across_image_ratio"] < SAME_RATIO:
            fail(
                "same_for_all",
                f"(nearly) the same image for every input: variation across images "
                f"{stats['across_image_ratio']:.3f}× the references' (healthy > {SAME_RATIO})",
            )

    mean_image = ref.mean(0, keepdim=True).expand_as(ref)
    blurred = _gaussian_blur(ref, max(h, w) / 8)
    mse_mean, mse_blur, mse_rec = _mse(mean_image, ref), _mse(blurred, ref), _mse(rec, ref)
    to_db = lambda mse: float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())  # noqa: E731
    stats["psnr"] = to_db(mse_rec)
    stats["psnr_mean_image"] = to_db(mse_mean)
    stats["psnr_blurred_reference"] = to_db(mse_blur)
    gain_blur = float((mse_mean - mse_blur).mean())
    if gain_blur > 0:
        share = float((mse_mean - mse_rec).mean()) / gain_blur
        stats["content_share"] = share
        if share < CONTENT_SHARE:
            fail(
                "no_content",
                f"no image content: {share:.2f} of the improvement over the mean image that "
                f"a σ = {max(h, w) / 8:g} px blur of the reference achieves (healthy > "
                f"{CONTENT_SHARE}); PSNR {stats['psnr']:.1f} dB vs mean image "
                f"{stats['psnr_mean_image']:.1f} dB, blurred reference "
                f"{stats['psnr_blurred_reference']:.1f} dB",
            )

    low, high = 2.5 / 255, 252.5 / 255
    clipped_rec = float(((rec <= low) | (rec >= high)).float().mean())
    clipped_ref = float(((ref <= low) | (ref >= high)).float().mean())
    stats["clipped_share"], stats["clipped_share_reference"] = clipped_rec, clipped_ref
    if clipped_rec - clipped_ref > CLIPPED_EXCESS:
        dark = float((rec <= low).float().mean())
        what = "black" if dark >= clipped_rec / 2 else "saturated"
        fail(
            "clipped",
            f"{what} output: {clipped_rec:.0%} of the pixels at 0–2 or 253–255 against "
            f"{clipped_ref:.0%} in the references",
        )

    if n >= 2:
        share, amplitude = common_detail(rec)
        stats["stamped_share"], stats["stamped_rms_levels"] = share, amplitude
        stats["stamped_share_reference"], _ = common_detail(ref)
        limit = max(STAMPED_SHARE, stats["stamped_share_reference"] + STAMPED_EXCESS)
        if share > limit and amplitude >= GRID_MIN_LEVELS:
            fail(
                "stamped",
                f"the same fine pattern on every image: {share:.0%} of the fine detail is common "
                f"to all {n} images (references: {stats['stamped_share_reference']:.0%}), rms "
                f"{amplitude:.1f} grey levels",
            )

    if min(h, w) >= 2 * TILE:
        share_rec, amplitude = periodic_share(rec)
        share_ref, _ = periodic_share(ref)
        stats["grid_share"] = float(share_rec.median())
        stats["grid_share_reference"] = float(share_ref.median())
        stats["grid_rms_levels"] = float(amplitude.median())
        if (
            stats["grid_share"] > max(GRID_SHARE, stats["grid_share_reference"] + GRID_EXCESS)
            and stats["grid_rms_levels"] >= GRID_MIN_LEVELS
        ):
            fail(
                "grid",
                f"8-px grid / checkerboard artefacts: {stats['grid_share']:.0%} of the fine "
                f"detail repeats in every 8×8 tile (references: "
                f"{stats['grid_share_reference']:.0%}), rms {stats['grid_rms_levels']:.1f} "
                "grey levels",
            )
    return Verdict(not problems, problems, stats)


def flagged(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Manifest condition entries whose guard verdict failed: name -> guard record."""
    return {
        c["name"]: c["guard"]
        for c in conditions
        if isinstance(c.get("guard"), dict) and c["guard"].get("ok") is False
    }
