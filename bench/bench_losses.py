"""Forward+backward time of every loss, side by side, as ratios to L2 (and to references).

    python bench/bench_losses.py [--device cpu|cuda] [--repeats 7] [--threads N]
                                 [--clock wall|cpu] [--quick] [--losses NAME ...]
                                 [--system-malloc]

Measures, in one run: each registered loss at batch 64×3×64×64 and 16×3×256×256 (each
forward+backward pass timed in alternation with one of L2 on the same batch; medians of
``--repeats`` pairs after one warm-up pair, a third as many for the deep networks);
Watson also with its parameters frozen (``requires_grad_(False)``, as when an autoencoder
trains with fixed loss parameters); ``msssim`` against ``pytorch_msssim.ms_ssim`` at
16×3×256×256 and ``lpips-alex`` against the ``lpips`` package's LPIPS (same AlexNet
weights), each timed head to head in alternation (median ratio of ``--repeats`` pairs).
The LPIPS trunks use the ImageNet weights from the torch cache when present, else one
seeded random initialisation (the speed is the same; the run says which). Inputs are
seeded. On Linux the run restarts itself once with fixed glibc allocator thresholds
(``STEADY_MALLOC``) so that big tensors do not cost page faults one run and none the
next; ``--system-malloc`` keeps the defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from machine import describe_machine
from tqdm import tqdm

from generation.losses import available_losses, build_loss
from generation.losses.backbones import TRUNKS, torchvision_cache_path

SHAPES = ((64, 3, 64, 64), (16, 3, 256, 256))
HEAVY = {"lpips-vgg", "lpips-squeeze", "deep", "lpips-alex", "lpips.LPIPS(alex) (reference)"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def time_once(fn, prediction, target) -> float:
    """Seconds (of the chosen clock) of one fn(prediction, target).sum().backward()."""
    leaf = prediction.detach().clone().requires_grad_(True)
    synchronize(prediction.device)
    start = CLOCK()
    fn(leaf, target).sum().backward()
    synchronize(prediction.device)
    return CLOCK() - start


def paired(fn, baseline, prediction, target, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and median ratio fn/baseline, timed in alternation (so a
    shared machine's changing load hits both alike); one untimed warm-up pair first."""
    seconds, ratios = [], []
    for index in range(repeats + 1):
        base = time_once(baseline, prediction, target)
        mine = time_once(fn, prediction, target)
        if index:
            seconds.append(mine)
            ratios.append(mine / base)
    return statistics.median(seconds), statistics.median(ratios)


def trunk_weights(folder: Path) -> dict[str, tuple[Path, str]]:
    """ImageNet trunk weights from the cache where present, else a seeded random init."""
    import torchvision

    found = {}
    for seed, (net, trunk) in enumerate(TRUNKS.items()):
        cached, _ = torchvision_cache_path(net)
        if cached.is_file():
            found[net] = (cached, "ImageNet (torch cache)")
            continue
        torch.manual_seed(seed)
        path = folder / f"{net}.pth"
        features = getattr(torchvision.models, trunk.builder)(weights=None).features.state_dict()
        torch.save({f"features.{k}": v for k, v in features.items()}, path)
        found[net] = (path, "random init (no ImageNet weights cached)")
    return found


def reference_lpips_alex(weights: Path, device: torch.device):
    """The lpips package's LPIPS(alex) with the same trunk weights."""
    import lpips

    with warnings.catch_warnings():  # the package's own torchvision deprecations
        warnings.filterwarnings("ignore", "The parameter 'pretrained'", UserWarning)
        warnings.filterwarnings("ignore", "Arguments other than a weight enum", UserWarning)
        reference = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    cuts, mapped = TRUNKS["alex"].cuts, {}
    for key, value in state.items():
        if key.startswith("features."):
            _, index, parameter = key.split(".", 2)
            number = next(s for s, end in enumerate(cuts) if int(index) < end) + 1
            mapped[f"slice{number}.{index}.{parameter}"] = value
    reference.net.load_state_dict(mapped)
    reference = reference.to(device).eval()
    return lambda p, t: reference(p, t, normalize=True).view(-1)


