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
5. DFT only: steps 2–4 on amplitudes √(Re² + Im² + 1e-20), plus the phase term
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
AMPLITUDE_DELTA = 1e-20
# δ in cos Δφ: coefficients with |C|² ≲ δ have no phase (float32: |C| below ~1e-6, i.e. a
# pixel amplitude far below one 8-bit step; float64: 1e-15)
PHASE_DELTA = {torch.float32: 1e-12, torch.float64: 1e-30}
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

# JPEG / ITU-R BT.601 full-range RGB -> YCbCr (offsets 0.5 on the chroma channels)
YCBCR_MATRIX = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
YCBCR_OFFSET = (0.0, 0.5, 0.5)


def rgb_to_ycbcr(images: torch.Tensor) -> torch.Tensor:
    """N×3×H×W RGB in [0, 1] -> N×3×H×W YCbCr in [0, 1]."""
    matrix = torch.tensor(YCBCR_MATRIX, dtype=images.dtype, device=images.device)
    offset = torch.tensor(YCBCR_OFFSET, dtype=images.dtype, device=images.device)
    return torch.einsum("ij,njhw->nihw", matrix, images) + offset.view(1, 3, 1, 1)


def dct_matrix(size: int = BLOCK) -> np.ndarray:
    """Orthonormal DCT-II matrix D (size×size): coefficients = D @ signal."""
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix


