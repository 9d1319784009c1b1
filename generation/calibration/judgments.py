"""2AFC judgments as triplets (reference, p0, p1, fraction preferring p1), their loaders
and the 2AFC score.

Three inputs become one :class:`Triplets`:

- a BAPPS-style folder (Zhang et al. 2018): ``ref/``, ``p0/``, ``p1/`` images and
  ``judge/<stem>.npy`` holding the fraction of people who preferred p1 (one number in
  [0, 1]); a folder of such folders (BAPPS's ``train/{traditional,cnn,mix}``) works too;
- a CSV with columns ``ref, a, b, fraction_a`` (paths relative to the CSV's folder,
  fraction of people who preferred ``a``), one row per triplet;
- this platform's export (contract 2) plus the stimulus set it came from: main trials of
  participants not excluded, every (image, pair of conditions) one triplet whose fraction
  is the observed share of votes, weighted by its number of votes.

Bad input raises :class:`JudgmentsError` naming the file (and row) and the fix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from analysis.intervals import group_bootstrap

__all__ = [
    "JudgmentsError",
    "Triplets",
    "export_cells",
    "group_bootstrap",
    "human_ceiling",
    "load_bapps",
    "load_csv",
    "load_export",
    "oracle_score",
    "score_2afc",
    "split_by_group",
    "triplet_distances",
    "triplets_from_cells",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
BAPPS_FOLDERS = ("ref", "p0", "p1", "judge")


class JudgmentsError(ValueError):
    """The judgments input is malformed; the message names the file and the fix."""


@dataclass
class Triplets:
    """N 2AFC triplets over a pool of M images.

    images: M×C×H×W float32 in [0, 1]; ref, p0, p1: N indices into ``images``;
    fraction: N floats in [0, 1], the share of judges who found p1 closer to ref;
    weight: N positive weights (votes per triplet, 1 for BAPPS/CSV); group: N reference
    ids (the unit of the train/validation split and of the bootstrap); source: where the
    data came from (kind, path, sha256).
    """

    images: torch.Tensor
    ref: np.ndarray
    p0: np.ndarray
    p1: np.ndarray
    fraction: np.ndarray
    weight: np.ndarray
    group: np.ndarray
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.fraction)

    def subset(self, rows: np.ndarray) -> Triplets:
        """The triplets at ``rows`` (same image pool)."""
        rows = np.asarray(rows)
        return Triplets(
            self.images,
            self.ref[rows],
            self.p0[rows],
            self.p1[rows],
            self.fraction[rows],
            self.weight[rows],
            self.group[rows],
            self.source,
        )

    @property
    def n_groups(self) -> int:
        return len(np.unique(self.group))


# ------------------------------------------------------------------------- the 2AFC score


def score_2afc(d0: np.ndarray, d1: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Per-triplet 2AFC score (Zhang et al. 2018): f if the metric finds p1 closer
    (d1 < d0), 1 − f if p0, 0.5 on ties; in [0, 1]."""
    d0, d1, f = (np.asarray(x, dtype=np.float64) for x in (d0, d1, fraction))
    return np.where(d1 < d0, f, np.where(d0 < d1, 1 - f, 0.5))


def human_ceiling(fraction: np.ndarray) -> np.ndarray:
    """Per-triplet agreement of two random judges, f² + (1 − f)² (LPIPS's "human" score)."""
    f = np.asarray(fraction, dtype=np.float64)
    return f**2 + (1 - f) ** 2


def oracle_score(fraction: np.ndarray) -> np.ndarray:
    """Per-triplet best 2AFC score any metric can reach, max(f, 1 − f)."""
    f = np.asarray(fraction, dtype=np.float64)
    return np.maximum(f, 1 - f)


