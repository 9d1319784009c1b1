"""One-command GPU check of the ``paper`` preset (issue #16): every condition learns a
faithful reconstruction at equal rate, and the run proves it.

Trains every ``paper`` condition (l2, ssim, msssim, watson-dct, watson-dft, deep: VAE
latent 256, width 64, 64×64, batch 64, resize-convolution decoder, the same target KL of
800 nats per image) for a short budget meant to fit in 5 minutes on one H100/H200, writes
the stimulus set with its contact sheet, and prints (and writes as ``gpu_check.md`` and
``gpu_check.csv``) one row per condition: PSNR, SSIM, deep-loss distance, KL (nats per
test image), images/s, peak GPU memory, the degeneracy guard's verdict. Exit code 1 when
any condition is degenerate (or the run fails), else 0.

Needs only torch, torchvision, numpy, pandas, scikit-image, pillow (+ PyYAML, tqdm and the
``efficientnet-lite-pytorch``/``lpips`` packages the losses use); never the web stack:

    python bench/gpu_check.py                                  # CUDA, ~5 min on H100/H200
    python bench/gpu_check.py --steps 4000 --out /scratch/check   # a longer budget
    python bench/gpu_check.py --device cpu --steps 20 --image-size 32 --width 8 \\
        --latent 32 --train-patches 256 --n-test 4             # a dry run of the script
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from machine import describe_machine  # noqa: E402

from generation.config import (  # noqa: E402
    PRESETS,
    ConfigError,
    resolve_config,
    select_conditions,
)
from generation.pipeline import generate  # noqa: E402

# the paper preset's rate per pixel (800 nats per 64×64 image, ≈ 0.2 nats per pixel)
RATE_PER_PIXEL = PRESETS["paper"]["train"]["kl_target"] / PRESETS["paper"]["data"]["image_size"] ** 2
COLUMNS = (
    "condition",
    "PSNR dB",
    "SSIM",
    "deep",
    "KL nats",
    "images/s",
    "peak GPU MiB",
    "guard",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps per condition")
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam, constant (short budget)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--width", type=int, default=None, help="default: the preset's (64)")
    parser.add_argument("--latent", type=int, default=None, help="default: the preset's (256)")
    parser.add_argument("--train-patches", type=int, default=32768)
    parser.add_argument("--n-test", type=int, default=None, help="default: the preset's (16)")
    parser.add_argument(
        "--kl-target",
        type=float,
        default=None,
        help="nats per image; default the paper preset's rate per pixel (64×64: 800)",
    )
    parser.add_argument("--conditions", default=None, help="comma-separated subset of names")
    parser.add_argument("--out", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=300.0, help="warn beyond this")
    return parser.parse_args(argv)


def check_config(args: argparse.Namespace) -> dict:
    """The ``paper`` preset with the check's budget (nothing else changed)."""
    size = args.image_size
    target = args.kl_target if args.kl_target is not None else RATE_PER_PIXEL * size * size
    overrides = [
        "name=gpu-check",
        f"data.image_size={size}",
        f"data.train_patches={args.train_patches}",
        f"train.steps={args.steps}",
        f"train.lr={args.lr}",
        "train.lr_halve_every=0",
        f"train.checkpoint_every={max(1, args.steps // 2)}",
        f"train.kl_target={target}",
        "guard.strict=false",  # this script decides the exit code itself
        "contact_sheet.columns=16",
    ]
    for key, value in (
        ("train.batch_size", args.batch_size),
        ("model.width", args.width),
        ("model.latent", args.latent),
        ("data.n_test", args.n_test),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        return select_conditions(resolve_config("paper", overrides=overrides), args.conditions)
    except ConfigError as error:
        raise SystemExit(str(error)) from None


def table(manifest: dict) -> pd.DataFrame:
    """One row per condition from the written manifest."""
    rows = []
    training = manifest["provenance"]["training"]
    for condition in manifest["conditions"]:
        metrics, name = condition["metrics"], condition["name"]
        peak = training[name].get("peak_gpu_memory_mib")
        rows.append(
            {
                "condition": name,
                "PSNR dB": metrics.get("psnr", math.nan),
                "SSIM": 1.0 - metrics["ssim"] if "ssim" in metrics else math.nan,
                "deep": metrics.get("deep", math.nan),
                "KL nats": metrics.get("kl", math.nan),
                "images/s": training[name].get("images_per_s") or math.nan,
                "peak GPU MiB": math.nan if peak is None else peak,
                "guard": condition.get("guard", {}).get("verdict", "?"),
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def markdown(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "–" if math.isnan(value) else f"{value:.4g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = check_config(args)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-")) / "set"
    condition = config["conditions"][0]
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(
            f"# gpu_check: paper preset, {len(config['conditions'])} conditions, "
            f"{config['data']['image_size']}×{config['data']['image_size']} VAE latent "
            f"{condition['latent']} width {condition['width']}, {condition['steps']} steps × batch "
            f"{condition['batch_size']}, lr {condition['lr']:g}, KL target "
            f"{condition['kl_target']:g} nats; device {args.device}; torch {torch.__version__}; "
            f"{describe_machine(args.device if args.device != 'auto' else 'cpu')}; "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            flush=True,
        )
    began = time.perf_counter()
    result = generate(
        config,
        out,
        device=args.device,
        reuse=False,
        progress=sys.stderr.isatty(),
        log=lambda message: print(message, file=sys.stderr, flush=True),
    )
    elapsed = time.perf_counter() - began
    if result.manifest is None:  # a torchrun process other than rank 0: it only trained
        return 0
    frame = table(result.manifest)
    text = markdown(frame)
    print(text)
    (out / "gpu_check.md").write_text(text + "\n", encoding="utf-8")
    frame.to_csv(out / "gpu_check.csv", index=False)
    print(f"stimulus set and contact sheet: {out} (contact_sheet.png); wall time {elapsed:.0f} s")
    if elapsed > args.budget_s:
        print(f"note: took {elapsed:.0f} s, over the {args.budget_s:.0f} s budget", flush=True)
    degenerate = result.degenerate
    if degenerate:
        print(f"FAILED: degenerate condition(s): {', '.join(degenerate)}")
        for name, record in degenerate.items():
            problems = record.get("problems", [])
            for problem in problems:
                print(f"  {name}: {problem['message']}")
            for fix in dict.fromkeys(problem["fix"] for problem in problems):
                print(f"    likely fix: {fix}")
        return 1
    print("PASSED: every condition passes the degeneracy guard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
