"""The whole generation run: data → one model per condition → reconstructions of the
test images → metrics → stimulus set (manifest, PNGs, evaluation CSVs, contact sheet).

:func:`generate` is what ``pstudy generate`` calls; it is also usable from Python.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from generation.config import config_sha256
from generation.contact_sheet import write_contact_sheet
from generation.data import in_memory, load_data
from generation.evaluate import build_metrics, evaluate_stimuli, summary_table
from generation.guard import check_reconstructions
from generation.stimulus_set import (
    StimulusSetError,
    prepare_output,
    sha256_file,
    validate_stimulus_set,
    write_stimulus_set,
)
from generation.train import (
    RESIDENT_MAX_BYTES,
    Distributed,
    TrainingError,
    TrainResult,
    barrier,
    init_distributed,
    load_model,
    loader_workers,
    train_condition,
)

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
    guard: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> guard record

    @property
    def degenerate(self) -> dict[str, dict[str, Any]]:
        """The conditions the degeneracy guard flagged (name -> guard record)."""
        return {name: g for name, g in self.guard.items() if not g.get("ok", True)}


class DegenerateStimuliError(TrainingError):
    """``guard.strict``: some conditions' reconstructions are degenerate (the set has been
    written, with the verdicts, for inspection)."""

    def __init__(self, out: Path, flagged: dict[str, dict[str, Any]]):
        self.out, self.flagged = out, flagged
        lines = [
            f"{len(flagged)} condition(s) degenerate, so the stimuli are not usable "
            f"(guard.strict; the set was written to {out} for inspection: "
            f"contact_sheet.png, manifest.json):"
        ]
        for name, record in flagged.items():
            problems = record.get("problems", [])
            for problem in problems:
                lines.append(f"  {name}: {problem['message']}")
            for fix in dict.fromkeys(problem["fix"] for problem in problems):
                lines.append(f"    likely fix: {fix}")
        lines.append("(--no-strict keeps the set and exits 0; pstudy study create will warn)")
        super().__init__("\n".join(lines))


def loss_file_hashes(config: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each condition's ``loss_options.weights`` file (e.g. a fitted loss from
    ``pstudy losses fit``), by condition name: a refitted file at the same path changes
    the configuration hash, so a stale stimulus set is never reused."""
    hashes = {}
    for condition in config["conditions"]:
        weights = condition.get("loss_options", {}).get("weights")
        if weights is not None and Path(weights).is_file():
            hashes[condition["name"]] = sha256_file(weights)
    return hashes


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


PROJECT_NAME = "perceptual-study-platform"


def _git(package: Path, *args: str) -> str | None:
    """``git args`` in ``package`` with git's own environment variables removed (GIT_DIR
    and friends would point it at another repository); stdout, or None on failure."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    try:
        completed = subprocess.run(
            ["git", *args], cwd=package, env=env, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def source_checkout(package: str | Path | None = None) -> Path | None:
    """The git work tree holding this project's source, or None.

    It must have the ``generation`` package (``package``, default: this one) as its
    top-level ``generation/`` folder with ``pipeline.py`` tracked, and this project's
    ``pyproject.toml``. An installed copy (site-packages inside some other repository, a
    virtual environment inside this one) or a command started in another repository
    gives None, never that repository."""
    package = Path(package or Path(__file__).parent).resolve()
    top = _git(package, "rev-parse", "--show-toplevel")
    if not top:
        return None
    root = Path(top).resolve()
    if root / "generation" != package:
        return None
    try:
        pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if pyproject.get("project", {}).get("name") != PROJECT_NAME:
        return None
    if _git(package, "ls-files", "--error-unmatch", "--", "pipeline.py") is None:
        return None
    return root


def git_commit(package: str | Path | None = None) -> str | None:
    """The commit of this project's own source (see :func:`source_checkout`), or None."""
    root = source_checkout(package)
    return None if root is None else _git(root, "rev-parse", "--verify", "HEAD")


def git_dirty(package: str | Path | None = None) -> bool | None:
    """Whether the project's tracked source differs from :func:`git_commit` (None: no
    checkout)."""
    root = source_checkout(package)
    if root is None:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


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


