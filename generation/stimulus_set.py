"""Writing and validating a stimulus set (contract 1, ``docs/generation.md``).

Layout: ``<set>/manifest.json``, ``<set>/reference/<image_id>.png``,
``<set>/<condition>/<image_id>.png``. :func:`validate_stimulus_set` checks a set with or
without a manifest (without one, the manifest is inferred from the folders).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

FORMAT = "pstudy-stimulus-set"
FORMAT_VERSION = 1
REFERENCE = "reference"
GENERATED_FILES = ("evaluation.csv", "evaluation_per_image.csv", "contact_sheet.png")


class StimulusSetError(ValueError):
    """A stimulus set that does not satisfy contract 1; ``problems`` lists every issue."""

    def __init__(self, path: str | Path, problems: Sequence[str]):
        self.problems = list(problems)
        shown = "; ".join(self.problems[:10])
        more = f" (and {len(self.problems) - 10} more)" if len(self.problems) > 10 else ""
        super().__init__(f"stimulus set {str(path)!r} is not valid: {shown}{more}")


def png_bytes(image: torch.Tensor | np.ndarray) -> bytes:
    """Encode a uint8 C×H×W image (C = 1 or 3) as PNG bytes (no metadata, deterministic)."""
    array = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(
            f"expected a uint8 C×H×W image with C = 1 or 3, got {array.dtype} {array.shape}"
        )
    hwc = array.transpose(1, 2, 0)
    pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def read_png(path: str | Path) -> torch.Tensor:
    """A PNG file → uint8 C×H×W tensor (C = 1 for greyscale, else 3)."""
    with Image.open(path) as image:
        mode = "L" if image.mode in ("L", "I;16", "I", "1") else "RGB"
        array = np.asarray(image.convert(mode))
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def prepare_output(out: str | Path) -> Path:
    """Make ``out`` ready for a new set: create it, or clear what an earlier set wrote
    there (the folders and files its manifest names). A non-empty folder that is not a
    stimulus set is refused, so nothing of the user's is deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StimulusSetError(out, ["--out exists and is not a folder"])
    manifest_path = out / "manifest.json"
    if out.exists() and any(out.iterdir()):
        if not manifest_path.exists():
            raise StimulusSetError(
                out,
                [
                    "--out is a non-empty folder without manifest.json; choose an empty or new "
                    "folder (or an earlier stimulus set to replace)"
                ],
            )
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
            folders = {REFERENCE, *(c["name"] for c in old.get("conditions", []))}
        except (ValueError, KeyError, TypeError):
            raise StimulusSetError(
                out,
                ["--out holds an unreadable manifest.json; remove the folder or choose another"],
            ) from None
        for folder in folders:
            if folder and "/" not in folder and (out / folder).is_dir():
                shutil.rmtree(out / folder)
        for name in (*GENERATED_FILES, "manifest.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_stimulus_set(
    out: str | Path,
    *,
    name: str,
    image_ids: Sequence[str],
    references: torch.Tensor,
    stimuli: Mapping[str, torch.Tensor],
    conditions: Sequence[Mapping[str, Any]],
    per_image_metrics: Mapping[tuple[str, str], Mapping[str, float]],
    provenance: Mapping[str, Any],
) -> dict[str, Any]:
    """Write PNGs and ``manifest.json``; return the manifest.

    ``references`` and each ``stimuli[condition]`` are uint8 N×C×H×W in ``image_ids``
    order; ``conditions`` carry name, loss, architecture, checkpoint_sha256, config,
    metrics (means), optionally guard (the degeneracy guard's verdict) and rate (the rate
    constraint's summary); ``per_image_metrics[(image_id, condition)]`` = {metric: value}.
    """
    out = Path(out)
    n, channels, height, width = references.shape
    images = []
    for index, image_id in enumerate(image_ids):
        path = f"{REFERENCE}/{image_id}.png"
        images.append(
            {
                "id": image_id,
                "path": path,
                "sha256": _write(out / path, png_bytes(references[index])),
            }
        )
    records = []
    for condition in conditions:
        cname = condition["name"]
        for index, image_id in enumerate(image_ids):
            path = f"{cname}/{image_id}.png"
            records.append(
                {
                    "image_id": image_id,
                    "condition": cname,
                    "path": path,
                    "sha256": _write(out / path, png_bytes(stimuli[cname][index])),
                    "metrics": dict(per_image_metrics.get((image_id, cname), {})),
                }
            )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "image_size": [int(height), int(width)],
        "channels": int(channels),
        "conditions": [
            {
                **{
                    key: condition.get(key)
                    for key in (
                        "name",
                        "loss",
                        "architecture",
                        "checkpoint_sha256",
                        "config",
                        "metrics",
                    )
                },
                # the degeneracy guard's verdict and the rate constraint's summary, when given
                **{key: condition[key] for key in ("guard", "rate") if key in condition},
            }
            for condition in conditions
        ],
        "images": images,
        "stimuli": records,
        "provenance": dict(provenance),
    }
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    return manifest


