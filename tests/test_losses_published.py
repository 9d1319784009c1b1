"""Published weights in: Czolbe et al.'s Watson state dicts and lpips linear layers,
converted to fitted-loss files, against a reference computation written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import fft

from generation.losses import build_loss
from generation.losses.watson import WATSON_DCT_TABLE, YCBCR_MATRIX, YCBCR_OFFSET
from study_app.cli import main
from tests.losses_support import noisy, photos

EPS = 1e-10


def czolbe_model(transform: str, seed: int) -> dict[str, torch.Tensor]:
    """One greyscale model's state dict with the keys and shapes of Czolbe et al.'s
    WatsonDistance / WatsonDistanceFft, parameters moved away from their starting values."""
    rng = np.random.default_rng(seed)
    shape = (8, 8) if transform == "dct" else (8, 5)
    table = np.array(WATSON_DCT_TABLE) if transform == "dct" else np.ones(shape)
    state = {
        "blocksize": torch.tensor(8),
        "t_tild": torch.tensor(np.log(table) + rng.normal(0, 0.3, shape), dtype=torch.float32),
        "alpha": torch.tensor(rng.uniform(0.1, 0.7), dtype=torch.float32),
        "w_tild": torch.tensor(rng.normal(-1, 0.3), dtype=torch.float32),
        "beta": torch.tensor(rng.uniform(1.5, 4), dtype=torch.float32),
    }
    if transform == "dft":
        state["w_phase_tild"] = torch.tensor(rng.normal(-2, 0.5, shape), dtype=torch.float32)
    return state


def blocks(image: np.ndarray) -> np.ndarray:
    """H×W -> K×8×8 blocks, row-major."""
    h, w = image.shape
    return image.reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)


def smooth_max(a, b):
    weights = np.exp(np.stack([a, b]) - np.maximum(a, b))
    return (a * weights[0] + b * weights[1]) / weights.sum(0)


def reference_channel(pred, target, state, transform):
    """Czolbe et al.'s formulas for one channel, one image (so the batch mean of their
    luminance masking is this image's mean), float64."""
    p = {k: v.double().numpy() for k, v in state.items()}
    t, alpha, w, beta = np.exp(p["t_tild"]), p["alpha"], 1 / (1 + np.exp(-p["w_tild"])), p["beta"]
    if transform == "dct":
        c0 = fft.dctn(blocks(target), axes=(1, 2), norm="ortho")
        c1 = fft.dctn(blocks(pred), axes=(1, 2), norm="ortho")
    else:
        f0 = fft.rfft2(blocks(target)) / 64
        f1 = fft.rfft2(blocks(pred)) / 64
        c0 = np.hypot(f0.real + EPS, f0.imag + EPS)
        c1 = np.hypot(f1.real + EPS, f1.imag + EPS)
    t_l = t * ((c0[:, :1, :1] + EPS) / (c0[:, 0, 0].mean() + EPS)) ** alpha
    s = smooth_max(t_l, (np.abs(c0) + EPS) ** w * t_l ** (1 - w))
    distance = ((np.abs((c0 - c1) / s) + EPS) ** beta + EPS).sum() ** (1 / beta)
    if transform == "dft":
        w_phase = np.exp(p["w_phase_tild"])
        for i, j in ((0, 0), (0, 4), (4, 4), (4, 0)):
            w_phase[i, j] = 0
        phase0 = np.arctan2(f0.imag, f0.real + EPS)
        phase1 = np.arctan2(f1.imag, f1.real + EPS)
        distance += (np.arccos(np.cos(phase0 - phase1) * (1 - 1e-7)) * w_phase).sum()
        # ours subtracts arccos(1 − 1e-7) per weighted bin and block (identical images give 0)
        distance -= math.acos(1 - 1e-7) * w_phase.sum() * len(c0)
    return distance


def ycbcr(image: np.ndarray) -> np.ndarray:
    """3×H×W RGB -> YCbCr with the matrix of generation.losses.watson (Czolbe et al.'s
    code rounds it to 4 digits)."""
    return (
        np.einsum("ij,jhw->ihw", np.array(YCBCR_MATRIX), image)
        + np.array(YCBCR_OFFSET)[:, None, None]
    )


