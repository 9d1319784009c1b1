"""Published calibrated weights, converted into fitted-loss files (user-supplied files only).

- Czolbe et al. 2020's Watson state dicts (``rgb_watson_dct_trial0.pth``,
  ``gray_watson_fft_trial0.pth``, …, from their repository, which has no licence, so the
  files are never shipped here): a greyscale model has the keys ``t_tild`` (8×8 DCT,
  8×5 DFT, log thresholds), ``alpha``, ``w_tild`` (logit of w), ``beta`` and, for the
  DFT, ``w_phase_tild`` (log phase weights); a colour model (their ``ColorWrapper``)
  holds one such model per YCbCr channel under ``ly.``, ``lcb.``, ``lcr.`` and the channel
  logits ``w_tild`` (3). Transform modules and the colour matrix (``dct.*``, ``fft.*``,
  ``to_YCbCr.*``, ``blocksize``) are not parameters here and are skipped. A greyscale
  file sets all three channels' parameters alike (greyscale images use the Y model).
- the ``lpips`` package's linear layers (``lpips/weights/v0.1/<net>.pth``, or a file
  with the same keys ``lin<k>.model.1.weight``): the channel weights of ``lpips-<net>``.

Same formulas, two deliberate differences from Czolbe et al.'s code (docs/losses.md):
their luminance masking averages the DC coefficients over the whole *batch*, ours over
the blocks of each image (the two agree at batch size 1), and our DFT phase term
subtracts the constant arccos(1 − 1e-7) per weighted bin and block so that identical
images score 0 (a constant per image size: no ranking or gradient changes).
"""

from __future__ import annotations

import os

import torch

from generation.losses.backbones import TRUNKS, load_state_dict_file
from generation.losses.fitted import fitted_payload

CZOLBE_CHANNELS = ("ly", "lcb", "lcr")
CZOLBE_SKIPPED = ("dct.", "fft.", "to_YCbCr.", "blocksize")
BINS = {"watson-dct": 64, "watson-dft": 40}


def _scalar(state: dict, key: str, path) -> torch.Tensor:
    if key not in state or state[key].numel() != 1:
        raise ValueError(f"{path}: expected a scalar {key!r} (a Czolbe et al. Watson state dict)")
    return state[key].reshape(()).float()


def czolbe_watson_payload(path: str | os.PathLike, loss: str) -> dict:
    """A fitted-loss mapping for ``loss`` (watson-dct or watson-dft) from one of Czolbe et
    al.'s Watson state dicts (greyscale or colour); ValueError naming the file and key."""
    if loss not in BINS:
        raise ValueError(
            f"Czolbe et al.'s Watson files convert to watson-dct or watson-dft, not {loss!r}"
        )
    state = load_state_dict_file(path, "Czolbe et al. Watson state dict")
    state = {key.removeprefix("loss."): value for key, value in state.items()}  # ShiftWrapper
    colour = all(any(k.startswith(f"{c}.") for k in state) for c in CZOLBE_CHANNELS)
    prefixes = [f"{c}." for c in CZOLBE_CHANNELS] if colour else [""] * 3
    bins = BINS[loss]
    rows: dict[str, list[torch.Tensor]] = {"t_tilde": [], "alpha": [], "w_tilde": [], "beta": []}
    if loss == "watson-dft":
        rows["phase_log_weights"] = []
    for prefix in prefixes:
        t = state.get(f"{prefix}t_tild")
        if t is None or t.numel() != bins:
            raise ValueError(
                f"{path}: expected {prefix}t_tild with {bins} values for {loss} "
                f"({'8×8' if bins == 64 else '8×5'}); got "
                f"{'none' if t is None else tuple(t.shape)} (a file for the other transform?)"
            )
        rows["t_tilde"].append(t.reshape(bins).float())
        rows["alpha"].append(_scalar(state, f"{prefix}alpha", path))
        rows["w_tilde"].append(_scalar(state, f"{prefix}w_tild", path))
        rows["beta"].append(_scalar(state, f"{prefix}beta", path))
        if loss == "watson-dft":
            phase = state.get(f"{prefix}w_phase_tild")
            if phase is None or phase.numel() != bins:
                raise ValueError(f"{path}: expected {prefix}w_phase_tild with {bins} values")
            rows["phase_log_weights"].append(phase.reshape(bins).float())
    known = {
        f"{p}{k}" for p in prefixes for k in ("t_tild", "alpha", "w_tild", "beta", "w_phase_tild")
    }
    known |= {"w_tild"} if colour else set()
    unknown = [
        k
        for k in state
        if k not in known and not any(k.startswith(s) or s in k for s in CZOLBE_SKIPPED)
    ]
    if unknown:
        raise ValueError(
            f"{path}: unexpected key(s) {', '.join(unknown[:5])} for a Czolbe et al. Watson file"
        )
    tensors = {key: torch.stack(values) for key, values in rows.items()}
    if colour:
        tensors["channel_logits"] = _channel_logits(state, path)
    else:
        tensors["channel_logits"] = torch.zeros(3)
    return fitted_payload(loss, {"start": "published"}, tensors)


def _channel_logits(state: dict, path) -> torch.Tensor:
    logits = state.get("w_tild")
    if logits is None or logits.numel() != 3:
        raise ValueError(f"{path}: expected the colour channel logits w_tild (3 values)")
    return logits.reshape(3).float()


def lpips_linear_payload(path: str | os.PathLike, net: str) -> dict:
    """A fitted-loss mapping for ``lpips-<net>`` from an lpips linear-layer file."""
    from generation.losses.deep import lpips_linear_weights

    if net not in TRUNKS:
        raise ValueError(f"unknown LPIPS network {net!r}; accepted: {', '.join(TRUNKS)}")
    weights = lpips_linear_weights(net, path)
    return fitted_payload(
        f"lpips-{net}", {}, {f"channel_weights_{i}": w for i, w in enumerate(weights)}
    )