def infer_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a folder without ``manifest.json``: every subfolder but
    ``reference`` is a condition; image ids are the PNG stems present in all of them."""
    path = Path(path)
    if not (path / REFERENCE).is_dir():
        raise StimulusSetError(path, [f"no {REFERENCE}/ folder"])
    folders = sorted(
        p.name
        for p in path.iterdir()
        if p.is_dir() and p.name != REFERENCE and not p.name.startswith(".")
    )
    if not folders:
        raise StimulusSetError(path, ["no condition folders next to reference/"])
    stems = {p.stem for p in (path / REFERENCE).glob("*.png")}
    for folder in folders:
        stems &= {p.stem for p in (path / folder).glob("*.png")}
    if not stems:
        raise StimulusSetError(path, ["no image id has a PNG in reference/ and every condition"])
    ids = sorted(stems)
    first = read_png(path / REFERENCE / f"{ids[0]}.png")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": path.name,
        "created_at": None,
        "image_size": [int(first.shape[1]), int(first.shape[2])],
        "channels": int(first.shape[0]),
        "conditions": [
            {
                "name": f,
                "loss": None,
                "architecture": None,
                "checkpoint_sha256": None,
                "config": {},
                "metrics": {},
            }
            for f in folders
        ],
        "images": [
            {
                "id": i,
                "path": f"{REFERENCE}/{i}.png",
                "sha256": sha256_file(path / REFERENCE / f"{i}.png"),
            }
            for i in ids
        ],
        "stimuli": [
            {
                "image_id": i,
                "condition": f,
                "path": f"{f}/{i}.png",
                "sha256": sha256_file(path / f / f"{i}.png"),
                "metrics": {},
            }
            for f in folders
            for i in ids
        ],
        "provenance": {},
    }


def validate_stimulus_set(path: str | Path) -> dict[str, Any]:
    """Check a stimulus set against contract 1 and return its manifest.

    Checks: format tag/version, every condition × every image present exactly once,
    every file exists, decodes with the manifest's size/channels and matches its sha256.
    Raises :class:`StimulusSetError` listing every problem found.
    """
    path = Path(path)
    if not path.is_dir():
        raise StimulusSetError(path, ["folder does not exist"])
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        return infer_manifest(path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise StimulusSetError(path, [f"manifest.json is not JSON: {error}"]) from None
    problems: list[str] = []
    required = (
        "format",
        "format_version",
        "name",
        "created_at",
        "image_size",
        "channels",
        "conditions",
        "images",
        "stimuli",
        "provenance",
    )
    missing = [key for key in required if key not in manifest]
    if missing:
        raise StimulusSetError(path, [f"manifest.json lacks {', '.join(missing)}"])
    if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
        problems.append(f"format must be {FORMAT!r} version {FORMAT_VERSION}")
    size, channels = manifest["image_size"], manifest["channels"]
    conditions = [c.get("name") for c in manifest["conditions"]]
    ids = [image.get("id") for image in manifest["images"]]
    if len(set(conditions)) != len(conditions) or REFERENCE in conditions:
        problems.append("condition names must be unique and not 'reference'")
    if len(set(ids)) != len(ids):
        problems.append("image ids must be unique")
    entries = [
        (image["path"], image["sha256"], f"reference image {image['id']}")
        for image in manifest["images"]
    ]
    seen: dict[tuple[str, str], int] = {}
    for stimulus in manifest["stimuli"]:
        key = (stimulus.get("image_id"), stimulus.get("condition"))
        seen[key] = seen.get(key, 0) + 1
        if stimulus.get("path") != f"{key[1]}/{key[0]}.png":
            problems.append(
                f"stimulus {key} has path {stimulus.get('path')!r}, expected "
                f"'{key[1]}/{key[0]}.png'"
            )
        entries.append((stimulus.get("path", ""), stimulus.get("sha256"), f"stimulus {key}"))
    for condition in conditions:
        for image_id in ids:
            count = seen.get((image_id, condition), 0)
            if count != 1:
                problems.append(
                    f"condition {condition!r} has {count} stimuli for image {image_id!r}"
                )
    extra = set(seen) - {(i, c) for i in ids for c in conditions}
    if extra:
        problems.append(
            f"{len(extra)} stimuli name unknown images/conditions, e.g. {sorted(extra)[0]}"
        )
    for relative, digest, what in entries:
        file = path / relative
        if not file.is_file():
            problems.append(f"{what}: file {relative} is missing")
            continue
        if sha256_file(file) != digest:
            problems.append(f"{what}: sha256 of {relative} does not match the manifest")
            continue
        image = read_png(file)
        if list(image.shape[1:]) != list(size) or image.shape[0] != channels:
            problems.append(
                f"{what}: {relative} is {tuple(image.shape)}, expected "
                f"{channels}×{size[0]}×{size[1]}"
            )
    if problems:
        raise StimulusSetError(path, problems)
    return manifest
