"""Watson's perceptual model as a loss (Watson 1993; Czolbe et al. 2020): DCT and DFT.

Per channel, with reference x = target, distorted x̂ = prediction, ε = 1e-10:

1. cut into non-overlapping 8×8 blocks (sides must be multiples of 8) and transform each
   block: orthonormal DCT-II (``watson-dct``) or the real 2-D DFT, 8×5 complex
   coefficients scaled by 1/64 (``watson-dft``); both are one matrix product per block;
2. luminance masking t_L[i,j,k] = t[i,j]·((C00_k + ε)/(mean_k C00 + ε))^α with C00_k the
   reference's DC coefficient in block k and the mean over the blocks *of that image*
   (Czolbe's code averages over the whole batch, so a value there depends on the other
   images in the batch; here it does not);
3. contrast masking s = smax(t_L, (|C| + ε)^w · t_L^(1−w)), smax(a, b) = (a·eᵃ + b·eᵇ)/(eᵃ + eᵇ);
4. Minkowski pooling D = (Σ (|C − Ĉ|/s + ε)^β)^(1/β) over coefficients and blocks;
5. DFT only: steps 2–4 on amplitudes √(Re² + Im² + δ) (δ = 1e-12 in float32, 1e-30 in
   float64, the same δ as in cos Δφ below), plus the phase term
   Σ w_φ[i,j]·(arccos(cos(φ − φ̂)·(1 − 1e-7)) − arccos(1 − 1e-7)), with the weights of the
   purely real bins (0,0), (0,4), (4,0), (4,4) fixed at zero. The constant
   arccos(1 − 1e-7) is subtracted so identical images score exactly 0 (it changes no
   gradient and no ranking). cos(φ − φ̂) comes from real and imaginary parts (see
   :func:`phase_term`), not from atan2, whose gradient is NaN at zero coefficients: two
   zero coefficients agree (0°, as atan2(0, 0) = 0 in the formula), a zero against a
   non-zero one counts as 90° (the mean over an unknown phase);
6. colour: RGB → YCbCr (JPEG/BT.601 full range), one model per channel with its own
   parameters, combined with softmax channel weights (equal at start). Greyscale images
   use the luminance (Y) model alone.

Parameters (all ``nn.Parameter``, per channel): t = exp(t̃), w = sigmoid(w̃), α, β; DFT
also log phase weights. Starting values: DCT: Watson's 1993 table, α = 0.649, w = 0.7,
β = 4; DFT: t = 1, α = 0.1, w = 0.2, β = 1, phase weights e^−2 (``phase_weight=`` sets
another starting value; the formulas do not change). Inputs are used in
their [0, 1] range (as in Czolbe et al.), not rescaled to 0–255.

Speed (the fast path, taken whenever the target needs no gradient, as in training): the
colour step, the blocking and the block transform are one autograd Function
(:class:`_BlockTransform`: oneDNN's matrix product on the CPU, 8-pixel runs copied as
16-byte words, the DFT's real and imaginary halves as separate contiguous tensors), the
threshold's parameter gradients and steps 4–5 have hand-written backwards
(:class:`_ThresholdForParameters`, :class:`_FusedCore`, :class:`_FusedDFT`). The plain
autograd path (target with gradient) computes the same formulas; the tests hold the two
together. Measured costs are in docs/benchmarks.md.

Optional shift augmentation (``shift_augment=True``, training mode only): both images are
replicate-padded by 4 px and cropped back at one random offset of 0–7 px per call, as in
Czolbe's training code; off by default, so the loss is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from generation.losses.base import ImageLoss, full_precision

BLOCK = 8
EPS = 1e-10
# δ of the DFT spectrum, in amplitudes √(Re² + Im² + δ) and in cos Δφ: coefficients with
# |C|² ≲ δ have no phase (float32: |C| below ~1e-6, i.e. a pixel amplitude far below one
# 8-bit step; float64: 1e-15). One δ for both, so that √((|C|² + δ)(|Ĉ|² + δ)), the
# denominator of cos Δφ, is the product of the two amplitudes.
SPECTRUM_DELTA = {torch.float32: 1e-12, torch.float64: 1e-30}
ARCCOS_SCALE = 1 - 1e-7

# Watson's 8×8 DCT frequency-sensitivity thresholds (rows: vertical frequency, columns:
# horizontal). Source: A. B. Watson, "DCT quantization matrices visually optimized for
# individual images", Proc. SPIE 1913, Human Vision, Visual Processing and Digital Display
# IV, pp. 202-216 (1993), Table 1; reproduced in Czolbe et al., "A Loss Function for
# Generative Neural Networks Based on Watson's Perceptual Model", NeurIPS 2020.
WATSON_DCT_TABLE = (
    (1.40, 1.01, 1.16, 1.66, 2.40, 3.43, 4.79, 6.56),
    (1.01, 1.45, 1.32, 1.52, 2.00, 2.71, 3.67, 4.93),
    (1.16, 1.32, 2.24, 2.59, 2.98, 3.64, 4.60, 5.88),
    (1.66, 1.52, 2.59, 3.77, 4.55, 5.30, 6.28, 7.60),
    (2.40, 2.00, 2.98, 4.55, 6.15, 7.46, 8.71, 10.17),
    (3.43, 2.71, 3.64, 5.30, 7.46, 9.62, 11.58, 13.51),
    (4.79, 3.67, 4.60, 6.28, 8.71, 11.58, 14.50, 17.29),
    (6.56, 4.93, 5.88, 7.60, 10.17, 13.51, 17.29, 21.15),
)
DCT_START = {"alpha": 0.649, "w": 0.7, "beta": 4.0}
DFT_START = {"alpha": 0.1, "w": 0.2, "beta": 1.0, "phase_weight": math.exp(-2)}
REAL_DFT_BINS = ((0, 0), (0, 4), (4, 0), (4, 4))

# Watson's table is in 8-bit grey levels (JPEG's orthonormal DCT of 0-255 images); these
# losses see [0, 1] images, so the calibrated thresholds are the table / 255.
GREY_LEVELS = 255.0

# The contrast-sensitivity model behind Watson's table (Ahumada & Peterson 1992, "Luminance-
# model-based DCT quantization for color image compression", Proc. SPIE 1666; the form
# Watson 1993 used): the amplitude threshold (grey levels) of a cosine grating of spatial
# frequency f cycles/pixel, at angle φ, is
#     log10 A(f, φ) = log10 t_min − log10(r − (r − 1)·sin²2φ) + k·(log10 f − log10 f_min)²
# and a DCT coefficient's threshold is A / (a_i·a_j), a_0 = √(1/8), a_i>0 = 1/2 (the peak
# amplitude of the orthonormal basis function), with f = √(i² + j²)/16 and
# sin 2φ = 2·(i/16)·(j/16)/f². Least squares on log10 of the 63 AC entries of
# WATSON_DCT_TABLE gives these constants, which reproduce every entry within 0.5 % (the
# table's own rounding to 2 decimals; tests/test_losses_watson.py refits them). The DC
# entry 1.40 is a mean-luminance threshold of 1.40·a_0² = 0.175 grey levels, the same as
# the model's axis-aligned minimum t_min/r (0.175).
CSF_T_MIN = 10**-0.4488266  # grey levels
CSF_K = 1.38387611
CSF_F_MIN = 10**-1.12908988  # cycles per pixel
CSF_R = 2.03176642


def grating_threshold(fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """Amplitude threshold (8-bit grey levels) of a cosine grating with frequencies
    (fy, fx) cycles/pixel by the model above; frequency 0 gives the DC (mean) threshold."""
    fy, fx = np.abs(np.asarray(fy, dtype=np.float64)), np.abs(np.asarray(fx, dtype=np.float64))
    f = np.hypot(fy, fx)
    safe = np.where(f > 0, f, 1.0)
    sin2 = np.where(f > 0, (2 * fy * fx / safe**2) ** 2, 0.0)
    log_a = (
        np.log10(CSF_T_MIN)
        - np.log10(CSF_R - (CSF_R - 1) * sin2)
        + CSF_K * (np.log10(safe) - np.log10(CSF_F_MIN)) ** 2
    )
    dc = WATSON_DCT_TABLE[0][0] / BLOCK  # a_0² · T_00
    return np.where(f > 0, 10**log_a, dc)


def csf_dct_table() -> np.ndarray:
    """The model's DCT thresholds (grey levels, 8×8): WATSON_DCT_TABLE within 0.5 %."""
    i = np.arange(BLOCK)
    a = np.where(i == 0, math.sqrt(1 / BLOCK), 0.5)
    fy, fx = np.meshgrid(i / 16, i / 16, indexing="ij")
    table = grating_threshold(fy, fx) / np.outer(a, a)
    table[0, 0] = WATSON_DCT_TABLE[0][0]
    return table


