"""Watson-DCT/DFT: block transforms vs scipy.fft, the full model vs a direct NumPy
implementation of the formulas, gradcheck, parameters, determinism, behaviour on photos."""

from __future__ import annotations

import copy
import math
import platform

import numpy as np
import pytest
import scipy.fft
import torch

from generation.losses import build_loss, watson
from generation.losses.watson import (
    START_SETS,
    WATSON_DCT_TABLE,
    block_transform,
    rgb_to_ycbcr,
)
from tests.losses_support import (  # noqa: F401 - one_torch_thread is a fixture
    assert_autocast_cpu,
    assert_finite_grad_at_identity,
    assert_monotone,
    noisy,
    one_torch_thread,
    photos,
)

EPS = 1e-10

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blocks(channel: np.ndarray) -> np.ndarray:
    """H×W -> K×8×8 in row-major block order."""
    h, w = channel.shape
    return channel.reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)


def test_block_transforms_match_scipy_fft():
    images = torch.rand(
        2, 3, 16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    dct = block_transform(images, "dct").numpy()
    dft = block_transform(images, "dft").numpy()
    for n in range(2):
        for c in range(3):
            blocks = _blocks(images[n, c].numpy())
            expected_dct = scipy.fft.dctn(blocks, type=2, norm="ortho", axes=(1, 2)).reshape(
                len(blocks), 64
            )
            np.testing.assert_allclose(dct[n, c], expected_dct, atol=1e-12)
            spectrum = (scipy.fft.rfft2(blocks, axes=(1, 2)) / 64).reshape(len(blocks), 40)
            np.testing.assert_allclose(dft[n, c, :, :40], spectrum.real, atol=1e-12)
            np.testing.assert_allclose(dft[n, c, :, 40:], spectrum.imag, atol=1e-12)


def _smax(a, b):
    m = np.maximum(a, b)
    return (a * np.exp(a - m) + b * np.exp(b - m)) / (np.exp(a - m) + np.exp(b - m))


def _reference_channel(x, x_hat, kind, t, alpha, w, beta, phase_w):
    """The design note's formulas, one channel, straight from scipy.fft (float64)."""
    if kind == "dct":
        c = scipy.fft.dctn(_blocks(x), norm="ortho", axes=(1, 2))
        c_hat = scipy.fft.dctn(_blocks(x_hat), norm="ortho", axes=(1, 2))
        a, a_hat = c, c_hat
    else:
        c = scipy.fft.rfft2(_blocks(x), axes=(1, 2)) / 64
        c_hat = scipy.fft.rfft2(_blocks(x_hat), axes=(1, 2)) / 64
        a, a_hat = np.abs(c), np.abs(c_hat)
    dc = a[:, 0, 0]
    t_l = t[None] * (((dc + EPS) / (dc.mean() + EPS)) ** alpha)[:, None, None]
    s = _smax(t_l, (np.abs(a) + EPS) ** w * t_l ** (1 - w))
    d = np.sum((np.abs(a - a_hat) / s + EPS) ** beta) ** (1 / beta)
    if kind == "dft":
        delta = np.angle(c) - np.angle(c_hat)
        scale = 1 - 1e-7
        d += np.sum(phase_w[None] * (np.arccos(np.cos(delta) * scale) - np.arccos(scale)))
    return d


def _reference_loss(loss, prediction, target):
    kind = loss.transform
    pred, targ = prediction.double(), target.double()
    if pred.shape[1] == 3:
        pred, targ = rgb_to_ycbcr(pred), rgb_to_ycbcr(targ)
    t = loss.t.detach().double().numpy()
    alpha, w, beta = (p.detach().double().numpy() for p in (loss.alpha, loss.w, loss.beta))
    phase = None
    if kind == "dft":
        phase = (
            (loss.phase_log_weights.exp() * loss.phase_mask)
            .detach()
            .double()
            .numpy()
            .reshape(-1, 8, 5)
        )
    weights = torch.softmax(loss.channel_logits.detach().double(), 0).numpy()
    out = []
    for n in range(pred.shape[0]):
        per_channel = [
            _reference_channel(
                targ[n, c].numpy(),
                pred[n, c].numpy(),
                kind,
                t[c],
                alpha[c],
                w[c],
                beta[c],
                None if phase is None else phase[c],
            )
            for c in range(pred.shape[1])
        ]
        out.append(per_channel[0] if len(per_channel) == 1 else float(np.dot(per_channel, weights)))
    return np.array(out)


@pytest.mark.parametrize("start", START_SETS)
@pytest.mark.parametrize("name", ["watson-dct", "watson-dft"])
@pytest.mark.parametrize("grey", [False, True])
def test_watson_matches_direct_implementation_of_the_formulas(name, grey, start):
    target = photos(32, grey=grey)
    prediction = noisy(target, 0.05, seed=4)
    loss = build_loss(name, start=start)
    with torch.no_grad():  # move the parameters off their starting values to test them all
        generator = torch.Generator().manual_seed(5)
        for parameter in loss.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    got = loss.double()(prediction.double(), target.double()).detach().numpy()
    np.testing.assert_allclose(got, _reference_loss(loss, prediction, target), rtol=1e-7)


@pytest.mark.parametrize("start", START_SETS)
@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "grey"])
@pytest.mark.parametrize("name", ["watson-dct", "watson-dft"])
def test_watson_gradcheck_float64(name, channels, start):
    loss = build_loss(name, start=start).double()
    generator = torch.Generator().manual_seed(6)
    target = torch.rand(2, channels, 8, 16, dtype=torch.float64, generator=generator)
    prediction = target + 0.1 * torch.randn(target.shape, dtype=torch.float64, generator=generator)
    prediction.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: loss(p, target), (prediction,), fast_mode=True)
    names = [name for name, _ in loss.named_parameters()]

    def as_function_of_parameters(*values):
        return torch.func.functional_call(
            loss, dict(zip(names, values, strict=True)), (prediction.detach(), target)
        )

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in loss.parameters())
    assert torch.autograd.gradcheck(as_function_of_parameters, inputs, fast_mode=True)


