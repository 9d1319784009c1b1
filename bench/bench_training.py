"""Training throughput per loss, side by side, as a ratio to L2.

Default (the issue's CPU benchmark): conv autoencoder, 64×64 RGB, batch 64, every
registered training loss; each loss runs warm-up steps, then interleaved rounds of timed optimiser
steps (forward + loss + backward + Adam); the fastest round per loss is reported. ``--paper`` uses the ``paper`` preset's model (VAE,
latent 256, width 64, resize-convolution decoder) and, on CUDA, bf16 autocast + channels-last as training does, and
also reports peak GPU memory per loss.

``--full`` times the whole preset instead (``paper`` with ``--paper``, else ``demo``):
every condition runs ``--steps`` (default 2000) steps through the real training loop
(``generation.train.train_condition``: data, rate controller, checkpoints, progress) and
the preset's own step count is extrapolated from that; beside it the pure step rate of the
same model and loss (the default mode's measurement) and the ratio of the two.

    python bench/bench_training.py                      # CPU, conv AE 64×64, batch 64
    python bench/bench_training.py --device cuda --paper --steps 200
    python bench/bench_training.py --losses l2,ssim --size 32 --batch 32 --threads 1
    python bench/bench_training.py --device cuda --paper --full   # the paper preset's time
    python bench/bench_training.py --full --steps 100 --threads 1 --train-patches 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from machine import describe_machine  # noqa: E402

from generation.config import (  # noqa: E402
    PRESETS,
    ConfigError,
    resolve_config,
    select_conditions,
)
from generation.data import load_data  # noqa: E402
from generation.losses import build_loss  # noqa: E402
from generation.models import build_model  # noqa: E402
from generation.train import resolve_device, train_condition  # noqa: E402

DEFAULT_LOSSES = "l2,l1,ssim,msssim,watson-dct,watson-dft,deep"


class Setup:
    """A model + loss + optimiser + batch ready for timed training steps."""

    def __init__(
        self,
        loss_name: str,
        args: argparse.Namespace,
        device: torch.device,
        condition: dict | None = None,
    ):
        """The model of ``condition`` (a resolved condition mapping) when given, else the
        paper preset's (``--paper``) or the ``--width``/``--latent`` conv AE."""
        torch.manual_seed(0)
        if condition is not None:
            architecture, latent, width = (
                condition[k] for k in ("architecture", "latent", "width")
            )
            upsample, options = condition["upsample"], condition["loss_options"]
        elif args.paper:
            model_config = PRESETS["paper"]["model"]
            architecture, latent, width = "vae", model_config["latent"], model_config["width"]
            upsample, options = model_config["upsample"], {}
        else:
            architecture, latent, width = "conv", args.latent, args.width
            upsample, options = "transpose", {}
        self.name, self.device, self.cuda = loss_name, device, device.type == "cuda"
        model = build_model(
            architecture, channels=3, size=args.size, latent=latent, width=width, upsample=upsample
        )
        self.model = model.to(device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(loss_name, **options).to(device).requires_grad_(False)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default=DEFAULT_LOSSES)
    parser.add_argument("--size", type=int, default=None, help="default 64 (--full: the preset's)")
    parser.add_argument("--batch", type=int, default=None, help="default 64 (--full: the preset's)")
    parser.add_argument("--width", type=int, default=None, help="default 32 (--full: the preset's)")
    parser.add_argument(
        "--latent", type=int, default=None, help="default 128 (--full: the preset's)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per round (3); --full: per condition"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--paper", action="store_true", help="the paper preset's VAE")
    parser.add_argument(
        "--full",
        action="store_true",
        help="time the whole preset (paper with --paper, else demo) through the real loop",
    )
    parser.add_argument(
        "--train-patches", type=int, default=None, help="--full: training patches (the preset's)"
    )
    parser.add_argument("--conditions", default=None, help="--full: a comma-separated subset")
    args = parser.parse_args(argv)
    if args.full:
        args.steps = 2000 if args.steps is None else args.steps
        return args
    for key, default in (("size", 64), ("batch", 64), ("width", 32), ("latent", 128)):
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.steps = 3 if args.steps is None else args.steps
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.full:
        full_preset(args, device)
        return
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


def full_config(args: argparse.Namespace) -> tuple[str, dict]:
    """The preset (paper or demo) with the command line's size overrides; its own steps."""
    preset = "paper" if args.paper else "demo"
    given = {
        "data.image_size": args.size,
        "data.train_patches": args.train_patches,
        "train.batch_size": args.batch,
        "model.width": args.width,
        "model.latent": args.latent,
    }
    overrides = ["guard.strict=false"]
    overrides += [f"{key}={value}" for key, value in given.items() if value is not None]
    try:
        config = select_conditions(resolve_config(preset, overrides=overrides), args.conditions)
    except ConfigError as error:
        raise SystemExit(f"--conditions: {error}") from None
    return preset, config


def full_preset(args: argparse.Namespace, device: torch.device) -> None:
    """Each condition: ``args.steps`` real training steps, then the pure step rate; the
    preset's time extrapolated as setup + preset steps at the loop's rate."""
    preset, config = full_config(args)
    size, first = config["data"]["image_size"], config["conditions"][0]
    args.size, args.batch = size, first["batch_size"]
    print(
        f"# full {preset} preset: {len(config['conditions'])} conditions, {size}×{size} "
        f"{first['architecture']} latent {first['latent']} width {first['width']}, batch "
        f"{first['batch_size']}, {config['data']['train_patches']} training patches; "
        f"{args.steps} real steps per condition extrapolated to the preset's "
        f"{first['steps']}; device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {describe_machine(device)}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        flush=True,
    )
    began = time.perf_counter()
    split = load_data(config["data"], config["seed"])
    print(f"data: {split.description} ({time.perf_counter() - began:.1f} s)", flush=True)
    header = (
        "| condition | loop images/s | pure-step images/s | loop / pure time | "
        "wall s | preset steps | extrapolated min |"
    )
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    total = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-full-") as folder:
        for condition in config["conditions"]:
            preset_steps = condition["steps"]
            timed = {**condition, "steps": args.steps}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            result = train_condition(
                timed,
                split.train,
                channels=config["data"]["channels"],
                size=size,
                seed=config["seed"],
                fingerprint="bench",
                checkpoint_dir=Path(folder) / condition["name"],
                device=device,
                progress=False,
            )
            wall = time.perf_counter() - start
            loop_seconds = args.steps * condition["batch_size"] / result.images_per_s
            setup_seconds = max(0.0, wall - loop_seconds)
            extrapolated = setup_seconds + preset_steps * loop_seconds / args.steps
            total += extrapolated
            pure = Setup(condition["loss"], args, device, condition)
            for _ in range(args.warmup):
                pure.step()
            for _ in range(args.rounds):
                pure.timed(max(1, min(args.steps, 50)))
            pure_rate = args.batch / min(pure.seconds)
            print(
                f"| {condition['name']} | {result.images_per_s:.1f} | {pure_rate:.1f} | "
                f"{pure_rate / result.images_per_s:.2f} | {wall:.1f} | {preset_steps} | "
                f"{extrapolated / 60:.1f} |",
                flush=True,
            )
    print(
        f"whole {preset} preset, extrapolated: {total / 60:.1f} min of training "
        f"({total:.0f} s; measured {time.perf_counter() - began:.0f} s for this run)"
    )


if __name__ == "__main__":
    main()
