"""Simulated 2AFC judgments with a known answer: patches of the photographs shipped with
scikit-image, two distorted versions each (blur, noise, JPEG, colour), labelled by a
hidden "true" loss with logistic noise. Used by the tests (does a fit recover the truth?)
and by ``bench/bench_fit.py``. Offline and seeded.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from generation.calibration.judgments import Triplets, triplet_distances

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
DISTORTIONS = ("blur", "noise", "jpeg", "colour")


def photo_patches(size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random size×size RGB crops (count×3×size×size float32 in [0, 1]) of the
    scikit-image photographs, each photo first downscaled by 2 (more content per patch)."""
    from skimage import data, transform

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        image = getattr(data, name)()[..., :3].astype(np.float32) / 255.0
        image = transform.rescale(image, 0.5, channel_axis=2, anti_aliasing=True)
        photos.append(image.astype(np.float32))
    patches = np.empty((count, 3, size, size), np.float32)
    for index in range(count):
        image = photos[index % len(photos)]
        top = rng.integers(0, image.shape[0] - size + 1)
        left = rng.integers(0, image.shape[1] - size + 1)
        patches[index] = image[top : top + size, left : left + size].transpose(2, 0, 1)
    return patches


def distort(patch: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """One distortion of a 3×H×W patch in [0, 1]; ``level`` in [0, 1] sets its strength:
    blur σ 0.4–2.4 px, Gaussian noise σ 0.01–0.15, JPEG quality 60–5 (Pillow), colour:
    a chroma shift of up to ±0.12 plus a saturation change of up to ±60 %."""
    if kind == "blur":
        out = ndimage.gaussian_filter(
            patch, sigma=(0, 0.4 + 2 * level, 0.4 + 2 * level), mode="reflect"
        )
    elif kind == "noise":
        out = patch + (0.01 + 0.14 * level) * rng.standard_normal(patch.shape).astype(np.float32)
    elif kind == "jpeg":
        image = Image.fromarray((patch.transpose(1, 2, 0) * 255).round().astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(round(60 - 55 * level)))
        out = np.asarray(Image.open(buffer), np.float32).transpose(2, 0, 1) / 255.0
    elif kind == "colour":
        grey = patch.mean(0, keepdims=True)
        saturation = 1 + rng.choice([-1, 1]) * 0.6 * level
        shift = rng.uniform(-1, 1, size=(3, 1, 1)).astype(np.float32) * 0.12 * level
        out = grey + saturation * (patch - grey) + shift
    else:
        raise ValueError(f"unknown distortion {kind!r}; accepted: {', '.join(DISTORTIONS)}")
    return np.clip(out, 0, 1).astype(np.float32)


def distortion_triplets(
    references: int, versions: int = 6, size: int = 32, seed: int = 0
) -> Triplets:
    """Triplets over ``references`` reference patches with ``versions`` distorted versions
    each (kind and level drawn independently): every pair of versions of a reference is
    one triplet, references × versions·(versions − 1)/2 in all. Fractions are 0.5 until
    labelled with :func:`label_with`."""
    if references < 2 or versions < 2:
        raise ValueError("need at least 2 references and 2 versions per reference")
    rng = np.random.default_rng(seed)
    patches = photo_patches(size, references, seed)
    images = [patches[i] for i in range(references)]
    ref, p0, p1 = [], [], []
    for r in range(references):
        first = len(images)
        for _ in range(versions):
            kind = DISTORTIONS[rng.integers(len(DISTORTIONS))]
            images.append(distort(patches[r], kind, float(rng.uniform()), rng))
        for a in range(versions):
            for b in range(a + 1, versions):
                ref.append(r)
                p0.append(first + a)
                p1.append(first + b)
    count = len(ref)
    return Triplets(
        torch.from_numpy(np.stack(images)),
        np.asarray(ref),
        np.asarray(p0),
        np.asarray(p1),
        np.full(count, 0.5),
        np.ones(count),
        np.asarray([f"patch{r:04d}" for r in ref], dtype=object),
        {
            "kind": "synthetic",
            "path": f"distortion_triplets({references}, {versions}, size={size}, seed={seed})",
        },
    )


def true_distances(loss: torch.nn.Module, triplets: Triplets) -> tuple[np.ndarray, np.ndarray]:
    """d0, d1 of the "true" ``loss`` on every triplet (:func:`triplet_distances`)."""
    return triplet_distances(loss, triplets)


def label_with(
    loss: torch.nn.Module, triplets: Triplets, noise: float = 0.1
) -> tuple[Triplets, tuple[np.ndarray, np.ndarray]]:
    """Label ``triplets`` with the "true" ``loss``: fraction preferring p1 =
    sigmoid((d0 − d1)/τ), τ = ``noise`` × the standard deviation of d0 − d1 (logistic
    noise; smaller = more decided judges). Returns the labelled triplets and (d0, d1)."""
    d0, d1 = true_distances(loss, triplets)
    tau = noise * float(np.std(d0 - d1)) or 1.0
    fraction = 1 / (1 + np.exp(-(d0 - d1) / tau))
    labelled = triplets.subset(np.arange(len(triplets)))
    labelled.fraction = fraction
    return labelled, (d0, d1)