def test_watson_published_starting_values_are_kept_as_a_named_set():
    dct, dft = build_loss("watson-dct", start="published"), build_loss("watson-dft", start="published")
    for c in range(3):
        torch.testing.assert_close(
            dct.t[c].double(),
            torch.tensor(WATSON_DCT_TABLE, dtype=torch.float64),
            rtol=1e-6,
            atol=0,
        )
    torch.testing.assert_close(dct.alpha, torch.full((3,), 0.649))
    torch.testing.assert_close(dct.w, torch.full((3,), 0.7))
    torch.testing.assert_close(dct.beta, torch.full((3,), 4.0))
    torch.testing.assert_close(dft.t, torch.ones(3, 8, 5))
    torch.testing.assert_close(dft.alpha, torch.full((3,), 0.1))
    torch.testing.assert_close(dft.w, torch.full((3,), 0.2))
    torch.testing.assert_close(dft.beta, torch.full((3,), 1.0))
    torch.testing.assert_close(dft.phase_log_weights.exp(), torch.full((3, 40), math.exp(-2)))
    torch.testing.assert_close(dct.channel_weights, torch.full((3,), 1 / 3))


def test_watson_calibrated_starting_values_are_the_default():
    dct, dft = build_loss("watson-dct"), build_loss("watson-dft")
    assert (dct.start, dft.start) == ("calibrated", "calibrated")
    table = torch.tensor(WATSON_DCT_TABLE, dtype=torch.float64)
    for c in range(3):  # Watson's table in the units of [0, 1] images
        torch.testing.assert_close(dct.t[c].double(), table / 255, rtol=1e-6, atol=0)
        torch.testing.assert_close(
            dft.t[c].double(), torch.from_numpy(watson.dft_thresholds()), rtol=1e-6, atol=0
        )
    for loss in (dct, dft):
        torch.testing.assert_close(loss.alpha, torch.full((3,), 0.1))
        torch.testing.assert_close(loss.w, torch.full((3,), 0.2))
        torch.testing.assert_close(loss.channel_weights, torch.full((3,), 1 / 3))
    torch.testing.assert_close(dct.beta, torch.full((3,), 4.0))
    torch.testing.assert_close(dft.beta, torch.full((3,), 1.0))
    torch.testing.assert_close(dft.phase_log_weights.exp(), torch.ones(3, 40))
    with pytest.raises(ValueError, match="start must be one of calibrated, published"):
        build_loss("watson-dct", start="fitted")


@pytest.mark.parametrize("start", START_SETS)
def test_watson_parameters_are_learnable(start):
    for name in ("watson-dct", "watson-dft"):
        loss = build_loss(name, start=start)
        target = photos(32)
        loss(noisy(target, 0.1), target).sum().backward()
        for parameter_name, parameter in loss.named_parameters():
            assert isinstance(parameter, torch.nn.Parameter) and parameter.requires_grad
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
            assert parameter.grad.abs().sum() > 0, parameter_name


