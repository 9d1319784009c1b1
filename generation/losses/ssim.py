"""SSIM and MS-SSIM (Wang, Bovik et al. 2004; Wang, Simoncelli, Bovik 2003) as losses.

Standard definition: Gaussian window of 11 taps with σ = 1.5, "valid" filtering (no
padding), K1 = 0.01, K2 = 0.03, data range 1; MS-SSIM over 5 scales with weights
(0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2×2 average pooling between scales (odd sides
padded as in ``pytorch-msssim``), mean cs at the finer scales and mean l·cs at the
coarsest, combined as Π value_j^{w_j} with values clamped at a tiny positive floor.

Small images (the normal case here: 32×32, 64×64) get a *reduced configuration*, chosen
per image size by :func:`ssim_configuration` and reported by the module's
``configuration`` attribute: MS-SSIM keeps the finest scales at which the 11-tap window
still fits and renormalises their weights to sum 1 (64 px: 3 scales, 32 px: 2 scales);
images smaller than the window use a smaller window with σ scaled by the same factor.
Every option (``window_size``, ``sigma``, ``weights``, ``scales``) can be overridden.
Images with the smaller side ≥ 161 px get the standard 5-scale definition.

All arithmetic runs in float32 (autocast is disabled inside): E[x²] − E[x]² cancels
catastrophically in half precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from generation.losses.base import ImageLoss, full_precision

WINDOW_SIZE = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: floor for the per-scale values before the fractional powers (pytorch-msssim uses relu,
#: whose zero gives NaN gradients through x**w)
POWER_FLOOR = 1e-6
MIN_WINDOW = 3


@dataclass(frozen=True)
class SSIMConfig:
    """The configuration actually used for one image size."""

    window_size: int
    sigma: float
    weights: tuple[float, ...]  # one per scale, finest first; SSIM: (1.0,)
    standard: bool  # True when this is the published standard definition

    @property
    def scales(self) -> int:
        return len(self.weights)

    def as_dict(self) -> dict:
        return asdict(self) | {"scales": self.scales}


def scale_sides(side: int, scales: int) -> list[int]:
    """Image side at each scale with 2×2 average pooling (odd sides padded by one)."""
    sides = [side]
    for _ in range(scales - 1):
        sides.append((sides[-1] + 1) // 2)
    return sides


def ssim_configuration(
    height: int,
    width: int,
    multiscale: bool,
    window_size: int | None = None,
    sigma: float | None = None,
    weights: Sequence[float] | None = None,
    scales: int | None = None,
) -> SSIMConfig:
    """The (possibly reduced) configuration for an image of ``height``×``width`` px.

    Options left at None are chosen automatically: the standard definition where the
    image is large enough, else the reduced one described in the module docstring.
    Explicit options that cannot fit the image raise ``ValueError``.
    """
    side = min(height, width)
    if weights is not None and scales is not None:
        raise ValueError("give either weights or scales for MS-SSIM, not both")
    if weights is not None:
        try:
            weights = tuple(float(w) for w in weights)
        except (TypeError, ValueError):
            raise ValueError(
                f"MS-SSIM weights must be a sequence of numbers, got {weights!r}"
            ) from None
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"MS-SSIM weights must be non-negative with a positive sum, got {weights}"
            )
    if scales is not None and not (1 <= int(scales) <= len(MS_SSIM_WEIGHTS)):
        raise ValueError(f"scales must be between 1 and {len(MS_SSIM_WEIGHTS)}, got {scales}")
    if window_size is not None and (window_size < MIN_WINDOW or window_size % 2 == 0):
        raise ValueError(f"window_size must be odd and >= {MIN_WINDOW}, got {window_size}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")

    window = window_size or WINDOW_SIZE
    if window_size is None and side < WINDOW_SIZE:
        window = side if side % 2 else side - 1
    if window > side:
        raise ValueError(f"window_size {window} does not fit an image of {height}×{width} px")
    window_sigma = sigma if sigma is not None else SIGMA * window / WINDOW_SIZE

    if not multiscale:
        standard = window == WINDOW_SIZE and window_sigma == SIGMA
        return SSIMConfig(window, window_sigma, (1.0,), standard)

    if weights is None:
        count = scales
        if count is None:
            count = len(MS_SSIM_WEIGHTS)
            while scale_sides(side, count)[-1] < window:
                count -= 1
        chosen = MS_SSIM_WEIGHTS[:count]
        weights = tuple(w / sum(chosen) for w in chosen) if count < len(MS_SSIM_WEIGHTS) else chosen
    coarsest = scale_sides(side, len(weights))[-1]
    if coarsest < window:
        raise ValueError(
            f"MS-SSIM with {len(weights)} scales and window {window} needs the smaller image side "
            f"to stay >= {window} px at the coarsest scale (got {coarsest} px from {height}×{width}); "
            "use fewer scales, a smaller window_size, or leave them unset for the automatic "
            "reduced configuration"
        )
    standard = weights == MS_SSIM_WEIGHTS and window == WINDOW_SIZE and window_sigma == SIGMA
    return SSIMConfig(window, window_sigma, weights, standard)


def gaussian_window(size: int, sigma: float, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (float32), centred."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return (window / window.sum()).to(device=device, dtype=torch.float32)


def _separable_filter(maps: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Valid (unpadded) Gaussian filtering of every channel: N×K×H×W -> N×K×(H−w+1)×(W−w+1)."""
    channels, size = maps.shape[1], window.numel()
    vertical = window.view(1, 1, size, 1).repeat(channels, 1, 1, 1)
    horizontal = window.view(1, 1, 1, size).repeat(channels, 1, 1, 1)
    return F.conv2d(F.conv2d(maps, vertical, groups=channels), horizontal, groups=channels)


