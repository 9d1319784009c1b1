"""Every image loss in one registry: ``build_loss(name_or_spec, **options)``.

``build_loss("l2")`` returns an ``nn.Module``; ``module(prediction, target)`` on float
tensors N×C×H×W in [0, 1] (C = 1 or 3) returns N per-image distances (lower = more
similar), differentiable in the prediction. ``available_losses()`` maps each name to a
one-line description. A composite spec such as ``"l2:1.0,deep:0.1"`` (or the mapping
``{"l2": 1.0, "deep": {"weight": 0.1, **options}}``) builds a weighted sum of registered
losses (:class:`CompositeLoss`), so DeePSiM-style mixtures are configuration, not code.

Bad input (unknown name, bad option, malformed spec) raises ``ValueError`` naming the
problem and the accepted values. Modules are imported lazily, so building ``l2`` does
not import torchvision.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from generation.losses.base import ImageLoss, check_images, full_precision
from generation.losses.fitted import FITTABLE_LOSSES, apply_fitted, read_fitted

__all__ = [
    "CompositeLoss",
    "ImageLoss",
    "available_losses",
    "build_loss",
    "check_images",
    "parse_spec",
]

# name -> ("module:Class", one-line description)
_REGISTRY: dict[str, tuple[str, str]] = {
    "l1": ("generation.losses.pixel:L1Loss", "mean absolute pixel difference"),
    "l2": ("generation.losses.pixel:L2Loss", "mean squared pixel difference"),
    "ssim": ("generation.losses.ssim:SSIMLoss", "1 − SSIM (Gaussian window 11, σ 1.5)"),
    "msssim": (
        "generation.losses.ssim:MSSSIMLoss",
        "1 − MS-SSIM (5 scales; fewer, renormalised, on small images)",
    ),
    "watson-dct": (
        "generation.losses.watson:WatsonDCTLoss",
        "Watson's perceptual model on 8×8 block DCT (learnable, Czolbe et al. 2020)",
    ),
    "watson-dft": (
        "generation.losses.watson:WatsonDFTLoss",
        "Watson's perceptual model on 8×8 block DFT amplitudes + phase (learnable)",
    ),
    "deep": (
        "generation.losses.deep:DeepLoss",
        "LPIPS recipe on EfficientNet-Lite0 features (offline ImageNet weights, uniform)",
    ),
    "lpips-alex": (
        "generation.losses.deep:LPIPSAlexLoss",
        "LPIPS v0.1 on AlexNet (calibrated; ImageNet weights from torch cache or weights=)",
    ),
    "lpips-vgg": (
        "generation.losses.deep:LPIPSVGGLoss",
        "LPIPS v0.1 on VGG16 (calibrated; ImageNet weights from torch cache or weights=)",
    ),
    "lpips-squeeze": (
        "generation.losses.deep:LPIPSSqueezeLoss",
        "LPIPS v0.1 on SqueezeNet1.1 (calibrated; ImageNet weights from torch cache or weights=)",
    ),
}


def available_losses() -> dict[str, str]:
    """Registered loss names mapped to a one-line description each."""
    return {name: description for name, (_, description) in _REGISTRY.items()}


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _loss_class(name: str) -> type[nn.Module]:
    key = _normalise_name(name)
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown loss {name!r}; accepted names: {', '.join(_REGISTRY)} "
            "(or a weighted spec such as 'l2:1.0,deep:0.1')"
        )
    module_name, attribute = _REGISTRY[key][0].split(":")
    return getattr(importlib.import_module(module_name), attribute)


def _accepted_options(cls: type) -> list[str] | None:
    """Keyword options of ``cls.__init__``; None when it takes arbitrary ``**kwargs``."""
    if cls.__init__ is nn.Module.__init__:
        return []
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def _build_single(name: str, options: Mapping[str, Any]) -> nn.Module:
    weights = options.get("weights")
    if weights is not None and _normalise_name(name) in FITTABLE_LOSSES:
        backbone_weights = "weights" in (_accepted_options(_loss_class(name)) or ["weights"])
        # deep/lpips-*: a missing file is the backbone's problem (its message says which file)
        fitted = None if backbone_weights and not Path(weights).is_file() else read_fitted(weights)
        if fitted is not None:
            return _build_fitted(name, options, fitted, weights)
        if not backbone_weights:
            raise ValueError(
                f"{weights} is not a fitted-loss file (written by `pstudy losses fit`); "
                f"loss {name!r} takes weights= only for fitted parameters"
            )
    cls = _loss_class(name)
    accepted = _accepted_options(cls)
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"loss {name!r} got unknown option(s) {', '.join(unknown)}; accepted options: "
                f"{', '.join(accepted) if accepted else '(none)'}"
            )
    try:
        return cls(**options)
    except TypeError as error:  # e.g. a string where a number belongs
        raise ValueError(f"loss {name!r}: bad option value ({error}); options: {options}") from None


def _build_fitted(
    name: str, options: Mapping[str, Any], fitted: dict[str, Any], path: Any
) -> nn.Module:
    """The loss ``name`` with the fitted tensors of ``path`` (options: the file's, then the
    caller's other options)."""
    if fitted["loss"] != _normalise_name(name):
        raise ValueError(
            f"{path} holds parameters fitted for {fitted['loss']!r}, not {name!r}; build "
            f"{fitted['loss']!r} with it or fit {name!r} with `pstudy losses fit --loss {name}`"
        )
    rest = {key: value for key, value in options.items() if key != "weights"}
    if "trunk_weights" in rest:  # deep/lpips-*: the backbone file, next to the fitted one
        rest["weights"] = rest.pop("trunk_weights")
    module = _build_single(name, {**fitted["options"], **rest})
    return apply_fitted(module, fitted, path)


def _parse_weight(text: Any, name: str) -> float:
    try:
        weight = float(text)
    except (TypeError, ValueError):
        raise ValueError(
            f"weight of {name!r} must be a number, got {text!r} (spec format 'l2:1.0,deep:0.1')"
        ) from None
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight of {name!r} must be finite and >= 0, got {weight}")
    return weight


def parse_spec(spec: str | Mapping[str, Any]) -> list[tuple[str, float, dict[str, Any]]]:
    """Parse a composite spec into ``[(name, weight, options), ...]``.

    ``spec`` is either a string ``"name[:weight],name[:weight],..."`` (weight defaults to
    1) or a mapping ``{name: weight}`` / ``{name: {"weight": w, **options}}``.
    """
    entries: list[tuple[str, float, dict[str, Any]]] = []
    if isinstance(spec, Mapping):
        items = list(spec.items())
        if not items:
            raise ValueError("empty loss spec; give at least one name, e.g. {'l2': 1.0}")
        for raw_name, value in items:
            if isinstance(value, Mapping):
                options = dict(value)
                weight = _parse_weight(options.pop("weight", 1.0), raw_name)
            else:
                options, weight = {}, _parse_weight(value, raw_name)
            entries.append((str(raw_name), weight, options))
    elif isinstance(spec, str):
        parts = [part.strip() for part in spec.split(",")]
        if not spec.strip() or any(not part for part in parts):
            raise ValueError(
                f"malformed loss spec {spec!r}; expected 'name[:weight],...' such as "
                "'l2:1.0,deep:0.1'"
            )
        for part in parts:
            raw_name, _, weight_text = part.partition(":")
            weight = _parse_weight(weight_text, raw_name) if weight_text.strip() else 1.0
            entries.append((raw_name.strip(), weight, {}))
    else:
        raise ValueError(
            f"loss spec must be a name, a 'name:weight,...' string or a mapping, got "
            f"{type(spec).__name__}"
        )
    seen: set[str] = set()
    for name, _, _ in entries:
        _loss_class(name)  # unknown names fail here, before anything is built
        key = _normalise_name(name)
        if key in seen:
            raise ValueError(f"loss {name!r} appears twice in the spec; give each loss once")
        seen.add(key)
    return [(_normalise_name(name), weight, options) for name, weight, options in entries]


class CompositeLoss(ImageLoss):
    """Weighted sum of registered losses: Σ_k weight_k · loss_k(prediction, target).

    ``terms(prediction, target)`` returns the unweighted per-image distance of each part
    (name -> tensor N), e.g. for logging.
    """

    name = "composite"

    def __init__(self, parts: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        if not parts:
            raise ValueError("a composite loss needs at least one part")
        self.parts = nn.ModuleDict(dict(parts))
        self.weights = {name: float(weights[name]) for name in parts}
        self.min_size = max(getattr(part, "min_size", 1) for part in self.parts.values())

    @property
    def spec(self) -> str:
        """The normalised spec string, e.g. ``'l2:1.0,deep:0.1'``."""
        return ",".join(f"{name}:{weight:g}" for name, weight in self.weights.items())

    def terms(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(prediction, target, self.name, self.min_size)
        return {name: part(prediction, target) for name, part in self.parts.items()}

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = None
        for name, part in self.parts.items():
            value = self.weights[name] * full_precision(part(prediction, target))
            total = value if total is None else total + value
        return total

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


def build_loss(name_or_spec: str | Mapping[str, Any], **options: Any) -> nn.Module:
    """Build a loss module from a registered name (with ``options``) or a composite spec.

    ``build_loss("ssim")``, ``build_loss("lpips-alex", weights="alexnet.pth")``,
    ``build_loss("watson-dft", weights="fit/watson-dft.pt")`` (a file written by ``pstudy
    losses fit``: its parameters replace the starting values; for ``deep``/``lpips-*`` a
    fitted file sets the channel weights, any other file is the backbone's weights; with a
    fitted file, ``trunk_weights=`` names the backbone's),
    ``build_loss("l2:1.0,deep:0.1")``, ``build_loss({"l2": 1, "deep": {"weight": 0.1}})``.
    A single name returns that loss's module; a spec with weights or several names returns
    a :class:`CompositeLoss` (options then go per part, in the mapping form).
    """
    if isinstance(name_or_spec, str) and not any(c in name_or_spec for c in ",:"):
        return _build_single(name_or_spec, options)
    if options:
        raise ValueError(
            f"options {', '.join(sorted(options))} cannot apply to the composite spec "
            f"{name_or_spec!r}; give them per part in the mapping form, e.g. "
            "{'l2': 1.0, 'lpips-alex': {'weight': 0.1, 'weights': 'alexnet.pth'}}"
        )
    entries = parse_spec(name_or_spec)
    parts = {name: _build_single(name, part_options) for name, _, part_options in entries}
    return CompositeLoss(parts, {name: weight for name, weight, _ in entries})
