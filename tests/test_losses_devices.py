"""Every registered loss gives the same distances on CPU and CUDA (runs only with a GPU)."""

from __future__ import annotations

import pytest
import torch

from generation.losses import available_losses, build_loss
from generation.losses.backbones import TRUNKS
from tests.losses_support import noisy, photos, random_trunk_features


@pytest.fixture(scope="module")
def trunk_weights(tmp_path_factory):
    """Seeded random torchvision trunks (ImageNet weights cannot be downloaded here)."""
    folder = tmp_path_factory.mktemp("trunks")
    paths = {}
    for seed, net in enumerate(TRUNKS):
        paths[net] = folder / f"{net}.pth"
        torch.save(random_trunk_features(net, seed), paths[net])
    return paths


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(available_losses()))
def test_cpu_and_cuda_agree(name, trunk_weights, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    options = {"weights": trunk_weights[name.split("-")[1]]} if name.startswith("lpips-") else {}
    target = photos(64)
    prediction = noisy(target, 0.1, seed=11)
    cpu_loss = build_loss(name, **options)
    cuda_loss = build_loss(name, **options).cuda()
    expected = cpu_loss(prediction, target)
    cuda_prediction = prediction.cuda().requires_grad_(True)
    got = cuda_loss(cuda_prediction, target.cuda())
    got.sum().backward()
    assert got.device.type == "cuda" and torch.isfinite(cuda_prediction.grad).all()
    torch.testing.assert_close(got.cpu(), expected.detach(), rtol=1e-4, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.float16):
        half = cuda_loss(prediction.cuda(), target.cuda())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float().cpu(), expected.detach(), rtol=0.05, atol=1e-3)
