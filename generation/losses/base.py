"""The common base of every image loss: input validation and the per-image contract.

A loss is an ``nn.Module`` whose ``forward(prediction, target)`` takes two float tensors
N×C×H×W with values in [0, 1] (C = 1 or 3) and returns N per-image distances (lower =
more similar), differentiable in ``prediction``. Subclasses implement ``distance`` and
state the smallest image side they handle in ``min_size``.
"""

from __future__ import annotations

import torch
from torch import nn

ALLOWED_CHANNELS = (1, 3)


def check_images(
    prediction: torch.Tensor, target: torch.Tensor, name: str, min_size: int = 1
) -> None:
    """Raise ``ValueError`` naming the problem when the pair is not a valid image batch."""
    for role, tensor in (("prediction", prediction), ("target", target)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: {role} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(
                f"{name}: {role} must have 4 dims N×C×H×W, got {tensor.dim()} dims "
                f"(shape {tuple(tensor.shape)}); add a batch dim with tensor[None]"
            )
        if not tensor.is_floating_point():
            raise ValueError(
                f"{name}: {role} must be a float tensor in [0, 1], got dtype {tensor.dtype}; "
                "convert uint8 images with tensor.float() / 255"
            )
        if tensor.shape[1] not in ALLOWED_CHANNELS:
            raise ValueError(
                f"{name}: {role} has {tensor.shape[1]} channels; accepted channel counts: "
                f"{', '.join(map(str, ALLOWED_CHANNELS))} (N×C×H×W layout)"
            )
    if prediction.shape != target.shape:
        raise ValueError(
            f"{name}: shape mismatch, prediction {tuple(prediction.shape)} vs target "
            f"{tuple(target.shape)}; both must be the same N×C×H×W"
        )
    if prediction.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (N = 0)")
    height, width = prediction.shape[-2:]
    if min(height, width) < min_size:
        raise ValueError(
            f"{name}: image {height}×{width} is too small; this loss needs both sides "
            f">= {min_size} px"
        )


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (fp16/bf16, e.g. under autocast) -> float32; float32/64 as is."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


class ImageLoss(nn.Module):
    """Base class: validates the inputs, then calls ``distance`` (N×C×H×W -> N)."""

    #: the registry name, used in error messages
    name: str = "loss"
    #: the smallest image side (px) the loss accepts
    min_size: int = 1

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image distances, shape N (lower = more similar)."""
        check_images(prediction, target, self.name, self.min_size)
        return self.distance(prediction, target)

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
