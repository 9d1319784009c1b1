"""Metric vs humans: how well each image metric predicts the collected 2AFC choices.

For every loss in ``generation.losses.available_losses()`` the distance between the
reference and each condition's image is computed (``build_loss(name)``, lower = more
similar); on each main trial the metric "prefers" the condition with the smaller
distance. The 2AFC score (Zhang et al. 2018) per (image, pair) cell with human rate p for
condition a is p if the metric prefers a, 1 - p if it prefers b (0.5 on ties); the human
ceiling is p^2 + (1 - p)^2 (agreement of two random judges). Both are vote-weighted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.pairs import ordered_pairs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def stimulus_table(set_dir: str | Path) -> pd.DataFrame:
    """(image_id, condition, path, reference_path) for a contract-1 stimulus set folder;
    without manifest.json the layout is inferred (non-"reference" subfolders are
    conditions; image ids present in reference/ and every condition)."""
    root = Path(set_dir)
    if not (root / "reference").is_dir():
        raise ValueError(f"{root}: not a stimulus set (no reference/ folder); see contract 1")
    manifest = root / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        refs = {img["id"]: root / img["path"] for img in data.get("images", [])}
        rows = [
            {
                "image_id": s["image_id"],
                "condition": s["condition"],
                "path": root / s["path"],
                "reference_path": refs.get(s["image_id"]),
            }
            for s in data.get("stimuli", [])
        ]
        return pd.DataFrame(rows, columns=["image_id", "condition", "path", "reference_path"])

    def stems(folder: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}

    reference = stems(root / "reference")
    conditions = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "reference")
    by_condition = {c: stems(root / c) for c in conditions}
    common = (
        set(reference).intersection(*[set(v) for v in by_condition.values()])
        if conditions
        else set()
    )
    rows = [
        {"image_id": i, "condition": c, "path": by_condition[c][i], "reference_path": reference[i]}
        for c in conditions
        for i in sorted(common)
    ]
    return pd.DataFrame(rows, columns=["image_id", "condition", "path", "reference_path"])


def _load(path: Path, channels: int | None):
    import torch
    from PIL import Image

    with Image.open(path) as image:
        mode = (
            "L"
            if channels == 1 or (channels is None and image.mode in ("L", "I;16", "1"))
            else "RGB"
        )
        array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def fitted_metric_name(path: str | Path) -> str:
    """The metric name of a fitted-loss file in the tables: ``fitted:<file name>``."""
    return f"fitted:{Path(path).name}"


def _metric_builders(metrics: list[str] | None, loss_files) -> tuple[list[str], dict, dict]:
    """Names, name -> builder, name -> description for registered metrics and fitted files."""
    from generation.losses import available_losses, build_loss

    described = available_losses()
    names = list(described) if metrics is None else list(metrics)
    builders = {name: (lambda name=name: build_loss(name)) for name in names}
    for path in loss_files:
        from generation.losses.fitted import read_fitted

        name = fitted_metric_name(path)
        payload = read_fitted(path)
        if payload is None:
            raise ValueError(f"{path} is not a fitted-loss file (written by `pstudy losses fit`)")
        loss = payload["loss"]
        builders[name] = lambda loss=loss, path=path: build_loss(loss, weights=str(path))
        described[name] = f"{loss} fitted on human judgments ({path})"
        names.append(name)
    return names, builders, described


def metric_distances(
    set_dir: str | Path,
    metrics: list[str] | None = None,
    progress: bool = False,
    loss_files: tuple[str, ...] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-stimulus distances for every metric: (distances, status).

    distances: metric, image_id, condition, distance. status: metric, description,
    status ("ok" or the error a metric raised, e.g. missing offline weights).
    ``loss_files``: fitted-loss files (``pstudy losses fit``), each one more metric named
    :func:`fitted_metric_name`.
    """
    import torch

    table = stimulus_table(set_dir)
    names, builders, described = _metric_builders(metrics, loss_files)
    refs = {}
    cands = {}
    for row in table.itertuples(index=False):
        if row.image_id not in refs:
            refs[row.image_id] = _load(Path(row.reference_path), None)
        cands[(row.image_id, row.condition)] = _load(Path(row.path), refs[row.image_id].shape[0])
    keys = list(cands)
    iterator = names
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc="metrics", unit="metric", leave=False)
    rows, status = [], []
    for name in iterator:
        try:
            module = builders[name]().eval()
            values = []
            with torch.no_grad():
                for start in range(0, len(keys), 64):
                    chunk = keys[start : start + 64]
                    pred = torch.stack([cands[k] for k in chunk])
                    target = torch.stack([refs[k[0]] for k in chunk])
                    values.append(module(pred, target).detach().reshape(-1).double().numpy())
            distance = np.concatenate(values) if values else np.array([])
            rows.extend(
                {"metric": name, "image_id": k[0], "condition": k[1], "distance": float(d)}
                for k, d in zip(keys, distance, strict=True)
            )
            status.append({"metric": name, "description": described.get(name, ""), "status": "ok"})
        except Exception as exc:  # a metric that cannot run here (e.g. no offline weights)
            status.append(
                {
                    "metric": name,
                    "description": described.get(name, ""),
                    "status": f"not computed: {exc}",
                }
            )
    return (
        pd.DataFrame(rows, columns=["metric", "image_id", "condition", "distance"]),
        pd.DataFrame(status, columns=["metric", "description", "status"]),
    )