def test_contrast_sensitivity_model_reproduces_watsons_table():
    """The Ahumada-Peterson form behind Watson's table: refitted here from the table by
    least squares, it gives the module's constants and every entry within 0.5 %."""
    from scipy.optimize import least_squares

    table = np.array(WATSON_DCT_TABLE)
    np.testing.assert_allclose(watson.csf_dct_table(), table, rtol=5e-3)
    i, j = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    a = np.where(np.arange(8) == 0, math.sqrt(1 / 8), 0.5)
    f = np.hypot(i, j) / 16
    ac = f > 0
    sin2 = (2 * (i / 16) * (j / 16) / np.where(ac, f, 1) ** 2) ** 2

    def residual(p):
        log_t_min, k, log_f_min, r = p
        log_a = log_t_min - np.log10(r - (r - 1) * sin2) + k * (
            np.log10(np.where(ac, f, 1)) - log_f_min) ** 2
        return (log_a - np.log10(a[i] * a[j]) - np.log10(table))[ac]

    fit = least_squares(residual, [0.0, 1.0, -1.3, 1.0], xtol=1e-14, ftol=1e-14, gtol=1e-14)
    np.testing.assert_allclose(
        fit.x,
        [math.log10(watson.CSF_T_MIN), watson.CSF_K, math.log10(watson.CSF_F_MIN), watson.CSF_R],
        rtol=1e-4,
    )
    # the DC entry is the model's axis-aligned minimum as a mean-luminance threshold
    assert table[0, 0] / 8 == pytest.approx(watson.CSF_T_MIN / watson.CSF_R, rel=0.01)


def test_calibrated_dft_thresholds_follow_the_dct_model_at_the_same_frequencies():
    """DFT bin (u, v) is the frequency of DCT basis (2u, 2v): a cosine of amplitude A
    (grey levels) has DCT coefficient A/(a_i·a_j) and DFT amplitude A/2 (A in the real
    bins), /255 for [0, 1] images."""
    dft = watson.dft_thresholds()
    dct = watson.csf_dct_table()
    a = np.where(np.arange(8) == 0, math.sqrt(1 / 8), 0.5)
    assert dft[0, 0] == pytest.approx(WATSON_DCT_TABLE[0][0] / 8 / 255)
    for u in range(4):
        for v in range(4):
            if u or v:
                expected = dct[2 * u, 2 * v] * a[2 * u] * a[2 * v] / 2 / 255
                assert dft[u, v] == pytest.approx(expected, rel=1e-9), (u, v)
    np.testing.assert_allclose(dft[1:4], dft[:4:-1])  # negative vertical frequencies
    for u, v in watson.REAL_DFT_BINS[1:]:  # Nyquist: the whole amplitude in one real bin
        assert dft[u, v] == pytest.approx(watson.grating_threshold(u / 8, v / 8) / 255)


@pytest.mark.parametrize("name", ["watson-dct", "watson-dft"])
def test_calibrated_thresholds_do_not_explode_on_black_blocks(name):
    """Watson's α = 0.649 sends the threshold of a black block to ~0 ((ε/mean)^0.649):
    one unit of error there outweighs the same error on grey by ~10⁶. The calibrated
    set (α = 0.1) keeps the ratio moderate."""
    target = torch.full((1, 1, 16, 16), 0.5)
    target[..., :8, :8] = 0.0  # one black block
    error = torch.zeros_like(target)
    on_black, on_grey = error.clone(), error.clone()
    on_black[..., 2, 2] = 0.02
    on_grey[..., 2, 10] = 0.02
    ratios = {}
    with torch.no_grad():
        for start in START_SETS:
            loss = build_loss(name, start=start)
            ratios[start] = float(loss(target + on_black, target) / loss(target + on_grey, target))
    assert ratios["calibrated"] < 20, ratios
    if name == "watson-dct":
        assert ratios["published"] > 1e4, ratios


