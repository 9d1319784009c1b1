"""Stimulus sets (contract 1): read or infer the manifest, verify hashes, import, serve.

A set is a folder ``<set>/reference/<id>.png`` + ``<set>/<condition>/<id>.png`` with an
optional ``manifest.json``. Without one the manifest is inferred: every subfolder other
than ``reference`` is a condition; the images are the file stems present in
``reference/`` and in every condition.

Images are served content-addressed at ``/media/<sha256>.png``: the URL says nothing
about the condition (participants stay blind), and the content never changes under a
URL, so responses carry a one-year ``immutable`` cache and the hash as ETag.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, current_app, request, send_file
from sqlalchemy import select

from study_app.extensions import db
from study_app.models import Condition, Image, Stimulus, StimulusSet

MANIFEST_FORMAT = "pstudy-stimulus-set"
MANIFEST_VERSION = 1
REFERENCE = "reference"
IMAGE_SUFFIXES = (".png",)
MEDIA_MAX_AGE_S = 365 * 24 * 3600

bp = Blueprint("media", __name__)


class StimulusSetError(ValueError):
    """A stimulus set that cannot be imported; the message names the problem and the fix."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json_sha256(data: Any) -> str:
    """SHA-256 of ``data`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _png_size(path: Path) -> tuple[int, int, int]:
    """(height, width, channels) of an image file, via Pillow."""
    from PIL import Image as PILImage

    with PILImage.open(path) as img:
        channels = 1 if img.mode in ("1", "L", "I", "I;16", "F") else 3
        return img.height, img.width, channels


def infer_manifest(root: Path) -> dict[str, Any]:
    """Build a contract-1 manifest for a folder that has none (hashes computed here)."""
    reference = root / REFERENCE
    if not reference.is_dir():
        raise StimulusSetError(
            f"{root} has no '{REFERENCE}/' folder; a stimulus set needs "
            f"{REFERENCE}/<image_id>.png and <condition>/<image_id>.png"
        )
    conditions = sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name != REFERENCE
        and not p.name.startswith(".")
    )
    if len(conditions) < 2:
        raise StimulusSetError(
            f"{root} has {len(conditions)} condition folder(s); a 2AFC study needs at least 2 "
            "(one subfolder per method next to reference/)"
        )

    def stems(folder: Path) -> set[str]:
        return {p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}

    ids = stems(reference)
    for condition in conditions:
        ids &= stems(root / condition)
    if not ids:
        raise StimulusSetError(
            f"no image id is present in {REFERENCE}/ and in every condition folder of {root}"
        )
    ids_sorted = sorted(ids)
    height, width, channels = _png_size(reference / f"{ids_sorted[0]}.png")
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "name": root.name,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "image_size": [height, width],
        "channels": channels,
        "conditions": [
            {"name": c, "loss": None, "architecture": None, "checkpoint_sha256": None,
             "config": {}, "metrics": {}}
            for c in conditions
        ],
        "images": [
            {"id": i, "path": f"{REFERENCE}/{i}.png", "sha256": sha256_file(reference / f"{i}.png")}
            for i in ids_sorted
        ],
        "stimuli": [
            {"image_id": i, "condition": c, "path": f"{c}/{i}.png",
             "sha256": sha256_file(root / c / f"{i}.png"), "metrics": {}}
            for c in conditions for i in ids_sorted
        ],
        "provenance": {"inferred": True},
    }


def load_manifest(root: Path, verify: bool = True) -> tuple[dict[str, Any], bool]:
    """The set's manifest (read, or inferred when absent) and whether it was inferred.

    With ``verify`` every listed file must exist and match its sha256.
    """
    root = Path(root)
    if not root.is_dir():
        raise StimulusSetError(f"stimulus set folder {root} does not exist")
    path = root / "manifest.json"
    if not path.exists():
        manifest = infer_manifest(root)
        _check_paths_inside(root, [*manifest["images"], *manifest["stimuli"]], root)
        return manifest, True
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StimulusSetError(f"{path} is not valid JSON ({error}); fix or delete it") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise StimulusSetError(f"{path}: 'format' must be {MANIFEST_FORMAT!r}")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise StimulusSetError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this version reads {MANIFEST_VERSION})"
        )
    for key in ("conditions", "images", "stimuli", "image_size"):
        if key not in manifest:
            raise StimulusSetError(f"{path}: missing key {key!r}")
    names = [c["name"] for c in manifest["conditions"]]
    if REFERENCE in names or len(set(names)) != len(names) or len(names) < 2:
        raise StimulusSetError(
            f"{path}: conditions must be at least 2 distinct names other than {REFERENCE!r}"
        )
    _check_paths_inside(root, [*manifest["images"], *manifest["stimuli"]], path)
    if verify:
        for entry in [*manifest["images"], *manifest["stimuli"]]:
            file = root / entry["path"]
            if not file.exists():
                raise StimulusSetError(f"{file} is listed in the manifest but missing")
            actual = sha256_file(file)
            if actual != entry["sha256"]:
                raise StimulusSetError(
                    f"{file}: sha256 {actual} does not match the manifest ({entry['sha256']}); "
                    "the file changed after the set was written — regenerate the set"
                )
    return manifest, False


def _check_paths_inside(root: Path, entries: list[dict[str, Any]], manifest: Path) -> None:
    """Every file of the set must lie inside its folder once symlinks are resolved (a
    manifest path like ``../../etc/passwd`` would otherwise be hashed and served)."""
    real_root = Path(os.path.realpath(root))
    for entry in entries:
        relative = str(entry.get("path", ""))
        real = Path(os.path.realpath(root / relative))
        if Path(relative).is_absolute() or not real.is_relative_to(real_root):
            raise StimulusSetError(
                f"{manifest}: {relative!r} is outside the stimulus set folder; every path "
                "must be relative to the folder and stay inside it"
            )


def import_stimulus_set(root: str | os.PathLike, verify: bool = True,
                        owner_id: int | None = None) -> StimulusSet:
    """Import a set into the current session (flushes, does not commit), owned by the
    researcher ``owner_id`` (None: unowned, only admins may use it).

    Importing the same folder with the same manifest again for the same owner returns
    the existing row.
    """
    try:
        root = Path(root).resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        raise StimulusSetError(f"stimulus set folder {root} cannot be opened ({error})") from None
    manifest, inferred = load_manifest(root, verify=verify)
    digest = canonical_json_sha256(
        {k: v for k, v in manifest.items() if not (inferred and k == "created_at")}
    )
    owner = (
        StimulusSet.owner_id.is_(None) if owner_id is None else StimulusSet.owner_id == owner_id
    )
    existing = db.session.scalars(
        select(StimulusSet).where(
            StimulusSet.manifest_sha256 == digest, StimulusSet.root == str(root), owner
        )
    ).first()
    if existing is not None:
        return existing
    height, width = manifest["image_size"]
    stimulus_set = StimulusSet(
        name=manifest.get("name") or root.name, root=str(root), manifest=manifest,
        manifest_sha256=digest, manifest_inferred=inferred, image_height=int(height),
        image_width=int(width), channels=int(manifest.get("channels", 3)), owner_id=owner_id,
    )
    db.session.add(stimulus_set)
    db.session.flush()
    conditions = {}
    for entry in manifest["conditions"]:
        condition = Condition(stimulus_set_id=stimulus_set.id, name=entry["name"], info=entry)
        db.session.add(condition)
        conditions[entry["name"]] = condition
    images = {}
    for entry in manifest["images"]:
        image = Image(stimulus_set_id=stimulus_set.id, key=entry["id"], path=entry["path"],
                      sha256=entry["sha256"])
        db.session.add(image)
        images[entry["id"]] = image
    db.session.flush()
    for entry in manifest["stimuli"]:
        if entry["image_id"] not in images or entry["condition"] not in conditions:
            raise StimulusSetError(
                f"stimulus {entry['path']} names an unknown image or condition"
            )
        db.session.add(Stimulus(
            stimulus_set_id=stimulus_set.id, image_id=images[entry["image_id"]].id,
            condition_id=conditions[entry["condition"]].id, path=entry["path"],
            sha256=entry["sha256"], metrics=entry.get("metrics", {}),
        ))
    db.session.flush()
    return stimulus_set


# --------------------------------------------------------------------------- import roots


def stimulus_roots(app=None) -> list[Path]:
    """The folders the web form may import from (``STIMULUS_ROOTS``), symlinks resolved.

    ``STIMULUS_ROOTS`` is a list of folders (or one string, folders separated by
    ``os.pathsep``); relative ones are taken inside the instance folder. Default: the
    instance folder's ``stimuli/``.
    """
    from study_app.config import ConfigError

    app = app or current_app
    value = app.config.get("STIMULUS_ROOTS")
    if value is None:
        value = [os.path.join(app.instance_path, "stimuli")]
    elif isinstance(value, str | os.PathLike):
        value = [part for part in str(value).split(os.pathsep) if part]
    if not isinstance(value, list | tuple) or not value or not all(
        isinstance(item, str | os.PathLike) and str(item) for item in value
    ):
        raise ConfigError(
            f"STIMULUS_ROOTS must be a list of folders the web form may import stimulus "
            f"sets from, got {value!r} (e.g. PSTUDY_STIMULUS_ROOTS='[\"/data/stimuli\"]')"
        )
    return [Path(os.path.realpath(os.path.join(app.instance_path, item))) for item in value]


def resolve_import_path(text: str) -> Path:
    """The folder a researcher typed, symlinks resolved, if it lies inside one of the
    ``STIMULUS_ROOTS``; relative paths are taken inside the first root.

    Outside the roots the answer is the same whether the path exists or not, so the form
    tells nothing about the rest of the server's file system.
    """
    roots = stimulus_roots()
    try:
        real = Path(os.path.realpath(roots[0] / text.strip()))
    except (OSError, ValueError):  # e.g. a NUL byte or a symlink loop
        real = None
    if real is not None and any(real == root or real.is_relative_to(root) for root in roots):
        return real
    raise StimulusSetError(
        "stimulus sets can be imported only from inside "
        + ", ".join(str(root) for root in roots)
        + " (STIMULUS_ROOTS); copy the set there, or ask the administrator to add its "
        "folder to STIMULUS_ROOTS"
    )


# --------------------------------------------------------------------------- media


def media_url(sha256: str) -> str:
    """The participant-facing URL of an image with this content hash."""
    return f"/media/{sha256}.png"


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _file_for_hash(sha256: str) -> Path | None:
    row = db.session.execute(
        select(StimulusSet.root, Stimulus.path).join(
            StimulusSet, Stimulus.stimulus_set_id == StimulusSet.id
        ).where(Stimulus.sha256 == sha256).limit(1)
    ).first()
    if row is None:
        row = db.session.execute(
            select(StimulusSet.root, Image.path).join(
                StimulusSet, Image.stimulus_set_id == StimulusSet.id
            ).where(Image.sha256 == sha256).limit(1)
        ).first()
    return None if row is None else Path(row[0]) / row[1]


@bp.get("/media/<string:sha256>.png")
def media(sha256: str):
    """An image by content hash: long-lived immutable cache, ETag = the hash, 304s."""
    if not _SHA256.match(sha256):
        abort(404)
    etag = sha256
    if request.if_none_match and etag in request.if_none_match:
        response = current_app.response_class(status=304)
    else:
        path = _file_for_hash(sha256)
        if path is None or not path.exists():
            abort(404)
        response = send_file(path, mimetype="image/png", conditional=False, etag=False,
                             max_age=MEDIA_MAX_AGE_S)
    response.set_etag(etag)
    response.headers["Cache-Control"] = f"public, max-age={MEDIA_MAX_AGE_S}, immutable"
    return response