def dft_thresholds() -> np.ndarray:
    """Calibrated Watson-DFT thresholds (8×5, for [0, 1] images and the 1/64-scaled rfft2):
    the just-visible amplitude of each bin. Bin (u, v) is a grating of (u', v)/8 cycles per
    pixel (u' = u, or u − 8 above 4); a cosine of amplitude A puts A/2 into each of its two
    conjugate bins, A into the four real bins (0,0)…(4,4), and its mean into (0, 0)."""
    u = np.arange(BLOCK)
    u = np.where(u > BLOCK // 2, u - BLOCK, u)
    v = np.arange(BLOCK // 2 + 1)
    fy, fx = np.meshgrid(u / BLOCK, v / BLOCK, indexing="ij")
    share = np.full((BLOCK, BLOCK // 2 + 1), 0.5)
    for i, j in REAL_DFT_BINS:
        share[i, j] = 1.0
    return grating_threshold(fy, fx) * share / GREY_LEVELS


# Starting parameter sets (``start=``). "published": the starting values of Czolbe et al.
# 2020 (Watson's table in grey levels on [0, 1] images; DFT t = 1, phase weights e^−2):
# the formulas' reference values, but as training losses without fitted parameters they
# give flat or black reconstructions (docs/generation.md). "calibrated" (the default):
# thresholds in the units of [0, 1] images from the same contrast-sensitivity model, for
# the DFT the phase weights below; α, w, β as published.
START_SETS = ("calibrated", "published")
# The calibrated masking exponents, both models: α = 0.1 and w = 0.2 (Czolbe et al.'s DFT
# starting values). Watson's α = 0.649 sends the threshold of a black block to ~0
# (((0 + ε)/mean DC)^0.649 ≈ 3·10⁻⁷): the few black blocks of a photo then outweigh the
# rest by ~10⁶ (an autoencoder learns black; with the thresholds in [0, 1] units the loss
# overflows); w = 0.7, applied to every coefficient of a channel including the DC, then
# masks a block's mean by itself (mid-grey: ±18 grey levels "invisible"), so even
# optimising the pixels directly stalls below 18 dB (tests/test_losses_watson.py). See
# docs/generation.md ("Watson defaults that train").
CALIBRATED_MASKING = {"alpha": 0.1, "w": 0.2}
# A phase error of Δφ on a coefficient of amplitude A moves it by the chord 2A·sin(Δφ/2)
# ≈ A·Δφ, which is Δφ thresholds when A is at threshold: weight 1 prices one radian of
# phase at a just-visible coefficient like one just-visible amplitude error.
CALIBRATED_DFT_PHASE_WEIGHT = 1.0


def starting_parameters(transform: str, start: str = "calibrated") -> dict:
    """The starting values of one parameter set: t (8×8 or 8×5 float64 array), alpha, w,
    beta (and phase_weight for the DFT)."""
    if start not in START_SETS:
        raise ValueError(f"start must be one of {', '.join(START_SETS)}, got {start!r}")
    if transform == "dct":
        table = np.array(WATSON_DCT_TABLE, dtype=np.float64)
        if start == "published":
            return {"t": table, **DCT_START}
        return {**DCT_START, **CALIBRATED_MASKING, "t": table / GREY_LEVELS}
    if start == "published":
        return {"t": np.ones((BLOCK, BLOCK // 2 + 1)), **DFT_START}
    return {
        **DFT_START,
        **CALIBRATED_MASKING,
        "t": dft_thresholds(),
        "phase_weight": CALIBRATED_DFT_PHASE_WEIGHT,
    }

# JPEG / ITU-R BT.601 full-range RGB -> YCbCr (offsets 0.5 on the chroma channels)
YCBCR_MATRIX = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
YCBCR_OFFSET = (0.0, 0.5, 0.5)


def rgb_to_ycbcr(images: torch.Tensor) -> torch.Tensor:
    """N×3×H×W RGB in [0, 1] -> N×3×H×W YCbCr in [0, 1]."""
    matrix, offset = _colour_constants(images)
    return torch.einsum("ij,njhw->nihw", matrix, images) + offset.view(1, 3, 1, 1)


def dct_matrix(size: int = BLOCK) -> np.ndarray:
    """Orthonormal DCT-II matrix D (size×size): coefficients = D @ signal."""
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix


def to_blocks(images: torch.Tensor) -> torch.Tensor:
    """N×C×H×W -> N×C×K×64 (K = H/8·W/8 blocks in row-major order, pixels row-major).

    A copy. For float32/float64 each run of 8 pixels is moved as 16-byte complex128 words
    (2 or 4 of them), ~10× faster on the CPU than copying single elements with an 8-long
    inner loop (0.35 vs 3.5 ms for 64×3×64×64 float32, one thread); same values."""
    n, c, h, w = images.shape
    group = _word_group(images)
    if group:
        words = images.reshape(n, c, h, w).contiguous().view(torch.complex128)
        words = words.reshape(n, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK // group)
        return words.transpose(3, 4).contiguous().view(images.dtype).reshape(n, c, -1, BLOCK**2)
    blocks = images.reshape(n, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(3, 4)
    return blocks.reshape(n, c, -1, BLOCK * BLOCK)


def from_blocks(blocks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: N×C×K×64 -> N×C×height×width (a copy)."""
    n, c = blocks.shape[:2]
    group = _word_group(blocks)
    if group:
        words = blocks.contiguous().view(torch.complex128)
        words = words.reshape(n, c, height // BLOCK, width // BLOCK, BLOCK, BLOCK // group)
        return words.transpose(3, 4).contiguous().view(blocks.dtype).reshape(n, c, height, width)
    grid = blocks.reshape(n, c, height // BLOCK, width // BLOCK, BLOCK, BLOCK).transpose(3, 4)
    return grid.reshape(n, c, height, width)


def _word_group(tensor: torch.Tensor) -> int:
    """How many elements make one 16-byte word (float32: 4, float64: 2), 0 when the
    word-wise copy does not apply (other dtypes, autograd history)."""
    if tensor.requires_grad or tensor.dtype not in (torch.float32, torch.float64):
        return 0
    return 16 // tensor.element_size()


def _dct_operator() -> torch.Tensor:
    """64×64 real matrix M with vec(D B Dᵀ) = vec(B) @ M (row-major vec)."""
    d = dct_matrix()
    return torch.from_numpy(np.kron(d, d).T.copy())


def _dft_operator() -> torch.Tensor:
    """64×80 real matrix: vec(B) @ M = [Re | Im] of rfft2(B)/64 (8×5 bins, row-major)."""
    u = np.arange(BLOCK)[:, None, None, None]
    v = np.arange(BLOCK // 2 + 1)[None, :, None, None]
    m = np.arange(BLOCK)[None, None, :, None]
    n = np.arange(BLOCK)[None, None, None, :]
    angle = -2 * np.pi * (u * m + v * n) / BLOCK  # bins (u, v) × pixels (m, n)
    real = (np.cos(angle) / BLOCK**2).reshape(40, 64)
    imag = (np.sin(angle) / BLOCK**2).reshape(40, 64)
    matrix = np.concatenate([real, imag], 0).T
    # exact zeros where the value is zero (sin(π·k) comes out as ~1e-16): the imaginary
    # parts of the purely real bins are then exactly 0, not ~1e-17, whose products are
    # subnormal floats (hundreds of cycles per operation on x86)
    matrix[np.abs(matrix) < 1e-12] = 0
    return torch.from_numpy(matrix.copy())


_OPERATORS: dict[str, torch.Tensor] = {"dct": _dct_operator(), "dft": _dft_operator()}
# the DC coefficient of a constant block of 1 (DCT: 8, DFT: 1)
_DC_GAIN: dict[str, float] = {kind: float(op[:, 0].sum()) for kind, op in _OPERATORS.items()}


_OPERATOR_CACHE: dict[tuple, torch.Tensor] = {}
_COLOUR_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _colour_constants(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The YCbCr matrix (3×3) and offsets (3) on ``like``'s device and dtype (cached)."""
    key = (like.device, like.dtype)
    if key not in _COLOUR_CACHE:
        _COLOUR_CACHE[key] = (
            torch.tensor(YCBCR_MATRIX, dtype=like.dtype, device=like.device),
            torch.tensor(YCBCR_OFFSET, dtype=like.dtype, device=like.device),
        )
    return _COLOUR_CACHE[key]


def _operator(kind: str, like: torch.Tensor, part: str = "all") -> torch.Tensor:
    """The transform matrix (64×B) on ``like``'s device and dtype; ``part``: ``all``,
    ``re``/``im`` (the DFT's 64×40 halves) or ``*-t`` for the contiguous transpose."""
    key = (kind, part, like.device, like.dtype)
    if key not in _OPERATOR_CACHE:
        matrix = _OPERATORS[kind].to(device=like.device, dtype=like.dtype)
        half = part.removesuffix("-t")
        if half == "re":
            matrix = matrix[:, :40]
        elif half == "im":
            matrix = matrix[:, 40:]
        if part.endswith("-t"):
            matrix = matrix.t()
        _OPERATOR_CACHE[key] = matrix.contiguous()
    return _OPERATOR_CACHE[key]


def block_transform(images: torch.Tensor, kind: str) -> torch.Tensor:
    """Blockwise transform. ``dct``: N×C×K×64 orthonormal DCT-II coefficients (8×8
    row-major); ``dft``: N×C×K×80, real parts of the 8×5 rfft2 bins / 64 then imaginary.
    Plain autograd (the reference path); the fast path is :class:`_BlockTransform`."""
    return to_blocks(images) @ _operator(kind, images)


def block_transform_ycbcr(images: torch.Tensor, kind: str) -> torch.Tensor:
    """RGB N×3×H×W -> blockwise transform of its YCbCr channels, N×3×K×B; the same as
    ``block_transform(rgb_to_ycbcr(images), kind)`` with the colour step as one batched
    matrix product (measured faster on CPU than an einsum or one combined 192×3B matrix)."""
    return block_transform(_ycbcr(images), kind)


def _ycbcr(images: torch.Tensor) -> torch.Tensor:
    """RGB N×3×H×W -> YCbCr as one batched matrix product (with the offsets)."""
    n, _, h, w = images.shape
    colour, offset = _colour_constants(images)
    ycbcr = torch.baddbmm(
        offset.view(1, 3, 1).expand(n, 3, 1), colour.expand(n, 3, 3), images.reshape(n, 3, h * w)
    )
    return ycbcr.view(n, 3, h, w)


_ONEDNN_LINEAR: list[bool] = []


def _onednn_linear_works() -> bool:
    """Whether oneDNN's linear kernel (``torch.ops.mkldnn._linear_pointwise``, the one
    PyTorch's compiler uses on the CPU) is present and agrees with ``torch.matmul``;
    checked once. On this project's AMD CPUs the default float32 GEMM (MKL) runs the
    transform's 12288×64 @ 64×40 product ~2.5× slower than oneDNN."""
    if not _ONEDNN_LINEAR:
        works = False
        try:
            if torch.backends.mkldnn.is_available():
                rows = torch.linspace(-1, 1, 96).view(16, 6)
                weight = torch.linspace(0, 2, 30).view(5, 6)
                expected = rows @ weight.t()
                linear = torch.ops.mkldnn._linear_pointwise
                got = linear(rows, weight, None, "none", [], "")
                added = linear.binary(rows, expected, weight, None, "add")
                works = bool(
                    torch.allclose(got, expected, atol=1e-5)
                    and torch.allclose(added, 2 * expected, atol=1e-5)
                )
        except (AttributeError, RuntimeError):
            works = False
        _ONEDNN_LINEAR.append(works)
    return _ONEDNN_LINEAR[0]


def rows_times(rows: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None = None):
    """rows @ weightᵀ (+ add): rows M×I, weight O×I (contiguous) -> M×O. oneDNN's kernel
    for contiguous float32 CPU tensors when it works (:func:`_onednn_linear_works`, and
    ``torch.backends.mkldnn.enabled``), else ``torch.matmul``; no autograd of its own."""
    if (
        rows.device.type == "cpu"
        and rows.dtype == torch.float32
        and torch.backends.mkldnn.enabled
        and rows.is_contiguous()
        and _onednn_linear_works()
    ):
        if add is None:
            return torch.ops.mkldnn._linear_pointwise(rows, weight, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(rows, add, weight, None, "add")
    product = rows @ weight.t()
    return product if add is None else product.add_(add)


class _BlockTransform(torch.autograd.Function):
    """Colour (RGB -> YCbCr when C = 3), 8×8 blocks and the block transform with a
    hand-written backward: images N×C×H×W -> the DCT coefficients N×C×K×64, or for the DFT
    (Re, Im) as two contiguous N×C×K×40 tensors (elementwise work on contiguous halves is
    ~4× faster than on the [Re | Im] halves of one tensor)."""

    @staticmethod
    def forward(ctx, images, kind):
        n, c, h, w = images.shape
        images = images.detach()
        if c == 3:  # the colour matrix here, its offsets (chroma + 0.5) on the DC bins below
            colour, _ = _colour_constants(images)
            images = torch.bmm(colour.expand(n, 3, 3), images.reshape(n, 3, h * w))
        rows = to_blocks(images.view(n, c, h, w)).view(-1, BLOCK**2)
        parts = ("all",) if kind == "dct" else ("re", "im")
        ctx.kind, ctx.shape, ctx.parts = kind, (n, c, h, w), parts
        outputs = tuple(
            rows_times(rows, _operator(kind, rows, f"{part}-t")).view(n, c, -1, _bins(part))
            for part in parts
        )
        if c == 3:  # a constant offset o adds o·(DC gain) to the DC coefficient only
            for channel, offset in enumerate(YCBCR_OFFSET):
                if offset:
                    outputs[0][:, channel, :, 0].add_(offset * _DC_GAIN[kind])
        return outputs[0] if kind == "dct" else outputs

    @staticmethod
    def backward(ctx, *grads):
        n, c, h, w = ctx.shape
        total = None
        for part, grad in zip(ctx.parts, grads, strict=True):
            if grad is None:
                continue
            rows = grad.reshape(-1, _bins(part)).contiguous()
            total = rows_times(rows, _operator(ctx.kind, rows, part), add=total)
        if total is None:
            return None, None
        grad_images = from_blocks(total.view(n, c, -1, BLOCK**2), h, w)
        if c == 3:  # transpose of the colour matrix
            colour, _ = _colour_constants(grad_images)
            grad_images = torch.bmm(
                colour.t().expand(n, 3, 3), grad_images.reshape(n, 3, h * w)
            ).view(n, 3, h, w)
        return grad_images, None


def _bins(part: str) -> int:
    return BLOCK**2 if part == "all" else 40


def positive_pow(base: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """base ** exponent for base > 0, as exp(exponent·log base): the same value and
    gradients, but torch.pow with a non-integer tensor exponent is ~2× slower on CPU than
    the vectorised log and exp (2.95 vs 1.33 ms for 64×3×64×40, one thread)."""
    return torch.exp(torch.log(base) * exponent)


def whole_power(
    base: torch.Tensor, exponent: torch.Tensor, log_base: torch.Tensor | None = None
) -> torch.Tensor:
    """base ** exponent (base > 0; exponent broadcastable, one value per channel), by
    multiplication when every exponent is the same whole number 1–4 on the CPU (the
    published starting β: 1 for the DFT, 4 for the DCT), else as :func:`positive_pow`
    (``log_base`` reused when given). Plain arithmetic, no autograd of its own."""
    if exponent.device.type == "cpu":
        first = float(exponent.reshape(-1)[0])
        if first in (1.0, 2.0, 3.0, 4.0) and bool((exponent == first).all()):
            if first == 1.0:
                return base
            square = base.square()
            return {2.0: square, 3.0: square * base, 4.0: square.square()}[first]
    if log_base is None:
        log_base = torch.log(base)
    return torch.exp(log_base * exponent)


def _smooth_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a·eᵃ + b·eᵇ)/(eᵃ + eᵇ), computed stably as b + (a − b)·sigmoid(a − b)."""
    return b + (a - b) * torch.sigmoid(a - b)


LOG2_E = 1 / math.log(2)


def masking_threshold(
    reference: torch.Tensor, log_t: torch.Tensor, alpha: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Steps 2–3: s = smax(t_L, (|C| + ε)^w·t_L^(1−w)) for reference coefficients (or
    amplitudes) N×C×K×B, DC at index 0; log_t: C×B, alpha, w: C. -> N×C×K×B.

    Factored for speed: t_L = t·r^α and (|C| + ε)^w·t_L^(1−w) = (|C| + ε)^w·t^(1−w)·r^(α(1−w))
    with the per-block luminance ratio r, so only a few passes touch the full tensor; the
    full-size power as exp2(w·log2(|C| + ε)) (torch.exp2 is ~4× faster than torch.exp on
    the CPU)."""
    if (torch.is_grad_enabled() and not reference.requires_grad
            and any(p.requires_grad for p in (log_t, alpha, w))):
        return _ThresholdForParameters.apply(reference, log_t, alpha.view(-1), w.view(-1))
    dc = reference[..., :1].clamp(min=0)  # N×C×K×1
    ratio = (dc + EPS) / (dc.mean(2, keepdim=True) + EPS)
    alpha, w = alpha.view(-1, 1, 1), w.view(-1, 1, 1)
    t = log_t.exp().unsqueeze(1)  # C×1×B
    t_l = t * ratio.pow(alpha)
    small = t.pow(1 - w) * ratio.pow(alpha * (1 - w))  # N×C×K×B via broadcasting, cheap factors
    if torch.is_grad_enabled() and reference.requires_grad:
        masked = positive_pow(reference.abs() + EPS, w) * small
        return _smooth_max(t_l, masked)
    # no graph needed (frozen parameters): the same arithmetic in place, fewer allocations
    masked = reference.abs().add_(EPS).log2_().mul_(w).exp2_().mul_(small)  # (|C| + ε)^w·…
    gap = t_l.sub_(masked)  # t_l − masked, reusing t_l's memory
    return masked.add_(gap.mul_(torch.sigmoid(gap)))


class _ThresholdForParameters(torch.autograd.Function):
    """:func:`masking_threshold` with a hand-written backward to the parameters only (the
    reference, the target's coefficients, needs no gradient): ~10 passes over the full
    tensor instead of ~25 through autograd. With a = t_L, b = (|C| + ε)^w·t_L^(1−w),
    s = b + (a − b)·σ(a − b): ∂s/∂a = σ + (a − b)·σ·(1 − σ), ∂s/∂b = 1 − ∂s/∂a, and
    ∂a/∂log t = a, ∂a/∂α = a·log r, ∂b/∂log t = (1 − w)·b, ∂b/∂α = (1 − w)·b·log r,
    ∂b/∂w = b·(log(|C| + ε) − log t − α·log r)."""

    @staticmethod
    def forward(ctx, reference, log_t, alpha, w):
        # a = t·r^α and the factor t^(1−w)·r^(α(1−w)) of b are outer products of small
        # tensors (one multiplication each over the full size); the only full-size
        # transcendental functions are log2 |C| and one exp2
        dc = reference[..., :1].clamp(min=0)  # N×C×K×1
        log_ratio = torch.log((dc + EPS) / (dc.mean(2, keepdim=True) + EPS))
        alpha_b, w_b = alpha.view(-1, 1, 1), w.view(-1, 1, 1)
        t = log_t.exp().unsqueeze(1)  # C×1×B
        a = t * torch.exp(alpha_b * log_ratio)  # t·r^α, N×C×K×B
        small = t.pow(1 - w_b) * torch.exp(alpha_b * (1 - w_b) * log_ratio)
        log2_magnitude = reference.abs().add_(EPS).log2_()
        # b = 2^(w·log2(|C| + ε))·t^(1−w)·r^(α(1−w))
        b = torch.mul(log2_magnitude, w_b).exp2_().mul_(small)
        gap = a - b
        sigma = torch.sigmoid(gap)
        ctx.save_for_backward(a, b, gap, sigma, log2_magnitude, log_ratio, log_t, alpha, w)
        return torch.addcmul(b, gap, sigma)

    @staticmethod
    def backward(ctx, grad):
        a, b, gap, sigma, log2_magnitude, log_ratio, log_t, alpha, w = ctx.saved_tensors
        one_minus_w = (1 - w).view(-1, 1, 1)
        # ∂s/∂a = σ + gap·σ·(1 − σ) = σ·(1 + gap − gap·σ); saved tensors stay untouched
        # (backward may run twice)
        ds_da = torch.ops.aten.sigmoid_backward(gap, sigma).add_(sigma)  # gap·σ(1 − σ) + σ
        along_a = ds_da.mul_(grad)  # grad·∂s/∂a
        along_b = torch.sub(grad, along_a).mul_(b)  # grad·∂s/∂b·b
        per_log_t = along_a.mul_(a).addcmul_(along_b, one_minus_w)  # ∂/∂log t, elementwise
        # sums over the blocks as .sum(2) then over the images (a reduction over dims
        # (0, 2) at once is ~8× slower on the CPU)
        grad_log_t = per_log_t.sum(2).sum(0)
        grad_alpha = (per_log_t.sum(3) * log_ratio[..., 0]).sum((0, 2))
        b_per_bin, b_per_block = along_b.sum(2).sum(0), along_b.sum(3)
        grad_w = (
            along_b.mul_(log2_magnitude).sum((0, 2, 3)) / LOG2_E
            - (b_per_bin * log_t).sum(-1)
            - alpha * (b_per_block * log_ratio[..., 0]).sum((0, 2))
        )
        return None, grad_log_t, grad_alpha, grad_w


def minkowski_pool(
    reference: torch.Tensor, distorted: torch.Tensor, s: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Step 4: (Σ_k,b (|C − Ĉ|/s + ε)^β)^(1/β) per image and channel: -> N×C."""
    terms = positive_pow((reference - distorted).abs() / s + EPS, beta.view(-1, 1, 1))
    return terms.sum((2, 3)).pow(1 / beta)


def watson_pooled(
    reference: torch.Tensor,
    distorted: torch.Tensor,
    log_t: torch.Tensor,
    alpha: torch.Tensor,
    w: torch.Tensor,
    beta: torch.Tensor,
) -> torch.Tensor:
    """Steps 2–4 (plain autograd): N×C×K×B coefficients -> N×C distances."""
    return minkowski_pool(reference, distorted, masking_threshold(reference, log_t, alpha, w), beta)


def phase_term(
    reference: torch.Tensor,
    distorted: torch.Tensor,
    weights: torch.Tensor,
    power: torch.Tensor | None = None,
    power_hat: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ w_φ·(arccos(cos Δφ·(1 − 1e-7)) − arccos(1 − 1e-7)) over bins and blocks -> N×C.

    ``reference``/``distorted``: N×C×K×80 ([Re | Im]); ``weights``: C×40; ``power``,
    ``power_hat``: |C|², |Ĉ|² when already computed. cos Δφ = (Re·Re' + Im·Im' + δ)/
    √((|C|² + δ)(|Ĉ|² + δ)), clamped to [−1, 1]: exactly 1 for identical coefficients
    (so identical images give exactly 0) and for two zero coefficients, about 0 (90°)
    for a zero against a non-zero one; gradients stay finite everywhere."""
    delta = SPECTRUM_DELTA[reference.dtype]
    re, im = reference[..., :40], reference[..., 40:]
    re_hat, im_hat = distorted[..., :40], distorted[..., 40:]
    if power is None:
        power = re * re + im * im
    if power_hat is None:
        power_hat = re_hat * re_hat + im_hat * im_hat
    cosine = (re * re_hat + im * im_hat + delta) / torch.sqrt((power + delta) * (power_hat + delta))
    scale = torch.tensor(ARCCOS_SCALE, dtype=reference.dtype)
    angle = torch.acos(cosine.clamp(-1, 1) * scale) - torch.acos(scale).to(reference.device)
    return torch.einsum("nckb,cb->nc", angle, weights)


class _FusedCore(torch.autograd.Function):
    """DCT step 4 in one pass with a hand-written backward (the speed-critical part).

    Inputs: reference and distorted coefficients N×C×K×64, the threshold s (N×C×K×64) and
    β (C). Output: N×C distances, equal to :func:`minkowski_pool`. Gradients flow to
    ``distorted``, ``s`` and ``beta`` (not to ``reference``: callers use the plain path
    when the target requires gradients)."""

    @staticmethod
    def forward(ctx, reference, distorted, s, beta):
        diff = reference - distorted
        x, xb, total, pooled, log_x_weighted = _pool_forward(diff, s, beta)
        ctx.save_for_backward(s, beta, x, xb, diff, total, pooled, log_x_weighted)
        return pooled

    @staticmethod
    def backward(ctx, grad):
        s, beta, x, xb, diff, total, pooled, log_x_weighted = ctx.saved_tensors
        need_distorted, need_s, need_beta = ctx.needs_input_grad[1:4]
        grad_diff, grad_s, grad_beta = _pool_backward(
            grad, s, beta, x, xb, diff, total, pooled, log_x_weighted, need_distorted, need_s, need_beta
        )
        return None, None if grad_diff is None else grad_diff.neg_(), grad_s, grad_beta


def _pool_forward(diff: torch.Tensor, s: torch.Tensor, beta: torch.Tensor):
    """Minkowski pooling of |diff|/s + ε with exponent β (C) over blocks and bins:
    -> x, x^β, Σ x^β, pooled N×C, and Σ x^β·log x (N×C, for β's gradient; empty when β
    needs none)."""
    x = diff.abs().div_(s).add_(EPS)
    # log x only when β needs its gradient; x^β by multiplication for a whole β
    log_x = torch.log(x) if beta.requires_grad else None
    xb = whole_power(x, beta.view(-1, 1, 1), log_x)
    total = xb.sum((2, 3))
    pooled = total.pow(1 / beta)
    log_x_weighted = log_x.mul_(xb).sum((2, 3)) if log_x is not None else x.new_empty(0)
    return x, xb, total, pooled, log_x_weighted


def _pool_backward(
    grad, s, beta, x, xb, diff, total, pooled, log_x_weighted, need_diff, need_s, need_beta
):
    """Gradients of :func:`_pool_forward`'s pooled value to diff, s and β (None where not
    needed); in-place arithmetic, each full-size tensor allocated once."""
    grad_diff = grad_s = grad_beta = None
    coefficient = (grad * pooled / total)[..., None, None]  # N×C×1×1
    if need_diff or need_s:
        if xb.data_ptr() == x.data_ptr():  # β = 1: ∂out/∂x · (1/s) = coefficient/s
            common = torch.div(coefficient, s)
        else:  # ∂out/∂x · (1/s)
            common = (xb / x).div_(s).mul_(coefficient)
        if need_s:
            grad_s = torch.sub(EPS, x).mul_(common)  # −(x − ε)·common
        if need_diff:
            grad_diff = common.mul_(torch.sign(diff))
    if need_beta:
        grad_beta = (
            grad * pooled * (log_x_weighted / (beta * total) - torch.log(total) / beta**2)
        ).sum(0)
    return grad_diff, grad_s, grad_beta


class _FusedDFT(torch.autograd.Function):
    """DFT steps 4–5 in one pass with a hand-written backward (the speed-critical part).

    Inputs, each N×C×K×40 and contiguous: the target's Re, Im and amplitude √(|C|² + δ),
    the prediction's Re', Im', the threshold s; β (C) and the phase weights (C×40).
    Output: N×C distances, equal to :func:`minkowski_pool` of the amplitudes plus
    :func:`phase_term`. Gradients flow to Re', Im', s, β and the phase weights (not to the
    target's tensors: callers use the plain path when the target requires gradients)."""

    @staticmethod
    def forward(ctx, re, im, amplitude, re_hat, im_hat, s, beta, phase_weights):
        delta = SPECTRUM_DELTA[re.dtype]
        power_hat = torch.mul(re_hat, re_hat).addcmul_(im_hat, im_hat).add_(delta)  # |Ĉ|² + δ
        amplitude_hat = torch.sqrt(power_hat)
        diff = amplitude - amplitude_hat
        x, xb, total, pooled, log_x_weighted = _pool_forward(diff, s, beta)
        # cos Δφ = (Re·Re' + Im·Im' + δ)/(A·A') with the amplitudes A = √(|C|² + δ), as
        # 1 − (|C − Ĉ|² − (A − A')²)/(2·A·A') (the same value: A² + A'² − 2(Re·Re' + Im·Im'
        # + δ) = |C − Ĉ|²): exactly 1 for identical inputs, and no cancellation near
        # cos = 1, where arccos is steepest
        # den = −2·A·A'/scale, so that scaled = scale − scale·(|C − Ĉ|² − (A − A')²)/(2·A·A')
        den = torch.mul(amplitude, amplitude_hat).mul_(-2 / ARCCOS_SCALE)
        chord = torch.sub(re, re_hat).square_()
        im_gap = torch.sub(im, im_hat)
        chord.addcmul_(im_gap, im_gap)
        del im_gap
        # cos·scale, clamped to ±scale: the clamp only catches rounding (|cos| ≤ 1 holds
        # exactly), so the backward takes its gradient as 1
        scaled = chord.addcmul_(diff, diff, value=-1).div_(den).add_(ARCCOS_SCALE)
        scaled.clamp_(-ARCCOS_SCALE, ARCCOS_SCALE)
        # arccos(scale) by the same kernel, dtype and device: identical images give 0 exactly
        offset = torch.acos(torch.full((), ARCCOS_SCALE, dtype=re.dtype, device=re.device))
        angle_sums = torch.acos(scaled).sub_(offset).sum(2)  # N×C×40
        out = pooled + (angle_sums * phase_weights).sum(-1)
        ctx.save_for_backward(
            re, im, re_hat, im_hat, s, beta, x, xb, diff, total, pooled, log_x_weighted,
            amplitude_hat, power_hat, den, scaled, angle_sums, phase_weights,
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        (re, im, re_hat, im_hat, s, beta, x, xb, diff, total, pooled, log_x_weighted, amplitude_hat,
         power_hat, den, scaled, angle_sums, phase_weights) = ctx.saved_tensors
        need_hat = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        need_s, need_beta, need_weights = ctx.needs_input_grad[5:8]
        # ∂out/∂|Ĉ| = −∂out/∂diff
        grad_diff, grad_s, grad_beta = _pool_backward(
            grad, s, beta, x, xb, diff, total, pooled, log_x_weighted, need_hat, need_s, need_beta
        )
        grad_weights = torch.einsum("ncb,nc->cb", angle_sums, grad) if need_weights else None
        grad_re_hat = grad_im_hat = None
        if need_hat:
            # ∂angle/∂cos = −scale/√(1 − scaled²)
            grad_cosine = torch.addcmul(scaled.new_ones(()), scaled, scaled, value=-1).rsqrt_()
            grad_cosine.mul_((-ARCCOS_SCALE) * phase_weights.unsqueeze(1) * grad[..., None, None])
            # ∂cos/∂Re' = Re/den − cos·Re'/(|Ĉ|² + δ); ∂|Ĉ|/∂Re' = Re'/|Ĉ|; same for Im:
            # grad_Re' = (grad_cos/den)·Re + (grad_|Ĉ|/|Ĉ| − grad_cos·cos/(|Ĉ|² + δ))·Re'
            # with cos = scaled/scale
            along_hat = grad_diff.div_(amplitude_hat).neg_().sub_(
                torch.mul(scaled, grad_cosine).div_(power_hat).mul_(1 / ARCCOS_SCALE))
            along_reference = grad_cosine.div_(den).mul_(-2 / ARCCOS_SCALE)  # grad_cos/(A·A')
            grad_re_hat = torch.mul(along_reference, re).addcmul_(along_hat, re_hat)
            grad_im_hat = along_reference.mul_(im).addcmul_(along_hat, im_hat)
        return None, None, None, grad_re_hat, grad_im_hat, grad_s, grad_beta, grad_weights


class WatsonLoss(ImageLoss):
    """Watson's model on 8×8 blocks; ``transform`` is ``"dct"`` or ``"dft"``."""

    min_size = BLOCK

    def __init__(
        self,
        transform: str = "dct",
        shift_augment: bool = False,
        phase_weight: float | None = None,
        start: str = "calibrated",
    ):
        super().__init__()
        if transform not in ("dct", "dft"):
            raise ValueError(f"transform must be 'dct' or 'dft', got {transform!r}")
        if start not in START_SETS:
            raise ValueError(
                f"start must be one of {', '.join(START_SETS)} (the starting parameter set), "
                f"got {start!r}"
            )
        if phase_weight is not None:
            if transform != "dft":
                raise ValueError("phase_weight applies to watson-dft only (the DCT has no phase)")
            if (
                isinstance(phase_weight, bool)
                or not isinstance(phase_weight, (int, float))
                or not math.isfinite(phase_weight)
                or phase_weight <= 0
            ):
                raise ValueError(f"phase_weight must be a number > 0, got {phase_weight!r}")
        self.transform, self.shift_augment = transform, bool(shift_augment)
        self.start = start
        self.name = f"watson-{transform}"
        channels = 3  # Y, Cb, Cr; greyscale images use the Y model
        values = starting_parameters(transform, start)
        table = torch.from_numpy(values["t"]).reshape(-1)
        self.t_tilde = nn.Parameter(table.log().float().repeat(channels, 1))
        self.alpha = nn.Parameter(torch.full((channels,), values["alpha"]))
        self.w_tilde = nn.Parameter(
            torch.full((channels,), math.log(values["w"] / (1 - values["w"])))
        )
        self.beta = nn.Parameter(torch.full((channels,), values["beta"]))
        self.channel_logits = nn.Parameter(torch.zeros(channels))
        if transform == "dft":
            start_phase = values["phase_weight"] if phase_weight is None else float(phase_weight)
            self.phase_log_weights = nn.Parameter(torch.full((channels, 40), math.log(start_phase)))
            mask = torch.ones(BLOCK, BLOCK // 2 + 1)
            for i, j in REAL_DFT_BINS:
                mask[i, j] = 0
            self.register_buffer("phase_mask", mask.reshape(40), persistent=False)

    @property
    def t(self) -> torch.Tensor:
        """Frequency thresholds, channels×8×8 (DCT) or channels×8×5 (DFT)."""
        return self.t_tilde.exp().view(self.t_tilde.shape[0], BLOCK, -1)

    @property
    def w(self) -> torch.Tensor:
        return torch.sigmoid(self.w_tilde)

    @property
    def channel_weights(self) -> torch.Tensor:
        return torch.softmax(self.channel_logits, 0)

    def _shift(self, prediction: torch.Tensor, target: torch.Tensor):
        h, w = target.shape[-2:]
        dy, dx = (int(v) for v in torch.randint(0, BLOCK, (2,)))
        both = F.pad(torch.cat([prediction, target]), (4, 4, 4, 4), mode="replicate")
        both = both[..., dy : dy + h, dx : dx + w]
        return both.chunk(2)

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h, w = prediction.shape[-2:]
        if h % BLOCK or w % BLOCK:
            raise ValueError(
                f"{self.name}: image sides must be multiples of {BLOCK} px, got {h}×{w}; "
                f"crop or resize (e.g. to {h // BLOCK * BLOCK or BLOCK}×{w // BLOCK * BLOCK or BLOCK})"
            )
        with torch.autocast(prediction.device.type, enabled=False):
            prediction, target = full_precision(prediction), full_precision(target)
            if self.shift_augment and self.training:
                prediction, target = self._shift(prediction, target)
            channels = prediction.shape[1]
            params = slice(0, channels)
            if not (target.requires_grad and torch.is_grad_enabled()):
                per_channel = self._fused(prediction, target, params)
            else:
                per_channel = self._plain(prediction, target, params)
            if channels == 1:
                return per_channel[:, 0]
            return per_channel @ self.channel_weights

    def _plain(self, prediction: torch.Tensor, target: torch.Tensor, params: slice):
        """Plain autograd (the target requires gradients): N×C per-channel distances."""
        if prediction.shape[1] == 3:
            reference = block_transform_ycbcr(target, self.transform)
            distorted = block_transform_ycbcr(prediction, self.transform)
        else:
            reference = block_transform(target, self.transform)
            distorted = block_transform(prediction, self.transform)
        log_t, alpha, w, beta = (
            self.t_tilde[params], self.alpha[params], self.w[params], self.beta[params]
        )
        if self.transform == "dct":
            return watson_pooled(reference, distorted, log_t, alpha, w, beta)
        delta = SPECTRUM_DELTA[reference.dtype]
        power = reference[..., :40].square() + reference[..., 40:].square()
        power_hat = distorted[..., :40].square() + distorted[..., 40:].square()
        per_channel = watson_pooled(
            torch.sqrt(power + delta), torch.sqrt(power_hat + delta), log_t, alpha, w, beta
        )
        weights = self.phase_log_weights[params].exp() * self.phase_mask
        return per_channel + phase_term(reference, distorted, weights, power, power_hat)

    def _fused(self, prediction: torch.Tensor, target: torch.Tensor, params: slice):
        """The fast path (target without gradient): the block transform, the threshold's
        parameter gradients and steps 4–5 with hand-written backwards. -> N×C."""
        alpha, w, log_t = self.alpha[params], self.w[params], self.t_tilde[params]
        if self.transform == "dct":
            reference = _BlockTransform.apply(target, "dct")
            distorted = _BlockTransform.apply(prediction, "dct")
            s = masking_threshold(reference, log_t, alpha, w)
            return _FusedCore.apply(reference, distorted, s, self.beta[params])
        re, im = _BlockTransform.apply(target, "dft")
        re_hat, im_hat = _BlockTransform.apply(prediction, "dft")
        delta = SPECTRUM_DELTA[re.dtype]
        amplitude = torch.mul(re, re).addcmul_(im, im).add_(delta).sqrt_()
        s = masking_threshold(amplitude, log_t, alpha, w)
        weights = self.phase_log_weights[params].exp() * self.phase_mask
        return _FusedDFT.apply(re, im, amplitude, re_hat, im_hat, s, self.beta[params], weights)

    def extra_repr(self) -> str:
        return (
            f"transform={self.transform!r}, start={self.start!r}, "
            f"shift_augment={self.shift_augment}"
        )


class WatsonDCTLoss(WatsonLoss):
    """Watson's model on 8×8 block DCT coefficients."""

    def __init__(self, shift_augment: bool = False, start: str = "calibrated"):
        super().__init__("dct", shift_augment, start=start)


class WatsonDFTLoss(WatsonLoss):
    """Watson's model on 8×8 block DFT amplitudes plus a phase term.

    ``phase_weight``: starting value of every phase weight (default e^−2, Czolbe et al.'s
    starting value); the real bins stay at zero."""

    def __init__(
        self,
        shift_augment: bool = False,
        phase_weight: float | None = None,
        start: str = "calibrated",
    ):
        super().__init__("dft", shift_augment, phase_weight, start)