@pytest.mark.parametrize("transform", ["dct", "dft"])
def test_czolbe_greyscale_file_converts_to_the_same_distance(tmp_path, transform):
    state = czolbe_model(transform, seed=1)
    torch.save(
        {"loss." + k: v for k, v in state.items()}, tmp_path / "gray.pth"
    )  # ShiftWrapper keys
    out = tmp_path / "converted.pt"
    result = CliRunner().invoke(
        main,
        [
            "losses",
            "import",
            "czolbe",
            str(tmp_path / "gray.pth"),
            "--loss",
            f"watson-{transform}",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    loss = build_loss(f"watson-{transform}", weights=str(out)).double()
    images = photos(32, grey=True).double()
    distorted = noisy(images, 0.05).double()
    with torch.no_grad():
        ours = loss(distorted, images).numpy()
    expected = [
        reference_channel(distorted[n, 0].numpy(), images[n, 0].numpy(), state, transform)
        for n in range(len(images))
    ]
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_czolbe_colour_file_converts_to_the_same_distance(tmp_path):
    models = {c: czolbe_model("dft", seed) for seed, c in enumerate(("ly", "lcb", "lcr"))}
    state = {f"{c}.{k}": v for c, model in models.items() for k, v in model.items()}
    state["w_tild"] = torch.tensor([0.5, -0.2, 0.1])
    state["to_YCbCr.transform"] = torch.zeros(3, 3)  # theirs; ignored (ours is used)
    torch.save(state, tmp_path / "rgb.pth")
    from generation.losses.fitted import write_fitted
    from generation.losses.published import czolbe_watson_payload

    write_fitted(tmp_path / "rgb.pt", czolbe_watson_payload(tmp_path / "rgb.pth", "watson-dft"))
    loss = build_loss("watson-dft", weights=str(tmp_path / "rgb.pt")).double()
    images = photos(32).double()
    distorted = noisy(images, 0.05).double()
    with torch.no_grad():
        ours = loss(distorted, images).numpy()
    softmax = torch.softmax(state["w_tild"].double(), 0).numpy()
    for n in range(len(images)):
        target, pred = ycbcr(images[n].numpy()), ycbcr(distorted[n].numpy())
        per_channel = [
            reference_channel(pred[c], target[c], models[name], "dft")
            for c, name in enumerate(("ly", "lcb", "lcr"))
        ]
        assert ours[n] == pytest.approx(float(softmax @ np.array(per_channel)), rel=1e-6)


def test_bad_czolbe_files_and_lpips_layers(tmp_path):
    torch.save(czolbe_model("dct", 0), tmp_path / "dct.pth")
    result = CliRunner().invoke(
        main,
        [
            "losses",
            "import",
            "czolbe",
            str(tmp_path / "dct.pth"),
            "--loss",
            "watson-dft",
            "--out",
            str(tmp_path / "x.pt"),
        ],
    )
    assert result.exit_code == 1 and "t_tild with 40 values" in result.output
    broken = czolbe_model("dct", 0)
    del broken["beta"]
    torch.save(broken, tmp_path / "broken.pth")
    result = CliRunner().invoke(
        main,
        [
            "losses",
            "import",
            "czolbe",
            str(tmp_path / "broken.pth"),
            "--loss",
            "watson-dct",
            "--out",
            str(tmp_path / "x.pt"),
        ],
    )
    assert result.exit_code == 1 and "expected a scalar 'beta'" in result.output
    # lpips linear layers: keys lin<k>.model.1.weight, shape 1×C×1×1 (AlexNet's five layers)
    generator = torch.Generator().manual_seed(0)
    channels = (64, 192, 384, 256, 256)
    layers = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator)
        for k, c in enumerate(channels)
    }
    torch.save(layers, tmp_path / "alex.pth")
    out = tmp_path / "alex.pt"
    result = CliRunner().invoke(
        main,
        [
            "losses",
            "import",
            "lpips",
            str(tmp_path / "alex.pth"),
            "--loss",
            "lpips-alex",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = torch.load(out, weights_only=True)
    assert payload["loss"] == "lpips-alex"
    for k, c in enumerate(channels):
        torch.testing.assert_close(
            payload["state_dict"][f"channel_weights_{k}"],
            layers[f"lin{k}.model.1.weight"].reshape(c),
        )
