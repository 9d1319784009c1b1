"""SSIM / MS-SSIM against scikit-image and pytorch-msssim, plus the small-image configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from generation.losses import build_loss
from generation.losses.ssim import MS_SSIM_WEIGHTS, ssim_configuration
from tests.losses_support import (  # noqa: F401 - one_torch_thread is a fixture
    assert_autocast_cpu,
    assert_finite_grad_at_identity,
    assert_monotone,
    noisy,
    one_torch_thread,
    photos,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def skimage_ssim(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    from skimage.metrics import structural_similarity

    return np.array(
        [
            structural_similarity(
                a.numpy().astype(np.float64),
                b.numpy().astype(np.float64),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1.0,
                channel_axis=0,
            )
            for a, b in zip(x, y, strict=True)
        ]
    )


@pytest.mark.parametrize(("size", "grey"), [(64, False), (200, False), (48, True)])
def test_ssim_matches_scikit_image(size, grey):
    target = photos(size, grey=grey)
    prediction = noisy(target, 0.08, seed=size)
    loss = build_loss("ssim")
    got = 1 - loss(prediction, target).double().numpy()
    np.testing.assert_allclose(got, skimage_ssim(prediction, target), atol=2e-5)
    assert loss.configuration.standard


def test_msssim_matches_pytorch_msssim_on_large_images():
    from pytorch_msssim import ms_ssim

    target = photos(192)
    prediction = noisy(target, 0.1, seed=1)
    loss = build_loss("msssim")
    got = loss(prediction, target)
    assert loss.configuration.standard and loss.configuration.weights == MS_SSIM_WEIGHTS
    expected = 1 - ms_ssim(prediction, target, data_range=1.0, size_average=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _reference_reduced_msssim(x, y, weights):
    """The MS-SSIM recipe assembled from pytorch-msssim's per-scale statistics."""
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    win = _fspecial_gauss_1d(11, 1.5).repeat(x.shape[1], 1, 1, 1)
    values = []
    for level in range(len(weights)):
        full, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False)
        if level < len(weights) - 1:
            values.append(torch.relu(cs))
            pad = [s % 2 for s in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
    values.append(torch.relu(full))
    stacked = torch.stack(values)
    return (stacked ** torch.tensor(weights).view(-1, 1, 1)).prod(0).mean(1)


@pytest.mark.parametrize(("size", "scales"), [(64, 3), (32, 2), (96, 4)])
def test_msssim_reduced_configuration_on_small_images(size, scales):
    from pytorch_msssim import ms_ssim

    target = photos(size)
    prediction = noisy(target, 0.1, seed=2)
    with pytest.raises(AssertionError):  # the reference refuses these sizes
        ms_ssim(prediction, target, data_range=1.0, weights=[0.5, 0.5])
    loss = build_loss("msssim")
    got = loss(prediction, target)
    config = loss.configuration
    assert config.scales == scales and not config.standard
    assert config.window_size == 11 and config.sigma == 1.5
    assert sum(config.weights) == pytest.approx(1.0)
    expected_weights = np.array(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    np.testing.assert_allclose(config.weights, expected_weights)
    expected = 1 - _reference_reduced_msssim(prediction, target, config.weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_msssim_single_scale_override_equals_scikit_image_ssim():
    target = photos(32)
    prediction = noisy(target, 0.1, seed=3)
    loss = build_loss("msssim", scales=1)
    got = 1 - loss(prediction, target).double().numpy()
    assert loss.configuration.weights == (1.0,)
    np.testing.assert_allclose(got, skimage_ssim(prediction, target), atol=2e-5)


def test_tiny_images_shrink_the_window_and_overrides_are_checked():
    config = ssim_configuration(8, 8, multiscale=True)
    assert config.window_size == 7 and config.scales == 1
    assert config.sigma == pytest.approx(1.5 * 7 / 11)
    assert build_loss("ssim").configuration_for(9, 12).window_size == 9
    with pytest.raises(ValueError, match="coarsest scale"):
        build_loss("msssim", scales=5)(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="odd"):
        build_loss("ssim", window_size=8)
    with pytest.raises(ValueError, match="too small"):
        build_loss("msssim")(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="weights or scales"):
        build_loss("msssim", scales=2, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="bad option value"):
        build_loss("ssim", sigma="wide")
    with pytest.raises(ValueError, match="sequence of numbers"):
        build_loss("msssim", weights="abc")


def test_negative_structure_is_clamped_with_finite_gradients():
    target = photos(64)
    prediction = (1 - target).requires_grad_(True)  # anti-correlated: cs < 0
    value = build_loss("msssim")(prediction, target)
    assert torch.isfinite(value).all() and (value <= 1).all() and (value > 0.9).all()
    value.sum().backward()
    assert torch.isfinite(prediction.grad).all()


@pytest.mark.parametrize("name", ["ssim", "msssim"])
def test_ssim_losses_behave_on_photos(name):
    loss = build_loss(name)
    images = photos(64)
    assert_monotone(loss, images)
    assert_monotone(loss, photos(32, grey=True))
    assert_finite_grad_at_identity(loss, images)
    assert_autocast_cpu(loss, images, rtol=1e-4)