def to_blocks(images: torch.Tensor) -> torch.Tensor:
    """N×C×H×W -> N×C×K×64 (K = H/8·W/8 blocks in row-major order, pixels row-major)."""
    n, c, h, w = images.shape
    blocks = images.reshape(n, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(3, 4)
    return blocks.reshape(n, c, -1, BLOCK * BLOCK)


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
    return torch.from_numpy(np.concatenate([real, imag], 0).T.copy())


_OPERATORS: dict[str, torch.Tensor] = {"dct": _dct_operator(), "dft": _dft_operator()}


_OPERATOR_CACHE: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


def block_transform(images: torch.Tensor, kind: str) -> torch.Tensor:
    """Blockwise transform. ``dct``: N×C×K×64 orthonormal DCT-II coefficients (8×8
    row-major); ``dft``: N×C×K×80, real parts of the 8×5 rfft2 bins / 64 then imaginary."""
    key = (kind, images.device, images.dtype)
    if key not in _OPERATOR_CACHE:
        _OPERATOR_CACHE[key] = _OPERATORS[kind].to(device=images.device, dtype=images.dtype)
    return to_blocks(images) @ _OPERATOR_CACHE[key]


def block_transform_ycbcr(images: torch.Tensor, kind: str) -> torch.Tensor:
    """RGB N×3×H×W -> blockwise transform of its YCbCr channels, N×3×K×B; the same as
    ``block_transform(rgb_to_ycbcr(images), kind)`` with the colour step as one batched
    matrix product (measured faster on CPU than an einsum or one combined 192×3B matrix)."""
    n, _, h, w = images.shape
    colour = torch.tensor(YCBCR_MATRIX, dtype=images.dtype, device=images.device)
    offset = torch.tensor(YCBCR_OFFSET, dtype=images.dtype, device=images.device).view(1, 3, 1)
    ycbcr = torch.baddbmm(
        offset.expand(n, 3, 1), colour.expand(n, 3, 3), images.reshape(n, 3, h * w)
    )
    return block_transform(ycbcr.view(n, 3, h, w), kind)


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


def masking_threshold(
    reference: torch.Tensor, log_t: torch.Tensor, alpha: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Steps 2–3: s = smax(t_L, (|C| + ε)^w·t_L^(1−w)) for reference coefficients (or
    amplitudes) N×C×K×B, DC at index 0; log_t: C×B, alpha, w: C. -> N×C×K×B.

    Factored for speed: t_L = t·r^α and (|C| + ε)^w·t_L^(1−w) = (|C| + ε)^w·t^(1−w)·r^(α(1−w))
    with the per-block luminance ratio r, so only a few passes touch the full tensor."""
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
    masked = reference.abs().add_(EPS).log_().mul_(w).exp_().mul_(small)  # (|C| + ε)^w·…
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
        # in-place arithmetic: each full-size tensor is allocated once (fresh allocations of
        # this size cost more than the arithmetic on the CPU)
        dc = reference[..., :1].clamp(min=0)  # N×C×K×1
        log_ratio = torch.log((dc + EPS) / (dc.mean(2, keepdim=True) + EPS))
        alpha_b, w_b = alpha.view(-1, 1, 1), w.view(-1, 1, 1)
        log_a = (alpha_b * log_ratio).add(log_t.unsqueeze(1))  # log(t·r^α), N×C×K×B
        a = torch.exp(log_a)
        log_magnitude = reference.abs().add_(EPS).log_()
        # log b = w·log(|C| + ε) + (1 − w)·log(t·r^α)
        b = torch.mul(log_magnitude, w_b).add_(log_a.mul_(1 - w_b)).exp_()
        gap = a - b
        sigma = torch.sigmoid(gap)
        ctx.save_for_backward(a, b, gap, sigma, log_magnitude, log_ratio, log_t, alpha, w)
        return torch.mul(gap, sigma).add_(b)

    @staticmethod
    def backward(ctx, grad):
        a, b, gap, sigma, log_magnitude, log_ratio, log_t, alpha, w = ctx.saved_tensors
        one_minus_w = (1 - w).view(-1, 1, 1)
        # ∂s/∂a = σ + gap·σ·(1 − σ) = σ·(1 + gap − gap·σ); saved tensors stay untouched
        # (backward may run twice)
        ds_da = torch.mul(gap, sigma).neg_().add_(gap).add_(1).mul_(sigma)
        along_a = ds_da.mul_(grad)  # grad·∂s/∂a
        along_b = torch.sub(grad, along_a).mul_(b)  # grad·∂s/∂b·b
        per_log_t = along_a.mul_(a).addcmul_(along_b, one_minus_w)  # ∂/∂log t, elementwise
        grad_log_t = per_log_t.sum((0, 2))
        grad_alpha = (per_log_t.sum(3) * log_ratio[..., 0]).sum((0, 2))
        grad_w = (
            (along_b * log_magnitude).sum((0, 2, 3))
            - (along_b.sum((0, 2)) * log_t).sum(-1)
            - alpha * (along_b.sum(3) * log_ratio[..., 0]).sum((0, 2))
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
    delta = PHASE_DELTA[reference.dtype]
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
    """Steps 4–5 in one pass with a hand-written backward (the speed-critical part).

    Inputs: reference and distorted coefficients N×C×K×B (DCT, B = 64) or [Re | Im]
    N×C×K×80 (DFT), the threshold s (N×C×K×B, or ×40), β (C), and for the DFT the phase
    weights (C×40). Output: N×C distances, equal to :func:`minkowski_pool` (+ :func:`phase_term`).
    Gradients flow to ``distorted``, ``s``, ``beta`` and the phase weights (not to
    ``reference``: callers use the plain path when the target requires gradients)."""

    @staticmethod
    def forward(ctx, reference, distorted, s, beta, phase_weights, power=None, amplitude=None):
        dft = phase_weights is not None
        beta_b = beta.view(-1, 1, 1)
        if dft:
            re, im, re_hat, im_hat = (
                reference[..., :40],
                reference[..., 40:],
                distorted[..., :40],
                distorted[..., 40:],
            )
            if power is None:
                power = re.square() + im.square()
            if amplitude is None:
                amplitude = torch.sqrt(power + AMPLITUDE_DELTA)
            power_hat = re_hat.square() + im_hat.square()  # computed exactly as ``power``
            amplitude_hat = (power_hat + AMPLITUDE_DELTA).sqrt_()
            diff = amplitude - amplitude_hat
        else:
            diff = reference - distorted
        x = diff.abs().div_(s).add_(EPS)
        # log x only when β needs its gradient; x^β by multiplication for a whole β
        log_x = torch.log(x) if beta.requires_grad else None
        xb = whole_power(x, beta_b, log_x)
        total = xb.sum((2, 3))
        pooled = total.pow(1 / beta)
        out = pooled
        saved = [distorted, s, beta, x, xb, diff, total, pooled,
                 log_x if log_x is not None else torch.empty(0)]
        if dft:
            delta = PHASE_DELTA[reference.dtype]
            # the same roundings as ``power``, so identical inputs give cos = 1 exactly
            cosine = (re * re_hat).add_(im * im_hat).add_(delta)
            den = (power + delta).mul_(power_hat.add_(delta)).sqrt_()
            cosine.div_(den)
            scaled = cosine.clamp(-1, 1).mul_(ARCCOS_SCALE)
            angle = torch.acos(scaled).sub_(
                torch.acos(torch.tensor(ARCCOS_SCALE, dtype=scaled.dtype)).item()
            )
            out = pooled + torch.einsum("nckb,cb->nc", angle, phase_weights)
            # power_hat now holds |Ĉ|² + δ
            saved += [
                reference,
                amplitude_hat,
                power_hat,
                den,
                cosine,
                scaled,
                angle,
                phase_weights,
            ]
        ctx.dft = dft
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        distorted, s, beta, x, xb, diff, total, pooled, log_x = ctx.saved_tensors[:9]
        need_distorted, need_s, need_beta = ctx.needs_input_grad[1:4]
        grad_distorted = grad_s = grad_beta = grad_weights = None
        coefficient = (grad * pooled / total)[..., None, None]  # N×C×1×1
        # in-place arithmetic below: each full-size tensor is allocated once
        grad_amplitude = None
        if need_distorted or need_s:
            if xb is x:  # β = 1: ∂out/∂x · (1/s) = coefficient/s
                common = torch.div(coefficient, s)
            else:  # ∂out/∂x · (1/s)
                common = (xb / x).div_(s).mul_(coefficient)
            if need_s:
                grad_s = (x - EPS).mul_(common).neg_()
            if need_distorted:  # ∂out/∂Ĉ (DCT) or ∂out/∂|Ĉ| (DFT)
                grad_amplitude = common.mul_(torch.sign(diff)).neg_()
        if need_beta:
            log_x_weighted = (xb * log_x).sum((2, 3))
            grad_beta = (
                grad * pooled * (log_x_weighted / (beta * total) - torch.log(total) / beta**2)
            ).sum(0)
        if not ctx.dft:
            return None, grad_amplitude, grad_s, grad_beta, None, None, None
        reference, amplitude_hat, power_hat_delta, den, cosine, scaled, angle, phase_weights = (
            ctx.saved_tensors[9:]
        )
        if ctx.needs_input_grad[4]:
            grad_weights = torch.einsum("nckb,nc->cb", angle, grad)
        if need_distorted:
            re, im = reference[..., :40], reference[..., 40:]
            re_hat, im_hat = distorted[..., :40], distorted[..., 40:]
            # ∂angle/∂cos = −scale/√(1 − scaled²) inside the clamp, 0 outside
            grad_cosine = scaled.square().neg_().add_(1).rsqrt_()
            lowest, highest = torch.aminmax(cosine)
            if lowest < -1 or highest > 1:  # rounding pushed some past the clamp
                grad_cosine.masked_fill_(cosine.abs() > 1, 0)
            grad_cosine.mul_((-ARCCOS_SCALE) * phase_weights.unsqueeze(1) * grad[..., None, None])
            # ∂cos/∂Re' = Re/den − cos·Re'/(|Ĉ|² + δ); ∂|Ĉ|/∂Re' = Re'/|Ĉ|; same for Im:
            # grad_Re' = (grad_cos/den)·Re + (grad_|Ĉ|/|Ĉ| − grad_cos·cos/(|Ĉ|² + δ))·Re'
            along_hat = grad_amplitude.div_(amplitude_hat).sub_(
                cosine.mul(grad_cosine).div_(power_hat_delta))
            along_reference = grad_cosine.div_(den)
            grad_distorted = torch.empty_like(distorted)
            torch.mul(along_reference, re, out=grad_distorted[..., :40])
            grad_distorted[..., :40].addcmul_(along_hat, re_hat)
            torch.mul(along_reference, im, out=grad_distorted[..., 40:])
            grad_distorted[..., 40:].addcmul_(along_hat, im_hat)
        return None, grad_distorted, grad_s, grad_beta, grad_weights, None, None


class WatsonLoss(ImageLoss):
    """Watson's model on 8×8 blocks; ``transform`` is ``"dct"`` or ``"dft"``."""

    min_size = BLOCK

    def __init__(
        self,
        transform: str = "dct",
        shift_augment: bool = False,
        phase_weight: float | None = None,
    ):
        super().__init__()
        if transform not in ("dct", "dft"):
            raise ValueError(f"transform must be 'dct' or 'dft', got {transform!r}")
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
        self.name = f"watson-{transform}"
        channels = 3  # Y, Cb, Cr; greyscale images use the Y model
        if transform == "dct":
            start, table = (
                DCT_START,
                torch.tensor(WATSON_DCT_TABLE, dtype=torch.float64).reshape(64),
            )
        else:
            start, table = DFT_START, torch.ones(40, dtype=torch.float64)
        self.t_tilde = nn.Parameter(table.log().float().repeat(channels, 1))
        self.alpha = nn.Parameter(torch.full((channels,), start["alpha"]))
        self.w_tilde = nn.Parameter(
            torch.full((channels,), math.log(start["w"] / (1 - start["w"])))
        )
        self.beta = nn.Parameter(torch.full((channels,), start["beta"]))
        self.channel_logits = nn.Parameter(torch.zeros(channels))
        if transform == "dft":
            start_phase = start["phase_weight"] if phase_weight is None else float(phase_weight)
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
            if channels == 3:
                reference = block_transform_ycbcr(target, self.transform)
                distorted = block_transform_ycbcr(prediction, self.transform)
            else:
                reference = block_transform(target, self.transform)
                distorted = block_transform(prediction, self.transform)
            if not (reference.requires_grad and torch.is_grad_enabled()):
                per_channel = self._fused(reference, distorted, params)
            elif self.transform == "dct":
                per_channel = watson_pooled(
                    reference,
                    distorted,
                    self.t_tilde[params],
                    self.alpha[params],
                    self.w[params],
                    self.beta[params],
                )
            else:
                power = reference[..., :40].square() + reference[..., 40:].square()
                power_hat = distorted[..., :40].square() + distorted[..., 40:].square()
                per_channel = watson_pooled(
                    torch.sqrt(power + AMPLITUDE_DELTA),
                    torch.sqrt(power_hat + AMPLITUDE_DELTA),
                    self.t_tilde[params],
                    self.alpha[params],
                    self.w[params],
                    self.beta[params],
                )
                weights = self.phase_log_weights[params].exp() * self.phase_mask
                per_channel = per_channel + phase_term(
                    reference, distorted, weights, power, power_hat
                )
            if channels == 1:
                return per_channel[:, 0]
            return per_channel @ self.channel_weights

    def _fused(
        self, reference: torch.Tensor, distorted: torch.Tensor, params: slice
    ) -> torch.Tensor:
        """The fast path (target without gradient): threshold by autograd, the rest fused."""
        alpha, w, log_t = self.alpha[params], self.w[params], self.t_tilde[params]
        if self.transform == "dct":
            s = masking_threshold(reference, log_t, alpha, w)
            return _FusedCore.apply(reference, distorted, s, self.beta[params], None)
        power = reference[..., :40].square().add_(reference[..., 40:].square())
        amplitude = (power + AMPLITUDE_DELTA).sqrt_()
        s = masking_threshold(amplitude, log_t, alpha, w)
        weights = self.phase_log_weights[params].exp() * self.phase_mask
        return _FusedCore.apply(
            reference, distorted, s, self.beta[params], weights, power, amplitude
        )

    def extra_repr(self) -> str:
        return f"transform={self.transform!r}, shift_augment={self.shift_augment}"


class WatsonDCTLoss(WatsonLoss):
    """Watson's model on 8×8 block DCT coefficients."""

    def __init__(self, shift_augment: bool = False):
        super().__init__("dct", shift_augment)


class WatsonDFTLoss(WatsonLoss):
    """Watson's model on 8×8 block DFT amplitudes plus a phase term.

    ``phase_weight``: starting value of every phase weight (default e^−2, Czolbe et al.'s
    starting value); the real bins stay at zero."""

    def __init__(self, shift_augment: bool = False, phase_weight: float | None = None):
        super().__init__("dft", shift_augment, phase_weight)