@pytest.mark.slow
def test_calibrated_dct_masking_exponents_are_what_lets_it_train():
    """Optimising the pixels of 12 held-out photo patches (some with black blocks)
    directly, Adam on logits from grey. With the thresholds in [0, 1] units (table / 255)
    and Watson's α = 0.649 the black blocks' thresholds (~3·10⁻⁷ of the table) overflow
    the loss; with α = 0.1 but Watson's w = 0.7 the masking term hides each block's mean
    behind its own DC coefficient and the optimisation stalls; the calibrated α = 0.1,
    w = 0.2 reaches a faithful image."""
    from generation.data import skimage_patches
    from generation.evaluate import psnr

    target = skimage_patches(size=32, channels=3, seed=0, n_train=1, n_test=12).test.images / 255
    variants = {"calibrated": {}, "watson_alpha_w": {"alpha": 0.649, "w": 0.7}, "watson_w": {"w": 0.7}}
    results = {}
    for variant, values in variants.items():
        loss = build_loss("watson-dct").requires_grad_(False)
        with torch.no_grad():
            if "alpha" in values:
                loss.alpha.fill_(values["alpha"])
            if "w" in values:
                loss.w_tilde.fill_(math.log(values["w"] / (1 - values["w"])))
        logits = torch.zeros_like(target, requires_grad=True)
        optimiser = torch.optim.Adam([logits], lr=0.05)
        for _ in range(150):
            value = loss(torch.sigmoid(logits), target).mean()
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
        results[variant] = float(psnr(torch.sigmoid(logits).detach(), target).mean())
    assert results["calibrated"] > 30, results
    assert not results["watson_alpha_w"] > 20, results  # NaN: the loss overflows
    assert results["watson_w"] < 22, results


def test_watson_dft_phase_weight_option_sets_the_starting_phase_weights():
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    default = build_loss("watson-dft", start="published")
    lowered = build_loss("watson-dft", start="published", phase_weight=math.exp(-5))
    no_phase = build_loss("watson-dft", start="published", phase_weight=1e-30)
    assert torch.allclose(default.phase_log_weights, torch.full((3, 40), -2.0))
    assert torch.allclose(lowered.phase_log_weights, torch.full((3, 40), -5.0))
    with torch.no_grad():
        amplitude = no_phase(x, y)
        phase = default(x, y) - amplitude
        # only the phase term scales; everything else is the same model
        assert torch.allclose(lowered(x, y), amplitude + math.exp(-3) * phase, rtol=1e-5)
    assert torch.allclose(
        build_loss("watson-dft", phase_weight=0.5).phase_log_weights, torch.full((3, 40), math.log(0.5))
    )
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="phase_weight"):
            build_loss("watson-dft", phase_weight=bad)
    with pytest.raises(ValueError, match="phase_weight"):
        build_loss("watson-dct", phase_weight=0.1)