@torch.no_grad()
def triplet_distances(
    loss: torch.nn.Module, triplets: Triplets, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """d0, d1 of ``loss`` (eval mode) on every triplet, float64 numpy; each distinct
    (candidate, reference) pair is computed once."""
    loss = loss.eval()
    pairs, inverse = unique_pairs(triplets)
    values = []
    for start in range(0, len(pairs), batch):
        chunk = torch.from_numpy(pairs[start : start + batch])
        values.append(loss(triplets.images[chunk[:, 0]], triplets.images[chunk[:, 1]]).double())
    d = torch.cat(values).numpy()[inverse]
    return d[: len(triplets)], d[len(triplets) :]


def unique_pairs(triplets: Triplets) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (candidate, reference) image pairs of the triplets (P×2) and, for the
    2N pairs (p0, ref) then (p1, ref), their row in that table."""
    both = np.concatenate(
        [np.stack([triplets.p0, triplets.ref], 1), np.stack([triplets.p1, triplets.ref], 1)]
    )
    pairs, inverse = np.unique(both, axis=0, return_inverse=True)
    return pairs, inverse.reshape(-1)


# ------------------------------------------------------------------------------- loaders


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _ImagePool:
    """Reads each image file once; all must share one size and channel count."""

    def __init__(self) -> None:
        self.index: dict[Path, int] = {}
        self.arrays: list[np.ndarray] = []
        self.hashes: list[str] = []
        self.shape: tuple[int, ...] | None = None
        self.first: Path | None = None

    def add(self, path: Path, where: str = "") -> int:
        path = Path(path)
        if path in self.index:
            return self.index[path]
        if not path.is_file():
            raise JudgmentsError(f"{where}image {path} does not exist")
        data = path.read_bytes()
        try:
            with Image.open(path) as image:
                grey = (
                    image.mode in ("L", "I;16", "1") if self.shape is None else self.shape[0] == 1
                )
                array = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.float32)
        except OSError as error:
            raise JudgmentsError(f"{where}cannot read image {path}: {error}") from None
        array = (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)) / 255.0
        if self.shape is None:
            self.shape, self.first = array.shape, path
        elif array.shape[1:] != self.shape[1:]:
            raise JudgmentsError(
                f"{where}image {path} is {array.shape[2]}×{array.shape[1]} px but {self.first} "
                f"is {self.shape[2]}×{self.shape[1]}; all images of one judgments set must have "
                "the same size (crop or resize them)"
            )
        self.index[path] = len(self.arrays)
        self.arrays.append(np.ascontiguousarray(array))
        self.hashes.append(sha256_bytes(data))
        return self.index[path]

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.stack(self.arrays)) if self.arrays else torch.empty(0)


def _check_fractions(fraction: np.ndarray, labels: list[str], what: str) -> None:
    bad = ~np.isfinite(fraction) | (fraction < 0) | (fraction > 1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise JudgmentsError(
            f"{labels[first]}: {what} {float(fraction[first]):g} is outside [0, 1]; a preference "
            f"fraction is the share of judges (0 to 1) ({int(bad.sum())} such value(s))"
        )


def _stems(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in suffixes}


def _bapps_roots(folder: Path) -> list[Path]:
    if (folder / "ref").is_dir() or (folder / "judge").is_dir() or (folder / "p0").is_dir():
        return [folder]
    roots = sorted(p.parent for p in folder.rglob("ref") if p.is_dir())
    if not roots:
        raise JudgmentsError(
            f"{folder}: not a BAPPS-style 2AFC folder; expected subfolders "
            f"{', '.join(f + '/' for f in BAPPS_FOLDERS)} (or folders that contain them)"
        )
    return roots


def load_bapps(folder: str | Path) -> Triplets:
    """Triplets from a BAPPS-style folder: ref/, p0/, p1/ images and judge/<stem>.npy (the
    fraction preferring p1), matched by file stem; or a folder of such folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise JudgmentsError(f"{folder}: no such folder (expected a BAPPS-style 2AFC folder)")
    pool = _ImagePool()
    rows, fractions, labels, groups, listing = [], [], [], [], []
    for root in _bapps_roots(folder):
        for name in BAPPS_FOLDERS:
            if not (root / name).is_dir():
                raise JudgmentsError(
                    f"{root}: missing folder {name}/ (a BAPPS 2AFC folder has "
                    f"{', '.join(f + '/' for f in BAPPS_FOLDERS)})"
                )
        refs = _stems(root / "ref", IMAGE_SUFFIXES)
        p0s, p1s = _stems(root / "p0", IMAGE_SUFFIXES), _stems(root / "p1", IMAGE_SUFFIXES)
        judges = _stems(root / "judge", (".npy",))
        if not refs:
            raise JudgmentsError(f"{root / 'ref'}: no images")
        for stem, ref_path in refs.items():
            for name, table, suffix in (
                ("p0", p0s, ".png"),
                ("p1", p1s, ".png"),
                ("judge", judges, ".npy"),
            ):
                if stem not in table:
                    raise JudgmentsError(
                        f"{root / name / (stem + suffix)} is missing: every ref/{ref_path.name} "
                        f"needs {name}/{stem}{suffix}"
                    )
            judge = judges[stem]
            try:
                value = np.load(judge, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise JudgmentsError(f"cannot read {judge}: {error}") from None
            if value.size != 1 or not np.issubdtype(value.dtype, np.number):
                raise JudgmentsError(
                    f"{judge}: expected one number (the fraction preferring p1), got an array of "
                    f"shape {value.shape} and dtype {value.dtype}"
                )
            relative = ref_path.parent.parent.relative_to(folder).as_posix()
            label = f"{relative}/{stem}" if relative != "." else stem
            rows.append(
                (
                    pool.add(ref_path),
                    pool.add(p0s[stem]),
                    pool.add(p1s[stem]),
                )
            )
            fractions.append(float(value.reshape(-1)[0]))
            labels.append(str(judge))
            groups.append(label)
            listing.append(f"{label} {sha256_bytes(judge.read_bytes())}")
        extra = sorted(set(judges) - set(refs))
        if extra:
            raise JudgmentsError(
                f"{root / 'judge' / (extra[0] + '.npy')} has no ref/{extra[0]} image "
                f"({len(extra)} judge file(s) without a reference)"
            )
    fraction = np.asarray(fractions, dtype=np.float64)
    _check_fractions(fraction, labels, "fraction")
    listing.extend(sorted(pool.hashes))
    return _triplets(
        pool,
        rows,
        fraction,
        np.ones(len(rows)),
        groups,
        {
            "kind": "bapps",
            "path": str(folder),
            "sha256": sha256_bytes("\n".join(listing).encode()),
        },
    )


def _triplets(pool: _ImagePool, rows, fraction, weight, groups, source) -> Triplets:
    index = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    return Triplets(
        pool.tensor(),
        index[:, 0].copy(),
        index[:, 1].copy(),
        index[:, 2].copy(),
        np.asarray(fraction, dtype=np.float64),
        np.asarray(weight, dtype=np.float64),
        np.asarray(groups, dtype=object),
        source,
    )


CSV_COLUMNS = ("ref", "a", "b", "fraction_a")


def load_csv(path: str | Path) -> Triplets:
    """Triplets from a CSV with columns ref, a, b, fraction_a (image paths relative to the
    CSV's folder; fraction_a = share of judges who found ``a`` closer). p0 = a, p1 = b."""
    path = Path(path)
    if not path.is_file():
        raise JudgmentsError(f"{path}: no such file (expected a CSV with {', '.join(CSV_COLUMNS)})")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError, pd.errors.ParserError) as error:
        raise JudgmentsError(f"cannot read {path}: {error}") from None
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise JudgmentsError(
            f"{path}: missing column(s) {', '.join(missing)}; a judgments CSV has columns "
            f"{', '.join(CSV_COLUMNS)} (fraction_a = share of judges preferring a)"
        )
    if frame.empty:
        raise JudgmentsError(f"{path}: no rows")
    labels = [f"{path} row {i + 2}" for i in range(len(frame))]
    fraction_a = pd.to_numeric(frame["fraction_a"], errors="coerce").to_numpy(dtype=np.float64)
    _check_fractions(fraction_a, labels, "fraction_a")
    pool, rows = _ImagePool(), []
    for label, row in zip(labels, frame.itertuples(index=False), strict=True):
        rows.append(
            tuple(
                pool.add(path.parent / getattr(row, column), f"{label}: ")
                for column in ("ref", "a", "b")
            )
        )
    return _triplets(
        pool,
        rows,
        1 - fraction_a,
        np.ones(len(rows)),
        frame["ref"].to_numpy(),
        {
            "kind": "csv",
            "path": str(path),
            "sha256": sha256_bytes(path.read_bytes() + "\n".join(sorted(pool.hashes)).encode()),
        },
    )


def export_cells(responses: pd.DataFrame) -> pd.DataFrame:
    """Vote counts per (image_id, condition_a < condition_b) over main trials of participants
    not excluded: image_id, condition_a, condition_b, n, wins_b, fraction_b."""
    from analysis.pairs import included_main_trials, ordered_pairs

    main = included_main_trials(responses)
    pairs = ordered_pairs(main)
    cells = pd.DataFrame(
        {
            "image_id": main["image_id"].astype(str).to_numpy(),
            "condition_a": pairs["condition_a"].to_numpy(),
            "condition_b": pairs["condition_b"].to_numpy(),
            "win_b": 1 - pairs["win_a"].to_numpy(),
        }
    )
    table = (
        cells.groupby(["image_id", "condition_a", "condition_b"], sort=True)["win_b"]
        .agg(n="size", wins_b="sum")
        .reset_index()
    )
    table["fraction_b"] = table["wins_b"] / table["n"]
    return table


def load_export(responses: str | Path, stimuli: str | Path) -> Triplets:
    """Triplets from a platform export (contract-2 CSV/Parquet) and its stimulus set: one per
    (image, pair of conditions) with votes; p0 = condition_a, p1 = condition_b (sorted
    names), fraction = share of votes for condition_b, weight = votes."""
    from analysis.io import ResponsesFormatError, load_responses
    from analysis.metrics import stimulus_table

    try:
        loaded = load_responses(responses)
    except ResponsesFormatError as error:
        message = str(error)
        raise JudgmentsError(
            message if str(responses) in message else f"{responses}: {message}"
        ) from None
    try:
        table = stimulus_table(stimuli)
    except (ValueError, OSError) as error:
        raise JudgmentsError(str(error)) from None
    cells = export_cells(loaded.frame)
    if cells.empty:
        raise JudgmentsError(f"{responses}: no main-trial votes of included participants")
    triplets = triplets_from_cells(cells, table, f"{responses} (stimulus set {stimuli}): ")
    triplets.source = {
        "kind": "export",
        "path": str(responses),
        "stimuli": str(stimuli),
        "sha256": loaded.input_sha256,
        "stimuli_sha256": triplets.source["stimuli_sha256"],
        "conditions": triplets.source["conditions"],
    }
    return triplets


def triplets_from_cells(cells: pd.DataFrame, table: pd.DataFrame, where: str = "") -> Triplets:
    """Triplets from vote counts per (image, pair) (:func:`export_cells`) and a stimulus
    table (``analysis.metrics.stimulus_table``): p0 = condition_a, p1 = condition_b,
    fraction = share of votes for condition_b, weight = votes, group = image id."""
    paths = {(r.image_id, r.condition): r.path for r in table.itertuples(index=False)}
    refs = {r.image_id: r.reference_path for r in table.itertuples(index=False)}
    pool, rows = _ImagePool(), []
    for cell in cells.itertuples(index=False):
        here = f"{where}image {cell.image_id!r}: "
        for key in ((cell.image_id, cell.condition_a), (cell.image_id, cell.condition_b)):
            if key not in paths:
                raise JudgmentsError(
                    f"{here}condition {key[1]!r} is not in the stimulus set; give the "
                    "stimulus set the study was run with"
                )
        rows.append(
            (
                pool.add(Path(refs[cell.image_id]), here),
                pool.add(Path(paths[(cell.image_id, cell.condition_a)]), here),
                pool.add(Path(paths[(cell.image_id, cell.condition_b)]), here),
            )
        )
    return _triplets(
        pool,
        rows,
        cells["fraction_b"].to_numpy(),
        cells["n"].to_numpy(),
        cells["image_id"].astype(str).to_numpy(),
        {
            "kind": "votes",
            "stimuli_sha256": sha256_bytes("\n".join(sorted(pool.hashes)).encode()),
            "conditions": sorted(set(cells["condition_a"]) | set(cells["condition_b"])),
        },
    )


def split_by_group(
    triplets: Triplets, validation: float = 0.2, seed: int = 0
) -> tuple[Triplets, Triplets]:
    """Seeded train/validation split by reference image (``group``): no reference is in
    both. ``validation``: share of references held out, in (0, 1); at least one each side."""
    from analysis.metrics import held_out_groups

    groups = np.unique(triplets.group.astype(str))
    if len(groups) < 2:
        raise JudgmentsError(
            f"{len(groups)} reference image(s): a train/validation split by reference needs at least 2"
        )
    held = set(held_out_groups(groups, validation, seed))
    is_val = np.array([g in held for g in triplets.group.astype(str)])
    return triplets.subset(np.flatnonzero(~is_val)), triplets.subset(np.flatnonzero(is_val))
