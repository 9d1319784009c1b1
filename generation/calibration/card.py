"""The model card of a fitted loss: a JSON file next to the weights file
(``<weights>.card.json``) that says what was fitted on what, and how well it predicts
held-out judgments compared with the unfitted loss, L2, SSIM and the judges themselves.

Scores are vote-weighted 2AFC scores on the validation triplets with a 95 % percentile
bootstrap interval over reference images (:func:`group_bootstrap`, 1000 resamples).
``human_ceiling`` is LPIPS's human score, mean f² + (1 − f)² (how often two random judges
agree); ``oracle`` is mean max(f, 1 − f), the best score any metric can reach.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from generation.calibration.fit import FitResult
from generation.calibration.judgments import (
    Triplets,
    group_bootstrap,
    human_ceiling,
    oracle_score,
    score_2afc,
    triplet_distances,
)
from generation.stimulus_set import sha256_file

BASELINES = ("l2", "ssim")


def card_path(weights: str | Path) -> Path:
    """Where the card of a weights file lives: ``fit/watson-dft.pt`` -> ``fit/watson-dft.pt.card.json``."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".card.json")


def score_summary(d0: np.ndarray, d1: np.ndarray, triplets: Triplets, seed: int = 0) -> dict:
    """{mean, ci_low, ci_high, n_groups} of the 2AFC score of distances d0, d1."""
    scores = score_2afc(d0, d1, triplets.fraction)
    return group_bootstrap(scores, triplets.weight, triplets.group, seed=seed)


def baseline_scores(triplets: Triplets, seed: int = 0) -> dict[str, dict]:
    """2AFC score summaries of L2 and SSIM on ``triplets``."""
    from generation.losses import build_loss

    return {
        name: score_summary(*triplet_distances(build_loss(name), triplets), triplets, seed)
        for name in BASELINES
    }


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "numpy", "perceptual-study-platform"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_card(
    *,
    loss: str,
    options: dict,
    result: FitResult,
    train: Triplets,
    validation: Triplets,
    weights_path: str | Path,
    split: dict,
    device: str,
    seed: int = 0,
) -> dict:
    """The card as a JSON-ready mapping (see the module docstring)."""
    val = validation
    return {
        "format": "pstudy-fitted-loss-card",
        "version": 1,
        "loss": loss,
        "options": options,
        "weights_file": Path(weights_path).name,
        "weights_sha256": sha256_file(weights_path),
        "data": dict(train.source),
        "split": {
            **split,
            "unit": "reference image",
            "train_triplets": len(train),
            "train_references": train.n_groups,
            "validation_triplets": len(val),
            "validation_references": val.n_groups,
            "validation_votes": float(val.weight.sum()),
        },
        "training": {
            **result.settings_dict(),
            "device": device,
            "optimizer": "Adam",
            "objective": "BCE of an LPIPS-style ranking head against the judges' fraction",
            "steps": result.steps,
            "epochs_run": int(result.history["epoch"].max()),
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "distance_scale": result.scale,
            "history": result.history.replace({np.nan: None}).to_dict("records"),
        },
        "validation_2afc": {
            "fitted": score_summary(*result.fitted, val, seed),
            "unfitted": score_summary(*result.unfitted, val, seed),
            **baseline_scores(val, seed),
            "human_ceiling": group_bootstrap(
                human_ceiling(val.fraction), val.weight, val.group, seed=seed
            ),
            "oracle": group_bootstrap(oracle_score(val.fraction), val.weight, val.group, seed=seed),
        },
        "package_versions": _versions(),
    }


def write_card(card: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path


def read_card(path: str | Path) -> dict:
    """A card from its JSON file, or from the weights file it belongs to."""
    path = Path(path)
    if not path.name.endswith(".json"):
        path = card_path(path)
    if not path.is_file():
        raise ValueError(
            f"{path}: no such model card (written by `pstudy losses fit` next to the weights)"
        )
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read model card {path}: {error}") from None
    if not isinstance(card, dict) or card.get("format") != "pstudy-fitted-loss-card":
        raise ValueError(f"{path} is not a fitted-loss model card")
    return card


def format_card(card: dict) -> str:
    """A short human-readable summary of a card."""
    split, training, data = card["split"], card["training"], card["data"]
    lines = [
        f"loss           {card['loss']}  options {json.dumps(card['options'])}",
        f"weights        {card['weights_file']}  sha256 {card['weights_sha256'][:16]}…",
        f"data           {data.get('kind')}: {data.get('path')}  sha256 {str(data.get('sha256'))[:16]}…",
        f"split          seed {split.get('seed')}, {split['train_triplets']} train triplets "
        f"({split['train_references']} references), {split['validation_triplets']} validation "
        f"({split['validation_references']})",
        f"training       {training['steps']} steps, best epoch {training['best_epoch']} of "
        f"{training['epochs_run']}, lr {training['lr']}, batch {training['batch_size']}, "
        f"{training['device']}",
        "validation 2AFC (95 % bootstrap CI over reference images):",
    ]
    for name, summary in card["validation_2afc"].items():
        lines.append(
            f"  {name:<14} {summary['mean']:.4f}  [{summary['ci_low']:.4f}, {summary['ci_high']:.4f}]"
        )
    return "\n".join(lines)