# glibc returns large freed blocks to the system and maps them anew (the threshold moves
# with the history of the process), so a tensor of a few MB sometimes costs hundreds of
# page faults and sometimes none: the same run read 9.5× or 11.6× for one loss. Fixed
# thresholds keep freed memory in the heap and make the ratios repeatable.
STEADY_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "1073741824",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "MALLOC_TOP_PAD_": "268435456",
}


def steady_allocator(keep_system: bool) -> None:
    """Restart this process once with STEADY_MALLOC in its environment (Linux/glibc)."""
    if keep_system or not sys.platform.startswith("linux"):
        return
    if all(os.environ.get(name) == value for name, value in STEADY_MALLOC.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="only the 64×3×64×64 batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--losses", nargs="*", help="only these names (prefixes); default all")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default allocator settings (by default the run restarts itself "
        "with fixed mmap/trim thresholds, see STEADY_MALLOC)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine; use with --threads 1)",
    )
    args = parser.parse_args()
    steady_allocator(args.system_malloc)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work only; use --clock wall on CUDA")
    device = torch.device(args.device)
    shapes = SHAPES[:1] if args.quick else SHAPES
    print(
        f"device={device} threads={torch.get_num_threads()} clock={args.clock} "
        f"malloc={'system' if args.system_malloc else 'steady'} "
        f"repeats={args.repeats} seed={args.seed} torch={torch.__version__}"
    )
    print(f"machine: {describe_machine(device)}")

    with tempfile.TemporaryDirectory() as folder:
        weights = trunk_weights(Path(folder))
        for net, (_, origin) in weights.items():
            print(f"lpips-{net} trunk weights: {origin}")
        losses = {}
        for name in available_losses():
            options = {"weights": weights[name[6:]][0]} if name.startswith("lpips-") else {}
            losses[name] = build_loss(name, **options).to(device)
        alex_reference = reference_lpips_alex(weights["alex"][0], device)
        comparisons = []

        rows = []
        for shape in shapes:
            generator = torch.Generator().manual_seed(args.seed)
            target = torch.rand(shape, generator=generator).to(device)
            noise = 0.05 * torch.randn(shape, generator=generator).to(device)
            prediction = (target + noise).clamp(0, 1)
            label = "×".join(map(str, shape))
            l2 = losses["l2"]
            candidates = dict(losses)
            candidates["watson-dct (frozen parameters)"] = (
                build_loss("watson-dct").requires_grad_(False).to(device)
            )
            candidates["watson-dft (frozen parameters)"] = (
                build_loss("watson-dft").requires_grad_(False).to(device)
            )
            if shape[-1] >= 192:
                from pytorch_msssim import ms_ssim

                candidates["pytorch_msssim.ms_ssim (reference)"] = lambda p, t: (
                    1 - ms_ssim(p, t, data_range=1.0, size_average=False)
                )
            candidates["lpips.LPIPS(alex) (reference)"] = alex_reference
            results = {}
            for name, loss in tqdm(candidates.items(), desc=label, leave=False):
                if args.losses and not any(name.startswith(n) for n in args.losses):
                    continue
                repeats = max(2, args.repeats // 3) if name in HEAVY else args.repeats
                results[name] = paired(loss, l2, prediction, target, repeats)
                rows.append((label, name, results[name][0] * 1000, results[name][1]))
            for ours, theirs in (
                ("msssim", "pytorch_msssim.ms_ssim (reference)"),
                ("lpips-alex", "lpips.LPIPS(alex) (reference)"),
            ):
                if ours in results and theirs in results:
                    # Head to head, in alternation, with the full number of repeats: the
                    # ratio of two ratios to L2 taken at a third of the repeats was noisy.
                    _, ratio = paired(
                        candidates[ours], candidates[theirs], prediction, target, args.repeats
                    )
                    comparisons.append(
                        f"{label}: {ours} / {theirs} = {ratio:.2f} "
                        f"(median of {args.repeats} paired runs)"
                    )

    print()
    for line in comparisons:
        print(line)
    print()
    print("| batch | loss | fwd+bwd ms | ratio to L2 |")
    print("| --- | --- | ---: | ---: |")
    for label, name, ms, ratio in rows:
        print(f"| {label} | {name} | {ms:.1f} | {ratio:.1f} |")


if __name__ == "__main__":
    main()
