"""Pixel losses: L1 = mean |x − y| and L2 = mean (x − y)² over C, H, W (per image)."""

from __future__ import annotations

import torch

from generation.losses.base import ImageLoss


def l1_distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per image: N×C×H×W -> N."""
    return (prediction - target).abs().flatten(1).mean(1)


def l2_distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per image: N×C×H×W -> N."""
    return (prediction - target).square().flatten(1).mean(1)


class L1Loss(ImageLoss):
    """Mean absolute error per image."""

    name = "l1"

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return l1_distance(prediction, target)


class L2Loss(ImageLoss):
    """Mean squared error per image."""

    name = "l2"

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return l2_distance(prediction, target)
