"""Deep-feature losses: LPIPS vs the lpips package with the same backbone weights, the
offline EfficientNet-Lite0 weights really being ImageNet weights, frozen backbones."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from generation.losses import build_loss
from generation.losses.backbones import (
    TRUNKS,
    efficientnet_lite0_classifier,
    efficientnet_lite0_normalise,
)
from tests.losses_support import (  # noqa: F401 - one_torch_thread is a fixture
    assert_autocast_cpu,
    assert_finite_grad_at_identity,
    assert_monotone,
    noisy,
    one_torch_thread,
    photos,
    random_trunk_features,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def random_trunks(tmp_path_factory):
    """One seeded random initialisation of each torchvision trunk (its ``features``)."""
    folder = tmp_path_factory.mktemp("trunks")
    paths = {}
    for seed, net in enumerate(TRUNKS):
        paths[net] = folder / f"{net}.pth"
        torch.save(random_trunk_features(net, seed), paths[net])
    return paths


def reference_lpips(net: str, state_path):
    """The lpips package's LPIPS with calibrated heads and our saved trunk weights."""
    import lpips

    with warnings.catch_warnings():  # the package's own torchvision deprecations
        warnings.filterwarnings("ignore", "The parameter 'pretrained'", UserWarning)
        warnings.filterwarnings("ignore", "Arguments other than a weight enum", UserWarning)
        reference = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    state = torch.load(state_path, weights_only=True)
    cuts = TRUNKS[net].cuts
    mapped = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        _, index, parameter = key.split(".", 2)
        slice_number = next(s for s, end in enumerate(cuts) if int(index) < end) + 1
        mapped[f"slice{slice_number}.{index}.{parameter}"] = value
    reference.net.load_state_dict(mapped)
    return reference.eval()


@pytest.mark.slow
@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_lpips_matches_the_lpips_package(net, random_trunks):
    target = photos(64)
    prediction = noisy(target, 0.1, seed=9)
    ours = build_loss(f"lpips-{net}", weights=random_trunks[net])
    reference = reference_lpips(net, random_trunks[net])
    with torch.no_grad():
        got = ours(prediction, target)
        expected = reference(prediction, target, normalize=True).view(-1)
    assert (expected > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_lpips_backbone_is_frozen_and_in_eval_mode(random_trunks):
    loss = build_loss("lpips-alex", weights=random_trunks["alex"])
    loss.train()
    assert loss.training and not loss.backbone.training
    assert all(not module.training for module in loss.backbone.modules())
    assert not any(parameter.requires_grad for parameter in loss.parameters())
    images = photos(32)
    assert_finite_grad_at_identity(loss, images)
    assert loss(images, images).abs().max() < 1e-6
    assert_autocast_cpu(loss, images)
    grey = photos(32, grey=True)
    torch.testing.assert_close(
        loss(noisy(grey, 0.1), grey),
        loss(noisy(grey, 0.1).expand(-1, 3, -1, -1), grey.expand(-1, 3, -1, -1)),
    )


def test_lpips_without_weights_says_how_to_provide_them(tmp_path, monkeypatch, random_trunks):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"not in the torch cache .* weights='/path/to/"):
        build_loss("lpips-vgg")
    with pytest.raises(ValueError, match="does not exist"):
        build_loss("lpips-alex", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="not a torchvision alexnet state dict"):
        build_loss("lpips-alex", weights=random_trunks["squeeze"])
    with pytest.raises(ValueError, match="too small"):
        loss = build_loss("lpips-alex", weights=random_trunks["alex"])
        loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))


@pytest.fixture(scope="module")
def classifier():
    return efficientnet_lite0_classifier()


def _classify(classifier, name: str) -> int:
    from skimage import data, transform

    image = transform.resize(getattr(data, name)() / 255.0, (224, 224), anti_aliasing=True)
    batch = torch.from_numpy(image.transpose(2, 0, 1)).float()[None]
    with torch.no_grad():
        return int(classifier(efficientnet_lite0_normalise(batch)).argmax(1))


def test_offline_efficientnet_weights_are_imagenet_weights(classifier):
    assert 281 <= _classify(classifier, "chelsea") <= 285  # tabby, tiger cat, Persian, ... cats
    assert _classify(classifier, "coffee") in (967, 968)  # espresso, cup


@pytest.mark.slow
def test_deep_loss_behaves_on_photos():
    loss = build_loss("deep")
    assert not any(parameter.requires_grad for parameter in loss.parameters())
    loss.train()
    assert not loss.backbone.training
    images = photos(64)
    assert_monotone(loss, images)
    assert_monotone(loss, photos(32, grey=True))
    assert_finite_grad_at_identity(loss, images)
    assert_autocast_cpu(loss, photos(32)[:1])  # bf16 convolutions are slow on CPU


def test_deep_loss_uses_the_shipped_weights_and_accepts_a_path(tmp_path, classifier):
    path = tmp_path / "lite0.pth"
    torch.save(classifier.state_dict(), path)
    target = photos(32)
    prediction = noisy(target, 0.1)
    np.testing.assert_allclose(
        build_loss("deep", weights=path)(prediction, target).detach().numpy(),
        build_loss("deep")(prediction, target).detach().numpy(),
    )
    with pytest.raises(ValueError, match="EfficientNet-Lite0"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
        build_loss("deep", weights=tmp_path / "bad.pth")


def test_deep_taps_equal_the_unfused_network(classifier):
    """Folding batch norms into convolutions changes no feature map."""
    from generation.losses.backbones import EFFICIENTNET_STAGE_ENDS, efficientnet_lite0_backbone

    images = efficientnet_lite0_normalise(photos(32))
    with torch.no_grad():
        x = classifier._swish(classifier._bn0(classifier._conv_stem(images)))
        expected = []
        for index, block in enumerate(classifier._blocks):
            x = block(x)
            if index in EFFICIENTNET_STAGE_ENDS:
                expected.append(x)
        got = efficientnet_lite0_backbone()(images)
    assert len(got) == len(expected) == 7
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