@dataclass
class Reconstructions:
    """A model's test-set outputs: uint8 stimuli, the VAE's KL per image (nats; None for
    other models) and the count of NaN/inf values before quantisation."""

    images: torch.Tensor
    kl: torch.Tensor | None
    nonfinite: int


@torch.no_grad()
def reconstruct_test_set(
    model_path: Path, images: torch.Tensor, device: torch.device, batch_size: int = 64
) -> Reconstructions:
    """uint8 N×C×H×W → the model's reconstructions (deterministic, eval mode)."""
    model = load_model(model_path, device)
    outputs, kls, nonfinite = [], [], 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device).float() / 255.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            y = model.reconstruct(x).float()
            if hasattr(model, "posterior_kl"):
                kls.append(model.posterior_kl(x).float().cpu())
        nonfinite += int((~torch.isfinite(y)).sum())
        y = torch.nan_to_num(y, nan=0.0, posinf=1.0, neginf=0.0)
        outputs.append((y.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu())
    return Reconstructions(torch.cat(outputs), torch.cat(kls) if kls else None, nonfinite)


def reconstruct(
    model_path: Path, images: torch.Tensor, device: torch.device, batch_size: int = 64
) -> torch.Tensor:
    """uint8 N×C×H×W → the model's uint8 reconstructions (deterministic, eval mode)."""
    return reconstruct_test_set(model_path, images, device, batch_size).images


def gather_conditions(
    mine: dict[str, TrainResult], config: dict[str, Any], info: Distributed
) -> dict[str, TrainResult]:
    """Under ``train.distribute=conditions``: every process's results on rank 0, in config
    order, with each trained ``model.pt`` written there when its file system lacks it (nodes
    without a shared disk). Other ranks get their own results back."""
    payload = {name: (result, result.model_path.read_bytes()) for name, result in mine.items()}
    gathered: list[Any] = [None] * info.world_size if info.is_main else []
    dist.gather_object(payload, gathered if info.is_main else None, dst=0)
    if not info.is_main:
        return mine
    everything = {name: item for part in gathered for name, item in part.items()}
    results = {}
    for condition in config["conditions"]:
        result, model_bytes = everything[condition["name"]]
        if not result.model_path.exists():
            result.model_path.parent.mkdir(parents=True, exist_ok=True)
            result.model_path.write_bytes(model_bytes)
        results[condition["name"]] = result
    return results


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
    info, torch_device = init_distributed(
        device, share_gpus=config["train"]["distribute"] == "conditions"
    )
    seed = config["seed"]
    loss_files = loss_file_hashes(config)
    config_hash = config_sha256({**config, "loss_files": loss_files} if loss_files else config)
    split = load_data(config["data"], seed)
    log(f"data: {split.description}")
    if reuse:  # every rank decides alike (same files), so no rank trains alone
        existing = up_to_date(out, config_hash, split.input_sha256)
        if existing is not None:
            log(
                f"{out} is up to date (same config_sha256 {config_hash[:12]} and inputs); "
                "nothing to do (--no-reuse to regenerate)"
            )
            guard = {c["name"]: c["guard"] for c in existing["conditions"] if c.get("guard")}
            result = GenerateResult(out, existing, True, {}, guard)
            _report_guard(result, log)
            if config.get("guard", {}).get("strict") and result.degenerate:
                raise DegenerateStimuliError(out, result.degenerate)
            return result
    check_output_folder(out)
    train_images = in_memory(split.train, RESIDENT_MAX_BYTES, loader_workers(config, torch_device))
    if train_images is not split.train:
        log(f"data: {len(train_images)} training images decoded once, held in memory")

    size, channels = config["data"]["image_size"], config["data"]["channels"]
    by_conditions = info.active and config["train"]["distribute"] == "conditions"
    results: dict[str, TrainResult] = {}
    for index, condition in enumerate(config["conditions"]):
        if by_conditions and index % info.world_size != info.rank:
            continue  # another process trains it (round-robin in config order)
        fingerprint = config_sha256(
            {
                "data": config["data"],
                "seed": seed,
                "condition": condition,
                "input": split.input_sha256,
                **(
                    {"loss_file": loss_files[condition["name"]]}
                    if condition["name"] in loss_files
                    else {}
                ),
            }
        )
        results[condition["name"]] = train_condition(
            condition,
            train_images,
            channels=channels,
            size=size,
            seed=seed,
            fingerprint=fingerprint,
            checkpoint_dir=checkpoints / condition["name"],
            device=torch_device,
            resume=resume,
            progress=progress and info.is_main,
            distributed=None if by_conditions else info,
        )
    if by_conditions:
        results = gather_conditions(results, config, info)
    barrier(info)
    if not info.is_main:
        return GenerateResult(out, None, False, results)

    test = split.test
    outputs = {
        name: reconstruct_test_set(result.model_path, test.images, torch_device)
        for name, result in results.items()
    }
    stimuli = {name: output.images for name, output in outputs.items()}
    architectures = {c["name"]: c["architecture"] for c in config["conditions"]}
    guard = {
        name: check_reconstructions(
            test.images,
            output.images,
            nonfinite=output.nonfinite,
            architecture=architectures[name],
        ).as_dict()
        for name, output in outputs.items()
    }
    metrics, skipped = build_metrics(config["evaluate"]["metrics"], size, torch_device)
    for name, reason in skipped.items():
        log(f"metric {name} skipped: {reason}")
    per_image = evaluate_stimuli(test.images, stimuli, test.ids, metrics, torch_device)
    kl_rows = [
        (name, image_id, "kl", float(value))
        for name, output in outputs.items()
        if output.kl is not None
        for image_id, value in zip(test.ids, output.kl.tolist(), strict=True)
    ]
    if kl_rows:  # the rate each VAE spends on each test image (nats)
        per_image = pd.concat(
            [per_image, pd.DataFrame(kl_rows, columns=per_image.columns)], ignore_index=True
        )
    summary = summary_table(per_image)
    per_image_metrics: dict[tuple[str, str], dict[str, float]] = {}
    for row in per_image.itertuples(index=False):
        per_image_metrics.setdefault((row.image_id, row.condition), {})[row.metric] = row.value
    means = summary.set_index("condition").to_dict(orient="index")
    conditions = []
    for c in config["conditions"]:
        result = results[c["name"]]
        entry = {
            "name": c["name"],
            "loss": c["loss"],
            "architecture": c["architecture"],
            "checkpoint_sha256": result.checkpoint_sha256,
            "config": c,
            "metrics": {
                k: float(v) for k, v in means[c["name"]].items() if math.isfinite(float(v))
            },
            "guard": guard[c["name"]],
        }
        if result.rate is not None:
            entry["rate"] = result.rate
        conditions.append(entry)
    summary["guard"] = [guard[name]["verdict"] for name in summary["condition"]]
    provenance = {
        "config": config,
        "config_sha256": config_hash,
        "loss_files_sha256": loss_files,
        "seed": seed,
        "package_versions": package_versions(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "input_sha256": split.input_sha256,
        "data": split.description,
        "device": str(torch_device),
        "distributed": info.active,
        "world_size": info.world_size,
        "distribute": config["train"]["distribute"] if info.active else None,
        "metrics_skipped": skipped,
        "training": {
            name: {
                "steps": r.steps,
                "resumed_from_step": r.start_step,
                "final_loss": r.losses[-1] if r.losses else None,
                "final_kl": r.kl[-1] if r.kl else None,
                "images_per_s": None if r.images_per_s != r.images_per_s else r.images_per_s,
                "peak_gpu_memory_mib": r.peak_memory_mib,
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
        flags={name: g["verdict"] for name, g in guard.items() if not g["ok"]},
    )
    validate_stimulus_set(out)
    log(f"wrote {out} ({len(conditions)} conditions × {len(test.ids)} images)")
    result = GenerateResult(out, manifest, False, results, guard)
    _report_guard(result, log)
    if config.get("guard", {}).get("strict") and result.degenerate:
        raise DegenerateStimuliError(out, result.degenerate)
    return result


def _report_guard(result: GenerateResult, log: Callable[[str], None]) -> None:
    """Loud console lines for every degenerate condition (with the likely fix)."""
    for name, record in result.degenerate.items():
        log(f"!! DEGENERATE condition {name!r}: {record['verdict']}")
        problems = record.get("problems", [])
        for problem in problems:
            log(f"!!   {problem['message']}")
        for fix in dict.fromkeys(problem["fix"] for problem in problems):
            log(f"!!   likely fix: {fix}")
