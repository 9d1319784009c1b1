"""Judgments per second while fitting a loss on 2AFC triplets (``pstudy losses fit``).

    python bench/bench_fit.py [--device cpu|cuda] [--threads N] [--triplets 500]
                              [--size 64] [--batch-size 50] [--epochs 2] [--losses ...]

Simulated triplets (scikit-image photo patches, two distortions each, every image
distinct as in BAPPS; :mod:`generation.calibration.synthetic`) labelled by the unfitted
loss itself. For each loss it times :func:`generation.calibration.fit.fit_loss` for
``--epochs`` epochs (no early stop) and reports:

- ``prepare``: triplets/s of the one-off pass before training (the deep head: the frozen
  backbone on all three images of every triplet; Watson: only moving the images, "—");
- ``train``: triplets/s of the training epochs (forward, ranking head, backward, Adam),
  validation passes included (10 % of the triplets);
- ``100k est.``: minutes to fit 100 000 triplets for 10 epochs at these rates.
"""

from __future__ import annotations

import argparse

import torch
from machine import describe_machine

from generation.calibration.fit import FitSettings, fit_loss
from generation.calibration.judgments import split_by_group
from generation.calibration.synthetic import distortion_triplets
from generation.losses import build_loss


def measure(name: str, triplets, args, device: torch.device) -> dict:
    """Time one fit of ``name``: its prepare pass and its training epochs (fit_loss's own
    wall-clock laps)."""
    train, val = split_by_group(triplets, 0.1, seed=0)
    settings = FitSettings(
        batch_size=args.batch_size, max_epochs=args.epochs, patience=args.epochs + 1
    )
    result = fit_loss(build_loss(name), train, val, settings, device=device)
    prepare_s, train_s = result.seconds["prepare"], result.seconds["train"]
    prepare_rate = len(triplets) / prepare_s
    train_rate = args.epochs * len(train) / train_s
    return {
        "loss": name,
        "steps": result.steps,
        "prepare_s": prepare_s,
        "prepare_per_s": prepare_rate,
        "train_per_s": train_rate,
        "minutes_100k_10_epochs": (1e5 / prepare_rate + 10 * 1e5 / train_rate) / 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--triplets", type=int, default=500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=["watson-dft", "deep"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    triplets = distortion_triplets(args.triplets, versions=2, size=args.size, seed=0)
    print(f"machine: {describe_machine(device)}; torch threads {torch.get_num_threads()}")
    print(
        f"{len(triplets)} triplets of {args.size} px, batch {args.batch_size}, "
        f"{args.epochs} epochs, device {device}"
    )
    print(f"{'loss':<12} {'steps':>6} {'prepare/s':>10} {'train/s':>9} {'100k×10 ep. (min)':>18}")
    for name in args.losses:
        row = measure(name, triplets, args, device)
        prepare = "—" if row["prepare_s"] < 0.05 else f"{row['prepare_per_s']:.0f}"
        print(
            f"{row['loss']:<12} {row['steps']:>6} {prepare:>10} {row['train_per_s']:>9.0f} "
            f"{row['minutes_100k_10_epochs']:>18.1f}"
        )


if __name__ == "__main__":
    main()
