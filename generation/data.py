"""Training and test images: any image folder, or patches of scikit-image's photographs.

Images are uint8 tensors C×H×W (C = 1 or 3) until the training loop converts a batch to
float in [0, 1]. Folder images are split into train/test by a seeded hash of their
relative path (stable when files are added); the embedded default holds out the right
strip of every photograph and cuts test patches only from there, so no test pixel was
ever seen in training.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# scikit-image's bundled colour photographs (no download needed). The right strip of
# each is held out: test patches come from pixels never seen in training.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


class DataError(ValueError):
    """A data problem a user can fix (message names the folder/file and the fix)."""


@dataclass(frozen=True)
class ImageSet:
    """Images with ids: ``images`` uint8 N×C×H×W, ``ids`` N unique file-safe strings."""

    ids: list[str]
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class DataSplit:
    """Training images (a torch Dataset of uint8 C×H×W) and the held-out test images."""

    train: Dataset
    test: ImageSet
    input_sha256: str  # hash of the inputs (file contents or the photographs' pixels)
    description: str


# ----------------------------------------------------------------------------- pixels


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """H×W or H×W×C (C = 1, 3 or 4) uint8 → H×W×``channels`` (RGB ↔ grey, alpha dropped)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 4:
        array = array[:, :, :3]
    if array.shape[2] == channels:
        return array
    if channels == 3:
        return np.repeat(array[:, :, :1], 3, axis=2)
    grey = array[:, :, :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)[:, :, None]


def square_resize(image: Image.Image, size: int, crop_box: Sequence[int] | None) -> Image.Image:
    """Optional crop box, then the largest centred square, then resize to size×size."""
    if crop_box is not None:
        image = image.crop(tuple(crop_box))
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=None)
    return image


def _image_to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    array = to_channels(np.asarray(image), channels)
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), copy=True, order="C"))


