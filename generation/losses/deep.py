"""Deep-feature losses: the LPIPS recipe (Zhang et al. 2018) on frozen backbones.

distance = Σ_layers mean_space Σ_channels w_l,c · (f̂ − f)², where f, f̂ are the backbone's
features of target and prediction at that tap, unit-normalised along channels
(f/(‖f‖ + 1e-10)), and w_l ≥ 0 are per-channel weights (LPIPS's 1×1 "lin" layers).

- ``lpips-alex``, ``lpips-vgg``, ``lpips-squeeze``: inputs mapped to [−1, 1] then
  (x − shift)/scale with shift (−.030, −.088, −.188), scale (.458, .448, .450); the
  calibrated linear weights v0.1 are read at run time from the installed ``lpips``
  package (BSD-2; ``linear_weights=`` names another file); the trunk's ImageNet weights
  come from the torch hub cache or ``weights=`` (see :mod:`generation.losses.backbones`).
- ``deep``: EfficientNet-Lite0 with its ImageNet weights from PyPI (offline), taps at the
  ends of its seven stages, uniform weights (w = 1) until calibrated against human data,
  its own input normalisation (255·x − 127)/128.

Backbones stay frozen and in eval mode (also when the loss module is put in training
mode). Greyscale inputs are repeated to three channels. The target's features are
computed without a graph unless the target requires gradients. The backbone runs under
any active autocast; the normalisation and the distance run in float32. The channel
norm is √(Σf² + 1e-20), which equals the LPIPS norm except that all-zero feature vectors
(dead ReLUs) get zero instead of NaN gradients.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from generation.losses import backbones
from generation.losses.base import ImageLoss, full_precision

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
NORM_DELTA = 1e-20


def unit_normalise(features: torch.Tensor) -> torch.Tensor:
    """Unit-normalise N×C×H×W features along C: f/(√(Σf² + 1e-20) + 1e-10)."""
    norm = torch.sqrt(features.square().sum(1, keepdim=True) + NORM_DELTA)
    return features / (norm + NORM_EPS)


def feature_distance(
    prediction_features: Sequence[torch.Tensor],
    target_features: Sequence[torch.Tensor],
    channel_weights: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Σ_l mean_hw Σ_c w_l,c (unit(f̂_l) − unit(f_l))², per image: -> N (float32)."""
    total = None
    for predicted, target, weights in zip(
        prediction_features, target_features, channel_weights, strict=True
    ):
        diff = (
            unit_normalise(full_precision(predicted)) - unit_normalise(full_precision(target))
        ).square()
        value = torch.einsum("nchw,c->n", diff, weights.to(diff.dtype)) / (
            diff.shape[2] * diff.shape[3]
        )
        total = value if total is None else total + value
    return total


def lpips_linear_weights(net: str, path: str | os.PathLike | None = None) -> list[torch.Tensor]:
    """The calibrated LPIPS v0.1 channel weights for ``net`` (one 1-D tensor per layer).

    Read from the installed ``lpips`` package (``lpips/weights/v0.1/<net>.pth``) unless
    ``path`` names another file with the same keys (``lin{k}.model.1.weight``)."""
    if path is None:
        spec = importlib.util.find_spec("lpips")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"lpips-{net} needs the calibrated linear weights the 'lpips' package ships: "
                "pip install lpips==0.1.4, or pass linear_weights='/path/to/<net>.pth'"
            )
        path = Path(spec.submodule_search_locations[0]) / "weights" / "v0.1" / f"{net}.pth"
    state = backbones.load_state_dict_file(path, f"LPIPS linear weights for {net}")
    channels = backbones.TRUNKS[net].channels
    weights = []
    for index, count in enumerate(channels):
        key = f"lin{index}.model.1.weight"
        if key not in state or state[key].numel() != count:
            raise ValueError(f"{path}: expected {key} with {count} weights for lpips-{net}")
        weights.append(state[key].reshape(count).float())
    return weights


class FeatureDistanceLoss(ImageLoss):
    """The LPIPS recipe on any frozen backbone (list of taps) with fixed channel weights."""

    def __init__(
        self,
        backbone: nn.Module,
        channel_weights: Sequence[torch.Tensor],
        normalise: Callable[[torch.Tensor], torch.Tensor],
    ):
        super().__init__()
        self.backbone = backbones.freeze(backbone)
        self.normalise = normalise
        for index, weights in enumerate(channel_weights):
            self.register_buffer(f"channel_weights_{index}", weights.detach().clone().float())
        self.layers = len(channel_weights)

    @property
    def channel_weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"channel_weights_{index}") for index in range(self.layers)]

    def train(self, mode: bool = True):
        """Training mode for the module; the backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone taps of images N×C×H×W in [0, 1] (C = 1 is repeated to 3)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.backbone(self.normalise(images))

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
            target_features = self.features(target)
        prediction_features = self.features(prediction)
        with torch.autocast(prediction.device.type, enabled=False):
            return feature_distance(prediction_features, target_features, self.channel_weights)


def lpips_normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> LPIPS network input: 2x − 1, then (· − shift)/scale per channel."""
    shift = torch.tensor(LPIPS_SHIFT, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    scale = torch.tensor(LPIPS_SCALE, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (2 * x - 1 - shift) / scale


class LPIPSLoss(FeatureDistanceLoss):
    """LPIPS v0.1 distance with the calibrated linear weights; ``net`` in alex, vgg, squeeze."""

    def __init__(
        self,
        net: str = "alex",
        weights: str | os.PathLike | None = None,
        linear_weights: str | os.PathLike | None = None,
    ):
        if net not in backbones.TRUNKS:
            raise ValueError(
                f"unknown LPIPS network {net!r}; accepted: {', '.join(backbones.TRUNKS)}"
            )
        super().__init__(
            backbones.torchvision_backbone(net, weights),
            lpips_linear_weights(net, linear_weights),
            lpips_normalise,
        )
        self.net = net
        self.name = f"lpips-{net}"
        self.min_size = backbones.TRUNKS[net].min_size

    def extra_repr(self) -> str:
        return f"net={self.net!r}"


class LPIPSAlexLoss(LPIPSLoss):
    """LPIPS on AlexNet (relu1–5)."""

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        linear_weights: str | os.PathLike | None = None,
    ):
        super().__init__("alex", weights, linear_weights)


class LPIPSVGGLoss(LPIPSLoss):
    """LPIPS on VGG16 (relu1_2, 2_2, 3_3, 4_3, 5_3)."""

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        linear_weights: str | os.PathLike | None = None,
    ):
        super().__init__("vgg", weights, linear_weights)


class LPIPSSqueezeLoss(LPIPSLoss):
    """LPIPS on SqueezeNet1.1 (seven slices)."""

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        linear_weights: str | os.PathLike | None = None,
    ):
        super().__init__("squeeze", weights, linear_weights)


class DeepLoss(FeatureDistanceLoss):
    """The LPIPS recipe on EfficientNet-Lite0 (offline ImageNet weights), uniform weights."""

    name = "deep"
    min_size = backbones.EFFICIENTNET_MIN_SIZE

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__(
            backbones.efficientnet_lite0_backbone(weights),
            [torch.ones(count) for count in backbones.EFFICIENTNET_CHANNELS],
            backbones.efficientnet_lite0_normalise,
        )
