"""Registry, composite specs, input validation and the pixel losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generation.losses import CompositeLoss, available_losses, build_loss, parse_spec
from tests.losses_support import (  # noqa: F401 - one_torch_thread is a fixture
    assert_autocast_cpu,
    assert_finite_grad_at_identity,
    assert_monotone,
    one_torch_thread,
    photos,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images():
    return photos(48)


def test_available_losses_lists_pixel_losses_with_descriptions():
    losses = available_losses()
    assert {"l1", "l2"} <= set(losses)
    assert all(isinstance(text, str) and text for text in losses.values())


@pytest.mark.parametrize("name", ["l1", "l2"])
def test_pixel_losses_match_numpy(name, images):
    rng = np.random.default_rng(0)
    other = torch.from_numpy(rng.random(images.shape)).float()
    got = build_loss(name)(other, images)
    diff = other.numpy().astype(np.float64) - images.numpy()
    expected = (np.abs(diff) if name == "l1" else diff**2).reshape(len(diff), -1).mean(1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["l1", "l2"])
def test_pixel_losses_behave_on_photos(name, images):
    loss = build_loss(name)
    assert_monotone(loss, images)
    assert_monotone(loss, photos(32, grey=True))
    assert_finite_grad_at_identity(loss, images)
    assert_autocast_cpu(loss, images)


def test_composite_is_weighted_sum_of_parts(images):
    other = images.flip(-1)
    loss = build_loss("l2:2.0, l1:0.5")
    assert isinstance(loss, CompositeLoss)
    expected = 2.0 * build_loss("l2")(other, images) + 0.5 * build_loss("l1")(other, images)
    torch.testing.assert_close(loss(other, images), expected)
    terms = loss.terms(other, images)
    assert set(terms) == {"l2", "l1"}
    assert loss.spec == "l2:2,l1:0.5"
    mapped = build_loss({"l2": 2.0, "l1": {"weight": 0.5}})
    torch.testing.assert_close(mapped(other, images), expected)


def test_composite_weight_defaults_to_one():
    assert parse_spec("l1,l2:3") == [("l1", 1.0, {}), ("l2", 3.0, {})]


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("nope", {}, "accepted names: l1, l2"),
        ("l2:abc", {}, "must be a number"),
        ("l2:-1", {}, ">= 0"),
        ("l2,,l1", {}, "malformed"),
        ("l2,l2", {}, "twice"),
        ({}, {}, "empty"),
        ("l2", {"bogus": 1}, "unknown option(s) bogus"),
        ("l2:1,l1:1", {"bogus": 1}, "mapping form"),
        (3, {}, "must be a name"),
    ],
)
def test_bad_specs_raise_value_error(spec, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_loss(spec, **options)


@pytest.mark.parametrize(
    ("prediction", "target", "message"),
    [
        (torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 9), "shape mismatch"),
        (torch.rand(3, 8, 8), torch.rand(3, 8, 8), "4 dims"),
        (torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8), "accepted channel counts: 1, 3"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8),) * 2 + ("float tensor",),
        (np.zeros((2, 3, 8, 8)), torch.rand(2, 3, 8, 8), "torch.Tensor"),
    ],
)
def test_bad_images_raise_value_error(prediction, target, message):
    with pytest.raises(ValueError, match=message):
        build_loss("l1:1,l2:1")(prediction, target)