METRIC_INTERVALS = ("two-way", "images")


def metric_agreement(
    main: pd.DataFrame,
    distances: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    interval: str = "two-way",
) -> pd.DataFrame:
    """2AFC score and human ceiling per metric over main trials whose two stimuli both
    have a distance, with an interval at level 1 − ``alpha`` for the score.

    The score is the share of votes for the condition the metric prefers (ties count ½):
    a mean of per-vote agreements in [0, 1]. ``interval="two-way"`` (default): the
    interval of ``clustered.two_way_rate`` on those agreements, participants and images
    random (V_participants + V_images − V_cells, Student t; participants only with fewer
    than 5 images), so it speaks for new participants and images. ``"images"``: the old
    percentile bootstrap over images (``n_boot`` resamples, ``seed``; participants not
    resampled; it covered 0.88–0.92 instead of 0.95 in ``bench/bench_inference.py``).
    Columns: metric, n_trials, score_2afc, ci_low, ci_high, human_ceiling, ratio,
    interval (the method in words)."""
    from analysis.clustered import two_way_rate
    from analysis.intervals import group_bootstrap

    if interval not in METRIC_INTERVALS:
        raise ValueError(f"interval must be one of {', '.join(METRIC_INTERVALS)}, got {interval!r}")
    pairs = ordered_pairs(main)
    votes = pd.DataFrame(
        {
            "participant": main["participant"].astype(str).to_numpy(),
            "image_id": main["image_id"].astype(str).to_numpy(),
            "condition_a": pairs["condition_a"].to_numpy(),
            "condition_b": pairs["condition_b"].to_numpy(),
            "win_a": pairs["win_a"].to_numpy(dtype=float),
        }
    )
    rows = []
    for metric, dist in distances.groupby("metric", sort=False):
        lookup = dist.set_index(["image_id", "condition"])["distance"]
        da, db = (
            lookup.reindex(pd.MultiIndex.from_arrays([votes["image_id"], votes[column]])).to_numpy(
                dtype=float
            )
            for column in ("condition_a", "condition_b")
        )
        ok = np.isfinite(da) & np.isfinite(db)
        scored = votes[ok]
        prefers_a = np.where(da[ok] < db[ok], 1.0, np.where(da[ok] > db[ok], 0.0, 0.5))
        win_a = scored["win_a"].to_numpy()
        agree = prefers_a * win_a + (1 - prefers_a) * (1 - win_a)
        # human ceiling per (image, pair) item: p^2 + (1 - p)^2, vote-weighted
        p = scored.groupby(["image_id", "condition_a", "condition_b"])["win_a"].transform("mean")
        ceiling = p.to_numpy() ** 2 + (1 - p.to_numpy()) ** 2
        row = {
            "metric": metric,
            "n_trials": int(ok.sum()),
            "score_2afc": float(agree.mean()) if ok.any() else np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
            "human_ceiling": float(ceiling.mean()) if ok.any() else np.nan,
            "interval": "",
        }
        if ok.any() and interval == "two-way":
            result = two_way_rate(agree, scored["participant"], scored["image_id"], 1 - alpha)
            row.update(ci_low=result["ci_low"], ci_high=result["ci_high"])
            row["interval"] = result["interval"]
        elif ok.any():
            boot = group_bootstrap(
                agree, np.ones(len(agree)), scored["image_id"], n_boot, seed, alpha
            )
            row.update(ci_low=boot["ci_low"], ci_high=boot["ci_high"])
            row["interval"] = f"percentile bootstrap over images ({n_boot} replicates)"
        rows.append(row)
    columns = ["metric", "n_trials", "score_2afc", "ci_low", "ci_high", "human_ceiling", "interval"]
    table = pd.DataFrame(rows, columns=columns)
    table.insert(6, "ratio", table["score_2afc"] / table["human_ceiling"])
    return table.sort_values("score_2afc", ascending=False, ignore_index=True)


HOLDOUT_BASELINES = ("l2", "ssim")
HOLDOUT_SHARE = 0.5  # share of the images held out to score a fitted loss
HOLDOUT_COLUMNS = [
    "metric", "fitted_on_images", "scored_images", "n_trials", "score_2afc", "ci_low",
    "ci_high", "human_ceiling", "interval",
]  # fmt: skip