def _convert(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode → RGB (3 channels) or 8-bit greyscale (1 channel)."""
    return image.convert("RGB" if channels == 3 else "L")


# ----------------------------------------------------------------------------- folders


def find_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted by relative path)."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"image folder {str(folder)!r} does not exist; check the --data path")
    if not folder.is_dir():
        raise DataError(f"{str(folder)!r} is not a folder; --data expects a folder of images")
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise DataError(
            f"no image files in {str(folder)!r} (looked recursively for "
            f"{', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def image_id(relative: str) -> str:
    """A file-safe id from a relative path: ``'a/b c.png'`` → ``'a__b_c'``."""
    stem = relative.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem.replace("/", "__"))


def _split_key(seed: int, relative: str) -> float:
    digest = hashlib.sha256(f"{seed}:{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class _FolderEntry:
    path: Path
    relative: str


class FolderDataset(Dataset):
    """Lazily decoded folder images: item i → uint8 tensor C×size×size."""

    def __init__(
        self,
        entries: Sequence[_FolderEntry],
        size: int,
        channels: int,
        crop_box: Sequence[int] | None,
    ):
        self.entries = list(entries)
        self.size, self.channels, self.crop_box = size, channels, crop_box

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.entries[index].path) as image:
            image = _convert(image, self.channels)
            return _image_to_tensor(square_resize(image, self.size, self.crop_box), self.channels)


def _check_readable(
    files: list[Path], folder: Path, size: int, crop_box: Sequence[int] | None
) -> tuple[list[_FolderEntry], str]:
    """Open every file's header; reject unreadable/too-small ones; hash the contents."""
    entries, unreadable, too_small = [], [], []
    digest = hashlib.sha256()
    for path in files:
        relative = path.relative_to(folder).as_posix()
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError):
            unreadable.append(relative)
            continue
        if crop_box is not None:
            if crop_box[2] > width or crop_box[3] > height:
                too_small.append(f"{relative} ({width}×{height} < crop box)")
                continue
            width, height = crop_box[2] - crop_box[0], crop_box[3] - crop_box[1]
        if min(width, height) < size:
            too_small.append(f"{relative} ({width}×{height})")
            continue
        digest.update(relative.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        entries.append(_FolderEntry(path, relative))
    if not entries:
        reasons = []
        if unreadable:
            reasons.append(f"{len(unreadable)} unreadable (e.g. {unreadable[0]})")
        if too_small:
            reasons.append(
                f"{len(too_small)} smaller than the model size {size}×{size} "
                f"(e.g. {too_small[0]}); lower data.image_size or use larger images"
            )
        raise DataError(f"no usable images in {str(folder)!r}: {'; '.join(reasons)}")
    if too_small:
        raise DataError(
            f"{len(too_small)} image(s) in {str(folder)!r} are smaller than the model size "
            f"{size}×{size}: {', '.join(too_small[:5])}; lower data.image_size, change the "
            "crop box or remove them"
        )
    return entries, digest.hexdigest()


def load_folder(
    folder: str | Path,
    *,
    size: int,
    channels: int,
    seed: int,
    test_fraction: float,
    n_test: int,
    crop_box: Sequence[int] | None = None,
) -> DataSplit:
    """Seeded train/test split of an image folder; the first ``n_test`` test images load."""
    folder = Path(folder)
    files = find_images(folder)
    entries, input_sha = _check_readable(files, folder, size, crop_box)
    if len(entries) < 2:
        raise DataError(
            f"{str(folder)!r} holds {len(entries)} usable image; need at least 2 (train + test)"
        )
    ids = [image_id(e.relative) for e in entries]
    if len(set(ids)) != len(ids):
        raise DataError(f"two files in {str(folder)!r} map to the same image id; rename one")
    keyed = sorted(entries, key=lambda e: _split_key(seed, e.relative))
    n_held = min(max(1, round(test_fraction * len(entries))), len(entries) - 1)
    test_entries, train_entries = keyed[:n_held], keyed[n_held:]
    shown = test_entries[:n_test]
    dataset = FolderDataset(shown, size, channels, crop_box)
    test = ImageSet(
        [image_id(e.relative) for e in shown], torch.stack([dataset[i] for i in range(len(shown))])
    )
    return DataSplit(
        train=FolderDataset(train_entries, size, channels, crop_box),
        test=test,
        input_sha256=input_sha,
        description=f"{len(train_entries)} training / {len(test_entries)} test images "
        f"from {folder} ({len(shown)} test images become stimuli)",
    )


# ----------------------------------------------------------------------------- skimage


def bundled_photo(name: str, channels: int, size: int, scale: float) -> np.ndarray:
    """A bundled photograph, its short side rescaled to ``scale × size`` (never enlarged)."""
    import skimage.data

    array = to_channels(np.asarray(getattr(skimage.data, name)()), channels)
    image = Image.fromarray(array[:, :, 0] if channels == 1 else array)
    factor = scale * size / min(image.size)
    if factor < 1:
        new_size = (
            max(size, round(image.size[0] * factor)),
            max(size, round(image.size[1] * factor)),
        )
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    return to_channels(np.asarray(image), channels)


def held_out_start(width: int, size: int, fraction: float) -> int:
    """First column of a photo's held-out strip: the right ``fraction`` of its width, at
    least one patch wide, never more than half the photo."""
    strip = min(max(size, round(fraction * width)), width // 2)
    return width - strip


def skimage_patches(
    *,
    size: int,
    channels: int,
    seed: int,
    n_train: int,
    n_test: int,
    scale: float = 4.0,
    test_fraction: float = 0.2,
) -> DataSplit:
    """Patches of scikit-image's photographs (PHOTOS), split by region: the right
    ``test_fraction`` of every photograph is held out. Training patches are random crops
    (random horizontal flips) left of that strip, at the photo's scale and twice it; test
    patches are a grid of non-overlapping patches inside the strip (the flattest quarter
    dropped, then ``n_test`` spread evenly over the rest by pixel spread). No test pixel is
    ever part of a training patch."""
    import skimage

    generator = np.random.default_rng(seed)
    digest = hashlib.sha256(
        f"skimage {skimage.__version__} size={size} ch={channels} scale={scale} "
        f"fraction={test_fraction}".encode()
    )
    regions = []  # training regions: (photo at some scale) cropped left of its test strip
    candidates = []
    for name in PHOTOS:
        for factor in (1.0, 2.0):
            photo = bundled_photo(name, channels, size, scale * factor)
            digest.update(photo.tobytes())
            start = held_out_start(photo.shape[1], size, test_fraction)
            if start >= size:
                regions.append(photo[:, :start])
            if factor != 1.0:
                continue
            for top in range(0, photo.shape[0] - size + 1, size):
                for left in range(start, photo.shape[1] - size + 1, size):
                    patch = photo[top : top + size, left : left + size]
                    candidates.append((float(patch.std()), f"{name}-{top:04d}-{left:04d}", patch))
    train = []
    for index in generator.integers(0, len(regions), n_train):
        region = regions[index]
        top = generator.integers(0, region.shape[0] - size + 1)
        left = generator.integers(0, region.shape[1] - size + 1)
        patch = region[top : top + size, left : left + size]
        if generator.random() < 0.5:
            patch = patch[:, ::-1]
        train.append(patch.transpose(2, 0, 1))
    candidates.sort(key=lambda c: (c[0], c[1]))
    if n_test > len(candidates):
        raise DataError(
            f"data.n_test={n_test} but the held-out strips of the photographs give only "
            f"{len(candidates)} patches of {size}×{size}; lower data.n_test or raise "
            "data.test_fraction / data.patch_scale"
        )
    # skip the flattest quarter (when there are enough), then spread evenly over texture
    usable = candidates[min(len(candidates) // 4, len(candidates) - n_test) :]
    picks = np.linspace(0, len(usable) - 1, n_test).round().astype(int)
    chosen = sorted((usable[i] for i in picks), key=lambda c: c[1])
    test = ImageSet(
        [c[1] for c in chosen],
        torch.from_numpy(np.stack([c[2].transpose(2, 0, 1) for c in chosen]).copy()),
    )
    train_tensor = torch.from_numpy(np.ascontiguousarray(np.stack(train)))
    return DataSplit(
        train=TensorImages(train_tensor),
        test=test,
        input_sha256=digest.hexdigest(),
        description=f"scikit-image photos {', '.join(PHOTOS)}: {n_train} training patches "
        f"left of a held-out strip (right {test_fraction:.0%}), {n_test} test patches from "
        "the strips",
    )


class TensorImages(Dataset):
    """An in-memory uint8 N×C×H×W tensor as a Dataset of C×H×W items."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def in_memory(dataset: Dataset, max_bytes: int, workers: int = 0) -> Dataset:
    """``dataset`` decoded once into :class:`TensorImages` (the same items in the same order)
    when its uint8 pixels take at most ``max_bytes``; otherwise unchanged. Training then
    holds it on the device instead of decoding every image again each epoch."""
    if isinstance(dataset, TensorImages) or len(dataset) == 0:
        return dataset
    if len(dataset) * dataset[0].numel() > max_bytes:
        return dataset
    loader = DataLoader(dataset, batch_size=256, num_workers=workers)
    return TensorImages(torch.cat(list(loader)))


def load_data(data_config: dict, seed: int) -> DataSplit:
    """The split described by the ``data`` section of a generation config."""
    if data_config["source"] == "skimage":
        return skimage_patches(
            size=data_config["image_size"],
            channels=data_config["channels"],
            seed=seed,
            n_train=data_config["train_patches"],
            n_test=data_config["n_test"],
            scale=data_config["patch_scale"],
            test_fraction=data_config["test_fraction"],
        )
    return load_folder(
        data_config["source"],
        size=data_config["image_size"],
        channels=data_config["channels"],
        seed=seed,
        test_fraction=data_config["test_fraction"],
        n_test=data_config["n_test"],
        crop_box=data_config["crop_box"],
    )
