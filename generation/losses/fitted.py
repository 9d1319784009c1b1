"""Fitted loss parameters as a file: what ``pstudy losses fit`` writes and
``build_loss(name, weights=FILE)`` reads.

The file is a ``torch.save`` of a plain mapping (read back with ``weights_only=True``)::

    {"format": "pstudy-fitted-loss", "version": 1, "loss": "watson-dft",
     "options": {...},            # constructor options of the loss (e.g. start)
     "state_dict": {name: tensor}}  # only the fitted tensors, float32, on the CPU

Watson losses store all their parameters (t̃, α, w̃, β, channel logits, DFT phase log
weights); the deep-feature losses store their per-channel weights
(``channel_weights_<layer>``), never the frozen backbone. Same tensors → same bytes, so
the file's SHA-256 identifies a fit. The JSON model card lives next to it
(``<file>.card.json``, see :mod:`generation.calibration.card`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

FITTED_FORMAT = "pstudy-fitted-loss"
FITTED_VERSION = 1
#: losses whose parameters can be fitted (and loaded from a fitted file)
FITTABLE_LOSSES = ("watson-dct", "watson-dft", "deep", "lpips-alex", "lpips-vgg", "lpips-squeeze")


def fitted_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a fit changes: every parameter of a Watson loss, or the channel weights
    (``channel_weights_<layer>``) of a deep-feature loss; detached float32 CPU copies."""
    state = module.state_dict()
    if any(key.startswith("channel_weights_") for key in state):
        keys = [key for key in state if key.startswith("channel_weights_")]
    else:
        keys = [name for name, _ in module.named_parameters()]
    return {key: state[key].detach().to("cpu", torch.float32).clone() for key in keys}


def fitted_payload(loss: str, options: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    """The mapping a fitted-loss file holds."""
    return {
        "format": FITTED_FORMAT,
        "version": FITTED_VERSION,
        "loss": loss,
        "options": dict(options),
        "state_dict": {
            key: value.detach().to("cpu", torch.float32) for key, value in state_dict.items()
        },
    }


def write_fitted(path: str | os.PathLike, payload: dict) -> Path:
    """Write a fitted-loss mapping to ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def save_fitted(path: str | os.PathLike, loss: str, options: dict, module: nn.Module) -> Path:
    """Write ``module``'s fitted tensors for the registered loss ``loss`` to ``path``."""
    return write_fitted(path, fitted_payload(loss, options, fitted_tensors(module)))


def read_fitted(path: str | os.PathLike) -> dict[str, Any] | None:
    """The fitted-loss mapping in ``path``, or None when the file is some other
    ``torch.save`` file (e.g. backbone weights). ValueError when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unreadable file is a user error here
        raise ValueError(f"cannot read weights file {path}: {str(error)[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FITTED_FORMAT:
        return None
    if payload.get("version") != FITTED_VERSION:
        raise ValueError(
            f"{path}: fitted-loss file version {payload.get('version')!r}; this version reads "
            f"{FITTED_VERSION} (refit with `pstudy losses fit`)"
        )
    return payload


def apply_fitted(module: nn.Module, payload: dict[str, Any], path: str | os.PathLike) -> nn.Module:
    """Copy the fitted tensors into ``module`` (in place); ValueError naming ``path`` when a
    key is missing from the module or a shape differs."""
    own = module.state_dict()
    state = payload["state_dict"]
    for key, tensor in state.items():
        if key not in own:
            raise ValueError(
                f"{path}: tensor {key!r} does not belong to loss {payload['loss']!r} "
                f"(its tensors: {', '.join(list(own)[:8])}…)"
            )
        if own[key].shape != tensor.shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, loss "
                f"{payload['loss']!r} expects {tuple(own[key].shape)}"
            )
    missing = sorted(set(fitted_tensors(module)) - set(state))
    if missing:
        raise ValueError(f"{path}: no tensor for {', '.join(missing)} (an incomplete fit file)")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor)
    return module
