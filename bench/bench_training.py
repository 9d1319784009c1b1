"""Training throughput per loss, side by side, as a ratio to L2.

Default (the issue's CPU benchmark): conv autoencoder, 64×64 RGB, batch 64, every
registered training loss; each loss runs warm-up steps, then timed optimiser steps
(forward + loss + backward + Adam). ``--paper`` uses the ``paper`` preset's model (VAE,
latent 256, width 64) and, on CUDA, bf16 autocast + channels-last as training does, and
also reports peak GPU memory per loss.

    python bench/bench_training.py                      # CPU, conv AE 64×64, batch 64
    python bench/bench_training.py --device cuda --paper --steps 200
    python bench/bench_training.py --losses l2,ssim --size 32 --batch 32 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from generation.config import PRESETS  # noqa: E402
from generation.losses import build_loss  # noqa: E402
from generation.models import build_model  # noqa: E402
from generation.train import resolve_device  # noqa: E402

DEFAULT_LOSSES = "l2,l1,ssim,msssim,watson-dct,watson-dft,deep"


def measure(loss_name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of full training steps with ``loss_name`` (and peak CUDA memory)."""
    torch.manual_seed(0)
    if args.paper:
        model_config = PRESETS["paper"]["model"]
        architecture, latent, width = "vae", model_config["latent"], model_config["width"]
    else:
        architecture, latent, width = "conv", args.latent, args.width
    model = build_model(architecture, channels=3, size=args.size, latent=latent, width=width)
    model = model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    loss_fn = build_loss(loss_name).to(device).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(x)
            objective = loss_fn(out.images.float(), x).float()
            if out.kl is not None:
                objective = objective + out.kl.float()
            total = objective.mean()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - began
    result = {
        "loss": loss_name,
        "images_per_s": args.steps * args.batch / elapsed,
        "s_per_step": elapsed / args.steps,
    }
    if cuda:
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default=DEFAULT_LOSSES)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--paper", action="store_true", help="the paper preset's VAE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = (
        "VAE latent 256 width 64 (paper)"
        if args.paper
        else (f"conv AE latent {args.latent} width {args.width}")
    )
    print(
        f"# training throughput: {model}, {args.size}×{args.size} RGB, batch {args.batch}, "
        f"{args.steps} timed steps after {args.warmup} warm-up; device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    results = []
    for name in [n.strip() for n in args.losses.split(",") if n.strip()]:
        try:
            results.append(measure(name, args, device))
        except (ValueError, OSError, RuntimeError) as error:
            print(f"{name}: skipped ({str(error).splitlines()[0]})")
    base = next((r for r in results if r["loss"] == "l2"), None)
    header = "| loss | images/s | s/step | time ratio to L2 |"
    if device.type == "cuda":
        header += " peak GPU MiB |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for r in results:
        ratio = base["images_per_s"] / r["images_per_s"] if base else float("nan")
        line = f"| {r['loss']} | {r['images_per_s']:.1f} | {r['s_per_step']:.3f} | {ratio:.2f} |"
        if "peak_mem_mib" in r:
            line += f" {r['peak_mem_mib']:.0f} |"
        print(line)


if __name__ == "__main__":
    main()