@pytest.mark.parametrize("start", START_SETS)
@pytest.mark.parametrize("name", ["watson-dct", "watson-dft"])
def test_watson_is_per_image_and_deterministic(name, start):
    target = photos(32)
    prediction = noisy(target, 0.1, seed=7)
    loss = build_loss(name, start=start)
    batch = loss(prediction, target)
    alone = torch.cat([loss(prediction[i : i + 1], target[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, alone)  # luminance mean per image, not per batch
    torch.testing.assert_close(loss(prediction, target), batch, rtol=0, atol=0)
    with torch.no_grad():  # the in-place path without a graph computes the same
        torch.testing.assert_close(loss(prediction, target), batch)
    frozen = build_loss(name, start=start).requires_grad_(False)
    torch.testing.assert_close(frozen(prediction, target), batch)


def test_watson_shift_augmentation_is_optional_and_training_only():
    target = photos(32)
    prediction = noisy(target, 0.1, seed=8)
    plain = build_loss("watson-dft")(prediction, target)
    shifted = build_loss("watson-dft", shift_augment=True)
    torch.manual_seed(0)
    values = torch.stack([shifted(prediction, target) for _ in range(4)])
    assert len({round(v, 6) for v in values[:, 0].tolist()} | {round(plain[0].item(), 6)}) > 1
    torch.manual_seed(0)
    torch.testing.assert_close(torch.stack([shifted(prediction, target) for _ in range(4)]), values)
    shifted.eval()
    torch.testing.assert_close(shifted(prediction, target), plain)


def test_watson_refuses_sides_not_multiple_of_8():
    with pytest.raises(ValueError, match="multiples of 8"):
        build_loss("watson-dct")(torch.rand(1, 3, 30, 32), torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="too small"):
        build_loss("watson-dft")(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))


@pytest.mark.parametrize("start", START_SETS)
@pytest.mark.parametrize("name", ["watson-dct", "watson-dft"])
def test_watson_behaves_on_photos(name, start):
    loss = build_loss(name, start=start)
    images = photos(64)
    assert_monotone(loss, images, identical_tol=1e-5)
    assert_monotone(loss, photos(32, grey=True), identical_tol=1e-5)
    assert_finite_grad_at_identity(loss, images)
    assert_autocast_cpu(loss, images, rtol=1e-4)


@pytest.mark.parametrize("start", START_SETS)
@pytest.mark.parametrize("name", ["watson-dct", "watson-dft"])
def test_watson_handles_flat_blocks_with_zero_coefficients(name, start):
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1.0  # flat blocks: AC coefficients exactly 0
    loss = build_loss(name, start=start)
    assert loss(target, target).abs().max() < 1e-5
    prediction = target.clone().requires_grad_(True)
    loss(prediction, target).sum().backward()
    assert torch.isfinite(prediction.grad).all()
    changed = target.clone()
    changed[:, :, 0, 0] = 0.2
    assert (loss(changed, target) > 1e-3).all()


@pytest.mark.parametrize("start", START_SETS)
@pytest.mark.parametrize("name", ["watson-dct", "watson-dft"])
def test_fused_backward_equals_plain_autograd(name, start):
    """The fast path (hand-written backward) and the plain autograd path (taken when the
    target requires gradients) agree on values and on every gradient."""
    loss = build_loss(name, start=start).double()
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for parameter in loss.parameters():
            parameter.add_(
                0.1 * torch.randn(parameter.shape, dtype=parameter.dtype, generator=generator)
            )
    target = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=generator)
    prediction = (
        target + 0.1 * torch.randn(target.shape, dtype=torch.float64, generator=generator)
    ).clamp(0, 1)
    prediction.requires_grad_(True)
    inputs = [prediction, *loss.parameters()]
    fused = loss(prediction, target)
    fused_grads = torch.autograd.grad(fused.sum(), inputs)
    plain = loss(prediction, target.clone().requires_grad_(True))
    plain_grads = torch.autograd.grad(plain.sum(), inputs)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)
    # frozen parameters (how autoencoders train): the in-place threshold, same gradient
    frozen = copy.deepcopy(loss).requires_grad_(False)
    (frozen_grad,) = torch.autograd.grad(frozen(prediction, target).sum(), [prediction])
    torch.testing.assert_close(frozen_grad, plain_grads[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_copies_match_the_plain_reshape(dtype):
    """to_blocks moves 8-pixel runs as 16-byte words; the result equals the reshape and
    transpose it replaces, also for an input that is a view, and from_blocks inverts it."""
    images = torch.rand(3, 2, 24, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = images.reshape(3, 2, 3, 8, 5, 8).transpose(3, 4).reshape(3, 2, 15, 64)
    assert watson._word_group(images) == 16 // images.element_size()
    assert torch.equal(watson.to_blocks(images), expected)
    assert torch.equal(watson.from_blocks(expected, 24, 40), images)
    view = torch.cat([images, images]).chunk(2)[1]  # non-zero storage offset
    assert torch.equal(watson.to_blocks(view), expected)
    grad_input = images.clone().requires_grad_(True)  # autograd history: the plain path
    assert watson._word_group(grad_input) == 0
    assert torch.equal(watson.to_blocks(grad_input), expected)


def test_rows_times_matches_matmul_and_uses_onednn_on_x86():
    generator = torch.Generator().manual_seed(2)
    rows, weight = torch.randn(300, 64, generator=generator), torch.randn(40, 64, generator=generator)
    add = torch.randn(300, 40, generator=generator)
    torch.testing.assert_close(watson.rows_times(rows, weight), rows @ weight.t())
    torch.testing.assert_close(watson.rows_times(rows, weight, add=add), rows @ weight.t() + add)
    double = rows.double()
    torch.testing.assert_close(watson.rows_times(double, weight.double()), double @ weight.double().t())
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available():
        assert watson._onednn_linear_works()  # else the transform silently runs ~2.5x slower


def test_dft_operator_has_exact_zeros_so_real_bins_have_no_imaginary_part():
    operator = watson._OPERATORS["dft"]
    bins = [i * 5 + j for i, j in watson.REAL_DFT_BINS]
    assert torch.count_nonzero(operator[:, 40:][:, bins]) == 0
    _, imaginary = watson._BlockTransform.apply(photos(32), "dft")
    assert torch.count_nonzero(imaginary[..., bins]) == 0  # no subnormal products later


@pytest.mark.parametrize("kind", ["dct", "dft"])
@pytest.mark.parametrize("channels", [3, 1])
def test_fast_block_transform_matches_plain_autograd(kind, channels):
    """The fast path's transform (colour, blocks, oneDNN product, DC offsets, hand-written
    backward) against the plain autograd transform, in float32 and float64."""
    generator = torch.Generator().manual_seed(3)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        images = torch.rand(2, channels, 16, 24, generator=generator).to(dtype)
        leaf = images.clone().requires_grad_(True)
        outputs = watson._BlockTransform.apply(leaf, kind)
        outputs = (outputs,) if kind == "dct" else outputs
        plain_leaf = images.clone().requires_grad_(True)
        transform = watson.block_transform_ycbcr if channels == 3 else watson.block_transform
        plain = transform(plain_leaf, kind)
        plain = (plain,) if kind == "dct" else (plain[..., :40], plain[..., 40:])
        weights = [torch.randn(o.shape, generator=generator).to(dtype) for o in outputs]
        sum(((o * w).sum() for o, w in zip(outputs, weights, strict=True))).backward()
        sum(((o * w).sum() for o, w in zip(plain, weights, strict=True))).backward()
        for fast, slow in zip(outputs, plain, strict=True):
            assert fast.is_contiguous()
            torch.testing.assert_close(fast, slow, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(leaf.grad, plain_leaf.grad, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("start", START_SETS)
@pytest.mark.parametrize("name", ["watson-dct", "watson-dft"])
def test_float32_fast_path_agrees_with_the_float64_formulas(name, start):
    """The float32 fast path (what training runs) against the direct NumPy implementation
    in float64, values and the gradient against float64 plain autograd."""
    target = photos(32)
    prediction = noisy(target, 0.05, seed=9)
    loss = build_loss(name, start=start)
    got = loss(prediction, target).detach().double().numpy()
    np.testing.assert_allclose(got, _reference_loss(loss, prediction, target), rtol=2e-4)
    frozen = copy.deepcopy(loss).requires_grad_(False)
    leaf = prediction.clone().requires_grad_(True)
    frozen(leaf, target).sum().backward()
    double = copy.deepcopy(loss).double()
    leaf64 = prediction.double().requires_grad_(True)
    double(leaf64, target.double().requires_grad_(True)).sum().backward()  # plain path
    # float32 rounds the phase of tiny coefficients (|C|² near δ, where the phase gradient
    # ~w/|C| is steep) differently from float64: compare the gradient as a whole
    error = (leaf.grad.double() - leaf64.grad).abs()
    scale = leaf64.grad.abs().max().item()
    assert error.max() < 1e-2 * scale
    assert (error / leaf64.grad.abs().clamp(min=1e-3)).median() < 1e-3
    assert torch.nn.functional.cosine_similarity(
        leaf.grad.double().flatten(), leaf64.grad.flatten(), dim=0) > 0.9999
    if name == "watson-dft":  # identical images: the phase term is exactly 0, what is
        # left is the formula's ε floor (Σ ε over 16 blocks × 40 bins, β = 1)
        floor = torch.full((3,), 16 * 40 * watson.EPS)
        torch.testing.assert_close(frozen(target, target), floor, rtol=1e-5, atol=0)


@pytest.mark.parametrize("start", START_SETS)
@pytest.mark.parametrize("name", ["watson-dct", "watson-dft"])
def test_fast_path_takes_non_contiguous_inputs(name, start):
    """Channels-last or strided batches (as from a channels-last model) give the same
    values and gradients as contiguous ones."""
    target = photos(32)
    prediction = noisy(target, 0.05, seed=10)
    loss = build_loss(name, start=start).requires_grad_(False)
    leaf = prediction.clone().requires_grad_(True)
    expected = loss(leaf, target)
    expected.sum().backward()
    channels_last = prediction.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    got = loss(channels_last, target.contiguous(memory_format=torch.channels_last))
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(channels_last.grad, leaf.grad)
    wide = torch.cat([prediction, prediction], dim=3)[..., ::2]  # every other column
    assert not wide.is_contiguous()
    torch.testing.assert_close(loss(wide, target), loss(wide.contiguous(), target))
    grey = photos(32, grey=True)
    grey_noisy = noisy(grey, 0.05, seed=11)
    grey_view = torch.cat([grey_noisy, grey_noisy], dim=2)[:, :, 32:]  # offset storage
    torch.testing.assert_close(loss(grey_view, grey), loss(grey_noisy, grey))
