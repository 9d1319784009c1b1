"""Training throughput per loss, side by side, as a ratio to L2.

Default (the issue's CPU benchmark): conv autoencoder, 64×64 RGB, batch 64, every
registered training loss; each loss runs warm-up steps, then interleaved rounds of timed optimiser
steps (forward + loss + backward + Adam); the fastest round per loss is reported. ``--paper`` uses the ``paper`` preset's model (VAE,
latent 256, width 64, resize-convolution decoder) and, on CUDA, bf16 autocast + channels-last as training does, and
also reports peak GPU memory per loss.

    python bench/bench_training.py                      # CPU, conv AE 64×64, batch 64
    python bench/bench_training.py --device cuda --paper --steps 200
    python bench/bench_training.py --losses l2,ssim --size 32 --batch 32 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from machine import describe_machine  # noqa: E402

from generation.config import PRESETS  # noqa: E402
from generation.losses import build_loss  # noqa: E402
from generation.models import build_model  # noqa: E402
from generation.train import resolve_device  # noqa: E402

DEFAULT_LOSSES = "l2,l1,ssim,msssim,watson-dct,watson-dft,deep"


class Setup:
    """A model + loss + optimiser + batch ready for timed training steps."""

    def __init__(self, loss_name: str, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(0)
        upsample = "transpose"
        if args.paper:
            model_config = PRESETS["paper"]["model"]
            architecture, latent, width = "vae", model_config["latent"], model_config["width"]
            upsample = model_config["upsample"]
        else:
            architecture, latent, width = "conv", args.latent, args.width
        self.name, self.device, self.cuda = loss_name, device, device.type == "cuda"
        model = build_model(
            architecture, channels=3, size=args.size, latent=latent, width=width, upsample=upsample
        )
        self.model = model.to(device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(loss_name).to(device).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.x = torch.rand(args.batch, 3, args.size, args.size, device=device)
        if self.cuda:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.seconds: list[float] = []  # per step, one entry per round
        self.peak_mib = float("nan")

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            out = self.model(self.x)
            objective = self.loss_fn(out.images.float(), self.x).float()
            if out.kl is not None:
                objective = objective + out.kl.float()
            total = objective.mean()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

    def timed(self, steps: int) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        began = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.seconds.append((time.perf_counter() - began) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default=DEFAULT_LOSSES)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
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
        f"best of {args.rounds} interleaved rounds of {args.steps} steps; device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{describe_machine(device)}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    setups = []
    for name in [n.strip() for n in args.losses.split(",") if n.strip()]:
        try:
            setup = Setup(name, args, device)
            for _ in range(args.warmup):
                setup.step()
            setups.append(setup)
        except (ValueError, OSError, RuntimeError) as error:
            print(f"{name}: skipped ({str(error).splitlines()[0][:160]})")
    # interleaved rounds: a burst of load on a shared machine hits one round, not one loss;
    # the fastest round per loss is reported
    for _ in range(args.rounds):
        for setup in setups:
            setup.timed(args.steps)
    best = {s.name: min(s.seconds) for s in setups}
    header = "| loss | images/s | s/step | time ratio to L2 |"
    if device.type == "cuda":
        header += " peak GPU MiB |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for setup in setups:
        seconds = best[setup.name]
        ratio = seconds / best["l2"] if "l2" in best else float("nan")
        line = f"| {setup.name} | {args.batch / seconds:.1f} | {seconds:.3f} | {ratio:.2f} |"
        if setup.cuda:
            line += f" {setup.peak_mib:.0f} |"
        print(line)


if __name__ == "__main__":
    main()
