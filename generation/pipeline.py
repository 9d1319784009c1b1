"""The whole generation run: data → one model per condition → reconstructions of the
test images → metrics → stimulus set (manifest, PNGs, evaluation CSVs, contact sheet).

:func:`generate` is what ``pstudy generate`` calls; it is also usable from Python.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from generation.config import config_sha256
from generation.contact_sheet import write_contact_sheet
from generation.data import load_data
from generation.evaluate import build_metrics, evaluate_stimuli, summary_table
from generation.stimulus_set import (
    StimulusSetError,
    prepare_output,
    validate_stimulus_set,
    write_stimulus_set,
)
from generation.train import TrainResult, barrier, init_distributed, load_model, train_condition

PACKAGES = (
    "perceptual-study-platform",
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "scikit-image",
    "pandas",
)


@dataclass
class GenerateResult:
    """Outcome of :func:`generate`; ``manifest`` is None on non-main DDP ranks."""

    out: Path
    manifest: dict[str, Any] | None
    reused: bool
    training: dict[str, TrainResult]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, or None outside a git checkout."""
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def default_checkpoint_dir(out: str | Path) -> Path:
    """Checkpoints live beside the set (``<out>.checkpoints``), never inside it."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def check_output_folder(out: Path) -> None:
    """Refuse early (before training) an --out that :func:`prepare_output` would refuse."""
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())
    ):
        raise StimulusSetError(
            out,
            [
                "--out is a file or a non-empty folder without manifest.json; choose an empty or "
                "new folder (or an earlier stimulus set to replace)"
            ],
        )


def up_to_date(out: Path, config_hash: str, input_hash: str) -> dict[str, Any] | None:
    """The existing manifest when ``out`` holds a valid set from the same config + inputs."""
    if not (out / "manifest.json").exists():
        return None
    try:
        manifest = validate_stimulus_set(out)
    except StimulusSetError:
        return None
    provenance = manifest.get("provenance", {})
    if (
        provenance.get("config_sha256") == config_hash
        and provenance.get("input_sha256") == input_hash
    ):
        return manifest
    return None


@torch.no_grad()
def reconstruct(
    model_path: Path, images: torch.Tensor, device: torch.device, batch_size: int = 64
) -> torch.Tensor:
    """uint8 N×C×H×W → the model's uint8 reconstructions (deterministic, eval mode)."""
    model = load_model(model_path, device)
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device).float() / 255.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            y = model.reconstruct(x)
        outputs.append((y.float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu())
    return torch.cat(outputs)


def generate(
    config: dict[str, Any],
    out: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    reuse: bool = True,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> GenerateResult:
    """Run everything for a validated ``config`` (see :func:`generation.config.resolve_config`).

    With ``reuse``, a valid set in ``out`` made from the same config and inputs is kept as
    it is. With ``resume``, each condition continues from its last checkpoint.
    """
    out = Path(out)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out)
    info, torch_device = init_distributed(device)
    seed = config["seed"]
    config_hash = config_sha256(config)
    split = load_data(config["data"], seed)
    log(f"data: {split.description}")
    if reuse:  # every rank decides alike (same files), so no rank trains alone
        existing = up_to_date(out, config_hash, split.input_sha256)
        if existing is not None:
            log(
                f"{out} is up to date (same config_sha256 {config_hash[:12]} and inputs); "
                "nothing to do (--no-reuse to regenerate)"
            )
            return GenerateResult(out, existing, True, {})
    check_output_folder(out)

    size, channels = config["data"]["image_size"], config["data"]["channels"]
    results: dict[str, TrainResult] = {}
    for condition in config["conditions"]:
        fingerprint = config_sha256(
            {
                "data": config["data"],
                "seed": seed,
                "condition": condition,
                "input": split.input_sha256,
            }
        )
        results[condition["name"]] = train_condition(
            condition,
            split.train,
            channels=channels,
            size=size,
            seed=seed,
            fingerprint=fingerprint,
            checkpoint_dir=checkpoints / condition["name"],
            device=torch_device,
            resume=resume,
            progress=progress,
            distributed=info,
        )
    barrier(info)
    if not info.is_main:
        return GenerateResult(out, None, False, results)

    test = split.test
    stimuli = {
        name: reconstruct(result.model_path, test.images, torch_device)
        for name, result in results.items()
    }
    metrics, skipped = build_metrics(config["evaluate"]["metrics"], size, torch_device)
    for name, reason in skipped.items():
        log(f"metric {name} skipped: {reason}")
    per_image = evaluate_stimuli(test.images, stimuli, test.ids, metrics, torch_device)
    summary = summary_table(per_image)
    per_image_metrics: dict[tuple[str, str], dict[str, float]] = {}
    for row in per_image.itertuples(index=False):
        per_image_metrics.setdefault((row.image_id, row.condition), {})[row.metric] = row.value
    means = summary.set_index("condition").to_dict(orient="index")
    conditions = [
        {
            "name": c["name"],
            "loss": c["loss"],
            "architecture": c["architecture"],
            "checkpoint_sha256": results[c["name"]].checkpoint_sha256,
            "config": c,
            "metrics": {k: float(v) for k, v in means[c["name"]].items()},
        }
        for c in config["conditions"]
    ]
    provenance = {
        "config": config,
        "config_sha256": config_hash,
        "seed": seed,
        "package_versions": package_versions(),
        "git_commit": git_commit(),
        "input_sha256": split.input_sha256,
        "data": split.description,
        "device": str(torch_device),
        "distributed": info.active,
        "world_size": info.world_size,
        "metrics_skipped": skipped,
        "training": {
            name: {
                "steps": r.steps,
                "resumed_from_step": r.start_step,
                "final_loss": r.losses[-1] if r.losses else None,
                "images_per_s": None if r.images_per_s != r.images_per_s else r.images_per_s,
            }
            for name, r in results.items()
        },
    }
    prepare_output(out)
    manifest = write_stimulus_set(
        out,
        name=config["name"],
        image_ids=test.ids,
        references=test.images,
        stimuli=stimuli,
        conditions=conditions,
        per_image_metrics=per_image_metrics,
        provenance=provenance,
    )
    per_image.to_csv(out / "evaluation_per_image.csv", index=False)
    summary.to_csv(out / "evaluation.csv", index=False)
    sheet = config["contact_sheet"]
    write_contact_sheet(
        out / "contact_sheet.png",
        {"reference": test.images, **stimuli},
        columns=sheet["columns"],
        scale=sheet["scale"],
        title=f"{config['name']}: reference and reconstructions",
    )
    validate_stimulus_set(out)
    log(f"wrote {out} ({len(conditions)} conditions × {len(test.ids)} images)")
    return GenerateResult(out, manifest, False, results)