def held_out_groups(groups, share: float, seed: int = 0) -> np.ndarray:
    """The seeded split rule of ``fit_holdout`` (and of ``split_by_group`` in
    ``generation.calibration.judgments``): of the distinct ``groups`` (image ids, sorted),
    ``round(share × G)`` — at least 1, at most G − 1 — drawn by a permutation seeded with
    ``seed`` are held out. Returns the held-out ids, sorted. ``share`` in (0, 1)."""
    if not 0 < share < 1:
        raise ValueError(f"validation share must be in (0, 1), got {share}")
    groups = np.unique(np.asarray(groups).astype(str))
    order = np.random.default_rng(seed).permutation(len(groups))
    n_held = min(len(groups) - 1, max(1, round(share * len(groups))))
    return np.sort(groups[order[:n_held]])


def holdout_scores(
    main: pd.DataFrame, distances: pd.DataFrame, images, alpha: float = 0.05
) -> pd.DataFrame:
    """2AFC score of each metric in ``distances`` (metric, image_id, condition, distance)
    on the votes for ``images`` only (the held-out half of ``fit_holdout``): main trials
    of participants not excluded, the share of votes for the condition the metric prefers
    (ties ½), with the interval of ``metric_agreement`` — ``clustered.two_way_rate`` of
    the per-vote agreements, participants and images random (participants only with
    fewer than 5 images). Rows in the order of ``distances``; columns: metric, n_trials,
    score_2afc, ci_low, ci_high, human_ceiling, interval."""
    from analysis.pairs import included_main_trials

    votes = included_main_trials(main)
    votes = votes[votes["image_id"].astype(str).isin(set(np.asarray(images).astype(str)))]
    table = metric_agreement(votes, distances, alpha=alpha).set_index("metric")
    order = list(dict.fromkeys(distances["metric"]))
    columns = ["n_trials", "score_2afc", "ci_low", "ci_high", "human_ceiling", "interval"]
    return table.loc[order, columns].reset_index()


def fit_holdout(
    main: pd.DataFrame,
    set_dir: str | Path,
    losses: tuple[str, ...],
    seed: int = 0,
    alpha: float = 0.05,
    progress: bool = False,
) -> pd.DataFrame:
    """Fit each loss in ``losses`` on the votes of a seeded half of the images and score it
    on the other half: how well a calibrated loss predicts these participants.

    Within the fitting half, a fifth of the images decides early stopping. Rows per loss:
    the fitted and the unfitted loss, plus L2 and SSIM, all scored on the same held-out
    images (``holdout_scores``: the share of the held-out votes that agree with the
    metric, with a two-way interval, participants and images random). Columns: metric,
    fitted_on_images, scored_images, n_trials, score_2afc, ci_low, ci_high,
    human_ceiling, interval.
    """
    from generation.calibration.fit import FitSettings, fit_loss
    from generation.calibration.judgments import (
        export_cells,
        split_by_group,
        triplet_distances,
        triplets_from_cells,
    )
    from generation.losses import build_loss

    cells = export_cells(main)
    triplets = triplets_from_cells(cells, stimulus_table(set_dir))
    if triplets.n_groups < 4:
        raise ValueError(
            f"--fit-holdout needs at least 4 images with votes (2 to fit, 2 to score); "
            f"these responses have {triplets.n_groups}"
        )
    fit_half, scored = split_by_group(triplets, HOLDOUT_SHARE, seed)
    train, stop = split_by_group(fit_half, 0.2, seed)
    held = np.unique(scored.group.astype(str))
    # the scored triplets are these cells, in this order (one triplet per cell)
    scored_cells = cells[cells["image_id"].astype(str).isin(set(held))]

    def distances(name: str, module) -> pd.DataFrame:
        """``module``'s distance of each held-out (image, condition) stimulus."""
        d0, d1 = triplet_distances(module, scored)
        frame = pd.concat(
            [
                pd.DataFrame(
                    {
                        "metric": name,
                        "image_id": scored_cells["image_id"].astype(str).to_numpy(),
                        "condition": scored_cells[column].to_numpy(),
                        "distance": d,
                    }
                )
                for column, d in (("condition_a", d0), ("condition_b", d1))
            ],
            ignore_index=True,
        )
        return frame.drop_duplicates(["image_id", "condition"])

    frames = []
    for loss in losses:
        result = fit_loss(build_loss(loss), train, stop, FitSettings(seed=seed), progress=progress)
        frames.append(distances(f"{loss} (fitted on the other half)", result.module))
        frames.append(distances(f"{loss} (unfitted)", build_loss(loss)))
    frames.extend(distances(name, build_loss(name)) for name in HOLDOUT_BASELINES)
    table = holdout_scores(main, pd.concat(frames, ignore_index=True), held, alpha)
    table.insert(1, "fitted_on_images", fit_half.n_groups)
    table.insert(2, "scored_images", scored.n_groups)
    return table[HOLDOUT_COLUMNS]
