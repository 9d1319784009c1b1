"""Helpers for the loss tests: scikit-image photographs and graded distortions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

NOISE_SIGMAS = (0.02, 0.05, 0.1, 0.2)
BLUR_SIGMAS = (0.5, 1.0, 2.0, 4.0)


def photos(
    size: int = 64, grey: bool = False, names=("astronaut", "chelsea", "coffee")
) -> torch.Tensor:
    """scikit-image photographs, centre-cropped square and resized: N×C×size×size in [0, 1]."""
    from skimage import data, transform

    images = []
    for name in names:
        image = getattr(data, name)().astype(np.float64) / 255.0
        side = min(image.shape[:2])
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        image = image[top : top + side, left : left + side]
        image = transform.resize(image, (size, size), anti_aliasing=True)
        if grey:
            image = image @ np.array([0.299, 0.587, 0.114])
            image = image[..., None]
        images.append(np.clip(image, 0, 1).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(images)).float()


def noisy(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Add seeded Gaussian noise of standard deviation ``sigma`` and clip to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator)
    return (images + sigma * noise).clamp(0, 1)


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (scipy.ndimage, reflect borders) of spatial std ``sigma`` px."""
    array = images.numpy()
    out = ndimage.gaussian_filter(array, sigma=(0, 0, sigma, sigma), mode="reflect")
    return torch.from_numpy(out).float()


def assert_monotone(loss, images: torch.Tensor, identical_tol: float = 1e-6) -> None:
    """~0 on identical images; strictly increasing in noise sigma and in blur sigma."""
    with torch.no_grad():
        same = loss(images, images)
        assert same.shape == (images.shape[0],)
        assert same.abs().max().item() <= identical_tol, same
        for distort, sigmas in ((noisy, NOISE_SIGMAS), (blurred, BLUR_SIGMAS)):
            values = torch.stack([loss(distort(images, s), images) for s in sigmas])
            assert torch.isfinite(values).all()
            assert (values[0] > same).all(), (distort.__name__, values, same)
            steps = values[1:] - values[:-1]
            assert (steps > 0).all(), (distort.__name__, values)


def assert_finite_grad_at_identity(loss, images: torch.Tensor) -> None:
    """Gradients at prediction == target exist and contain no NaN/inf."""
    prediction = images.clone().requires_grad_(True)
    loss(prediction, images).sum().backward()
    assert prediction.grad is not None
    assert torch.isfinite(prediction.grad).all()


def assert_autocast_cpu(loss, images: torch.Tensor, rtol: float = 0.1) -> None:
    """Under CPU bf16 autocast the loss runs, backpropagates and stays near float32."""
    distorted = noisy(images, 0.1)
    with torch.no_grad():
        reference = loss(distorted, images).float()
    prediction = distorted.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(prediction, images)
    value.float().sum().backward()
    assert torch.isfinite(prediction.grad).all()
    torch.testing.assert_close(value.float(), reference, rtol=rtol, atol=1e-3)


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """Run a module's loss tests on one intra-op thread, then restore the setting.

    On the shared 2-core machine, OpenMP's spinning worker threads make small convolutions
    ~50× slower when other processes compete for the cores; one thread avoids that and
    changes no result beyond float rounding."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_trunk_features(net: str, seed: int) -> dict[str, torch.Tensor]:
    """A seeded random initialisation of an LPIPS trunk's ``features`` (torchvision keys
    ``features.*``), built without the large classifier layers (VGG16's are 120M weights)."""
    import torchvision

    from generation.losses.backbones import TRUNKS

    torch.manual_seed(seed)
    if net == "vgg":
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    else:
        features = getattr(torchvision.models, TRUNKS[net].builder)(weights=None).features
    return {f"features.{key}": value for key, value in features.state_dict().items()}