def ssim_maps_means(
    x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM (l·cs) and mean cs per image and channel (each N×C) at one scale."""
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    # five separate filterings: measured ~2× faster on CPU than one over the 5C-channel concatenation
    mu_x, mu_y = _separable_filter(x, window), _separable_filter(y, window)
    xx, yy, xy = (_separable_filter(m, window) for m in (x * x, y * y, x * y))
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    cs = (2 * (xy - mu_xy) + c2) / ((xx - mu_xx) + (yy - mu_yy) + c2)
    luminance = (2 * mu_xy + c1) / (mu_xx + mu_yy + c1)
    return (luminance * cs).flatten(2).mean(-1), cs.flatten(2).mean(-1)


def ssim(
    x: torch.Tensor, y: torch.Tensor, config: SSIMConfig, data_range: float = 1.0
) -> torch.Tensor:
    """Single-scale SSIM per image (mean over channels): N×C×H×W -> N, in [−1, 1]."""
    x, y = full_precision(x), full_precision(y)
    window = gaussian_window(config.window_size, config.sigma, x.device).to(x.dtype)
    value, _ = ssim_maps_means(x, y, window, data_range)
    return value.mean(1)


def ms_ssim(
    x: torch.Tensor, y: torch.Tensor, config: SSIMConfig, data_range: float = 1.0
) -> torch.Tensor:
    """MS-SSIM per image (mean over channels of the per-channel products): N -> [0, 1]."""
    window = gaussian_window(config.window_size, config.sigma, x.device)
    x, y = full_precision(x), full_precision(y)
    window = window.to(x.dtype)
    values = []
    for scale in range(config.scales):
        full, cs = ssim_maps_means(x, y, window, data_range)
        if scale < config.scales - 1:
            values.append(cs)
            padding = [side % 2 for side in x.shape[-2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=padding)
            y = F.avg_pool2d(y, kernel_size=2, padding=padding)
        else:
            values.append(full)
    stacked = torch.stack(values).clamp(min=POWER_FLOOR)  # scales×N×C
    weights = torch.tensor(config.weights, device=stacked.device).view(-1, 1, 1)
    return stacked.pow(weights).prod(0).mean(1)


class _SSIMBase(ImageLoss):
    multiscale = False
    min_size = 5

    def __init__(
        self,
        window_size: int | None = None,
        sigma: float | None = None,
        data_range: float = 1.0,
    ):
        super().__init__()
        self.window_size, self.sigma, self.data_range = window_size, sigma, float(data_range)
        self.weights: tuple[float, ...] | None = None
        self.scales: int | None = None
        #: the configuration of the last call (None before the first call)
        self.configuration: SSIMConfig | None = None
        self.configuration_for(WINDOW_SIZE * 16 + 1, WINDOW_SIZE * 16 + 1)  # validate options

    def configuration_for(self, height: int, width: int) -> SSIMConfig:
        """The configuration this module uses for images of ``height``×``width`` px."""
        return ssim_configuration(
            height, width, self.multiscale, self.window_size, self.sigma, self.weights, self.scales
        )

    def similarity(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.configuration = self.configuration_for(*prediction.shape[-2:])
        with torch.autocast(prediction.device.type, enabled=False):
            return 1.0 - self.similarity(prediction, target)

    def extra_repr(self) -> str:
        return f"configuration={self.configuration}"


class SSIMLoss(_SSIMBase):
    """1 − SSIM (Gaussian 11-tap window, σ 1.5; smaller window below 11 px)."""

    name = "ssim"

    def similarity(self, prediction, target):
        return ssim(prediction, target, self.configuration, self.data_range)


class MSSSIMLoss(_SSIMBase):
    """1 − MS-SSIM (5 standard scales; fewer, renormalised, on small images)."""

    name = "msssim"
    multiscale = True

    def __init__(
        self,
        window_size: int | None = None,
        sigma: float | None = None,
        weights: Sequence[float] | None = None,
        scales: int | None = None,
        data_range: float = 1.0,
    ):
        super().__init__(window_size, sigma, data_range)
        self.weights, self.scales = weights, scales
        self.configuration_for(1024, 1024)  # validate the options
        self.weights = None if weights is None else tuple(float(w) for w in weights)

    def similarity(self, prediction, target):
        return ms_ssim(prediction, target, self.configuration, self.data_range)
