"""Training one autoencoder per condition: seeded, resumable, single- or multi-process.

One optimiser step sees ``batch_size`` images chosen by :class:`StepBatches`, a sampler
whose batches depend only on (seed, step) — so a run resumed from a checkpoint at step k
sees exactly the batches an uninterrupted run sees after step k, and under
DistributedDataParallel each rank takes its share of the same global batch.

Objective per image i: ``recon_weight · d_i + kl_i`` (kl only for the VAE), averaged over
the batch, plus ``adversarial_weight · softplus(−D(x̂))`` when a discriminator is on.

With ``kl_target`` (VAE only) the objective is the rate-constrained one instead: minimise
d subject to KL = target, as the Lagrangian ``d_i/d₀ + β · kl_i/target`` with d₀ the
distortion at zero rate (the mean training image as every reconstruction) and the
multiplier β ≥ 0 updated after every step by dual ascent on log β:
``s += kl_dual_lr · e``, ``β = exp(s + 2e)`` with e = clip(KL̄/target − 1, −1, 1) and KL̄ a
moving average of the batch KL (a PI controller; :class:`RateControl`). Every condition
then ends at the same rate whatever the scale of its loss; see docs/generation.md
("Equal rate").

On CUDA: bf16 autocast, channels-last, pinned memory and loader workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from generation.losses import build_loss
from generation.models import Discriminator, build_model

CHECKPOINT_FORMAT = "pstudy-autoencoder-checkpoint"


class TrainingError(RuntimeError):
    """A training problem a user can fix (e.g. a checkpoint from another configuration)."""


# ----------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Distributed:
    """Process group facts: rank, world size, local rank (all 0/1/0 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by ``torchrun`` (nccl on CUDA, gloo on CPU)."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Distributed(), resolve_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    info = Distributed(dist.get_rank(), dist.get_world_size(), local_rank, True)
    return info, device


def barrier(info: Distributed) -> None:
    if info.active:
        dist.barrier()


# ----------------------------------------------------------------------------- seeds, data


def derived_seed(seed: int, *labels: str) -> int:
    """A 63-bit seed from the base seed and labels (e.g. the condition name)."""
    text = json.dumps([seed, *labels])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


class StepBatches(Sampler[list[int]]):
    """Index batches for steps ``start``…``steps−1``; epoch e is a permutation seeded by
    (seed, e); each rank takes ``batch[rank::world_size]`` of the global batch."""

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        steps: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if n_items < 1:
            raise TrainingError("the training set is empty")
        self.n, self.batch, self.steps, self.seed = n_items, batch_size, steps, seed
        self.start, self.rank, self.world = start, rank, world_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[list[int]]:
        cache: dict[int, np.ndarray] = {}
        for step in range(self.start, self.steps):
            first = step * self.batch
            indices = []
            for position in range(first, first + self.batch):
                epoch, offset = divmod(position, self.n)
                if epoch not in cache:
                    if len(cache) > 2:
                        cache.clear()
                    cache[epoch] = self._epoch(epoch)
                indices.append(int(cache[epoch][offset]))
            yield indices[self.rank :: self.world]


# ----------------------------------------------------------------------------- checkpoints


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained autoencoder stored in a final ``model.pt`` (eval mode)."""
    state = torch.load(path, map_location=device, weights_only=True)
    condition = state["condition"]
    model = build_model(
        condition["architecture"],
        channels=state["channels"],
        size=state["size"],
        latent=condition["latent"],
        width=condition["width"],
        upsample=condition.get("upsample", "transpose"),  # absent in older checkpoints
    )
    model.load_state_dict(state["model"])
    return model.to(device).eval()


@dataclass
class TrainResult:
    """What training one condition produced."""

    condition: str
    model_path: Path
    checkpoint_sha256: str
    steps: int
    start_step: int  # > 0 when resumed
    losses: list[float] = field(default_factory=list)  # mean reconstruction loss per step
    images_per_s: float = float("nan")  # this process, steps run now (nan if none)
    kl: list[float] = field(default_factory=list)  # VAE: mean KL per step (nats per image)
    rate: dict[str, Any] | None = None  # rate constraint summary (kl_target set), else None
    peak_memory_mib: float | None = None  # CUDA: peak allocated memory while training


# ----------------------------------------------------------------------------- rate


# β's range. The floor is anti-windup: while the rate is still rising towards the target
# (for many steps at 64×64) the integral state would otherwise keep falling, and β would
# need as many steps to come back once the target is reached; 10⁻⁴ is well below every
# equilibrium measured (0.007–0.03: β is dimensionless, docs/generation.md)
LOG_BETA_LIMITS = (math.log(1e-4), math.log(1e4))
KL_EMA_DECAY = 0.9  # moving average of the batch KL that drives the multiplier
KL_EMA_CAP = 2.0  # a batch enters the average at ≤ 2 × target (one outlier batch must
# not hold β up for tens of steps; above 2 × target the error is clipped at +1 anyway)
RATE_TRAJECTORY_POINTS = 20  # (step, KL̄, β) samples kept for the manifest
# proportional gain on log β (a PI controller, as in ControlVAE, Shao et al. 2020): damps
# the overshoot of pure dual ascent when the rate rises quickly early in training
RATE_KP = 2.0


@dataclass
class RateControl:
    """The multiplier of the rate constraint KL = ``target`` (nats per image).

    Objective per image: ``d/d0 + beta · kl/target``; d0 (the distortion of the mean
    training image, "zero rate") makes β dimensionless, so one starting value and one
    step size suit every loss. With e = clip(KL̄/target − 1, −1, 1) (KL̄ an exponential
    moving average of the batch KL), :meth:`update` moves the integral state by
    ``dual_lr · e`` after each step (dual ascent on the constraint, in log space so β stays
    positive and can travel orders of magnitude) and β = exp(state + RATE_KP · e) adds a
    proportional term against overshoot. While KL̄ < target β falls (no collapse: the
    reconstruction term dominates until the latent carries the target rate)."""

    target: float
    dual_lr: float
    d0: float
    log_beta: float
    kl_ema: float | None = None
    trajectory: list[list[float]] = field(default_factory=list)  # [step, KL̄, β]

    @property
    def beta(self) -> float:
        """The multiplier used now: the integral state plus the proportional term."""
        return math.exp(self.log_beta + RATE_KP * self._error())

    def _error(self) -> float:
        if self.kl_ema is None:
            return 0.0
        return min(1.0, max(-1.0, self.kl_ema / self.target - 1.0))

    def objective(self, distance: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        return distance / self.d0 + self.beta * kl / self.target

    def update(self, kl_mean: float, step: int, steps: int) -> None:
        kl_mean = min(kl_mean, KL_EMA_CAP * self.target)
        self.kl_ema = (
            kl_mean
            if self.kl_ema is None
            else KL_EMA_DECAY * self.kl_ema + (1 - KL_EMA_DECAY) * kl_mean
        )
        low, high = LOG_BETA_LIMITS
        self.log_beta = min(high, max(low, self.log_beta + self.dual_lr * self._error()))
        every = max(1, steps // RATE_TRAJECTORY_POINTS)
        if step % every == 0 or step == steps - 1:
            self.trajectory.append([step, self.kl_ema, self.beta])

    def state(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "dual_lr": self.dual_lr,
            "d0": self.d0,
            "log_beta": self.log_beta,
            "kl_ema": self.kl_ema,
            "trajectory": self.trajectory,
        }

    def summary(self, kl_history: list[float]) -> dict[str, Any]:
        """For the manifest: target, final KL̄ and β, the last 10 % of steps' mean KL,
        the β range and the (step, KL̄, β) trajectory."""
        tail = kl_history[-max(1, len(kl_history) // 10) :] if kl_history else []
        betas = [point[2] for point in self.trajectory]
        return {
            "kl_target": self.target,
            "final_kl_ema": self.kl_ema,
            "final_kl_mean_last_10pct": float(np.mean(tail)) if tail else None,
            "final_beta": self.beta,
            "beta_min": min(betas) if betas else self.beta,
            "beta_max": max(betas) if betas else self.beta,
            "zero_rate_distortion": self.d0,
            "trajectory": [[int(s), float(k), float(b)] for s, k, b in self.trajectory],
        }


@torch.no_grad()
def zero_rate_distortion(
    loss_fn: nn.Module, dataset: Dataset, device: torch.device, n: int = 256, batch: int = 64
) -> float:
    """Mean distortion of the mean image of the first ``n`` training images, predicted for
    each of them: what a model that transmits nothing achieves (rate 0), the loss's own
    scale. Deterministic (the loss in eval mode, no shift augmentation)."""
    count = min(n, len(dataset))
    images = torch.stack([torch.as_tensor(dataset[i]) for i in range(count)]).float() / 255.0
    mean = images.mean(0, keepdim=True)
    was_training = loss_fn.training
    loss_fn.eval()
    total = 0.0
    for start in range(0, count, batch):
        x = images[start : start + batch].to(device)
        total += float(loss_fn(mean.to(device).expand_as(x).contiguous(), x).float().sum())
    loss_fn.train(was_training)
    value = total / count
    if not math.isfinite(value) or value <= 0:
        raise TrainingError(
            f"the loss of the mean image is {value}; the rate constraint needs a positive "
            "zero-rate distortion (are all training images identical?)"
        )
    return value


# ----------------------------------------------------------------------------- training


def _lr(condition: dict[str, Any], step: int) -> float:
    halve = condition["lr_halve_every"]
    return condition["lr"] * (0.5 ** (step // halve) if halve else 1.0)


def train_condition(
    condition: dict[str, Any],
    dataset: Dataset,
    *,
    channels: int,
    size: int,
    seed: int,
    fingerprint: str,
    checkpoint_dir: str | Path,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    distributed: Distributed | None = None,
) -> TrainResult:
    """Train one autoencoder for ``condition`` (a validated condition mapping).

    ``fingerprint`` identifies everything the result depends on (config + inputs); a
    checkpoint with another fingerprint is never resumed. Checkpoints go to
    ``checkpoint_dir/last.pt`` every ``checkpoint_every`` steps; the trained model to
    ``checkpoint_dir/model.pt``. With ``resume``, training continues from ``last.pt``
    (or is skipped when ``model.pt`` is complete).
    """
    info = distributed or Distributed()
    checkpoint_dir = Path(checkpoint_dir)
    last_path, model_path = checkpoint_dir / "last.pt", checkpoint_dir / "model.pt"
    name, steps = condition["name"], condition["steps"]
    cseed = derived_seed(seed, name)
    cuda = device.type == "cuda"

    torch.manual_seed(cseed)
    model = build_model(
        condition["architecture"],
        channels=channels,
        size=size,
        latent=condition["latent"],
        width=condition["width"],
        upsample=condition.get("upsample", "transpose"),
    ).to(device)
    loss_fn = (
        build_loss(condition["loss"], **condition.get("loss_options", {}))
        .to(device)
        .requires_grad_(False)
    )
    min_size = getattr(loss_fn, "min_size", 1)
    if size < min_size:
        raise TrainingError(
            f"loss {condition['loss']!r} needs images of at least {min_size}×{min_size}; "
            f"data.image_size is {size}"
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=condition["lr"])
    adversarial = condition["adversarial_weight"] > 0
    disc = disc_optimizer = None
    if adversarial:
        torch.manual_seed(derived_seed(seed, name, "discriminator"))
        disc = Discriminator(channels, size).to(device)
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=condition["lr"], betas=(0.5, 0.999))
    noise = torch.Generator(device=device)
    noise.manual_seed(derived_seed(seed, name, "noise"))
    rate: RateControl | None = None
    if condition.get("kl_target") is not None:
        if condition["architecture"] != "vae":
            raise TrainingError(f"condition {name!r}: kl_target needs architecture vae")
        rate = RateControl(
            target=float(condition["kl_target"]),
            dual_lr=float(condition["kl_dual_lr"]),
            d0=zero_rate_distortion(loss_fn, dataset, device),
            log_beta=math.log(condition["kl_beta_init"]),
        )

    start, history, kl_history = 0, [], []
    resumed_rng = None
    if resume and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
            raise TrainingError(
                f"checkpoint {last_path} was written for a different configuration or input; "
                "run without --resume to start over, or choose another --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if adversarial:
            disc.load_state_dict(state["disc"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        noise.set_state(state["noise"].cpu())
        resumed_rng = state.get("torch_rng")
        start, history = state["step"], list(state["losses"])
        kl_history = list(state.get("kl", []))
        if rate is not None:
            saved = state["rate"]
            rate.d0, rate.log_beta, rate.kl_ema = saved["d0"], saved["log_beta"], saved["kl_ema"]
            rate.trajectory = [list(point) for point in saved["trajectory"]]
        if state.get("done") and model_path.exists():
            return TrainResult(
                name,
                model_path,
                file_sha256(model_path),
                steps,
                start,
                history,
                kl=kl_history,
                rate=rate.summary(kl_history) if rate is not None else None,
            )

    if cuda:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    disc_net = disc
    if info.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None
        )
        if adversarial:
            disc_net = nn.parallel.DistributedDataParallel(
                disc, device_ids=[device.index] if cuda else None
            )

    workers = condition["num_workers"]
    if workers < 0:
        workers = min(4, os.cpu_count() or 1) if cuda else 0
    per_rank = max(1, condition["batch_size"] // info.world_size)
    sampler = StepBatches(
        len(dataset), per_rank * info.world_size, steps, cseed, start, info.rank, info.world_size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=False,
    )

    def save(step: int, done: bool) -> None:
        if not info.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "condition": condition,
            "step": step,
            "done": done,
            "losses": history,
            "kl": kl_history,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "noise": noise.get_state(),
            "torch_rng": torch.get_rng_state(),  # e.g. Watson's shift augmentation
        }
        if adversarial:
            state["disc"], state["disc_optimizer"] = disc.state_dict(), disc_optimizer.state_dict()
        if rate is not None:
            state["rate"] = rate.state()
        _atomic_save(state, last_path)

    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"train {name}",
        unit="step",
        leave=True,
        disable=not (progress and info.is_main),
        dynamic_ncols=True,
    )
    net.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    images, began = 0, time.perf_counter()
    step = start
    batches = iter(loader)  # draws a base seed from the global RNG (as at step 0)
    if resumed_rng is not None:  # the global RNG where it was (Watson's shift augmentation)
        torch.set_rng_state(resumed_rng.cpu())
    for batch in batches:
        x = batch.to(device, non_blocking=True).float().div_(255.0)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = _lr(condition, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = net(x, noise)
            recon = out.images.float()
            distance = loss_fn(recon, x).float()
            if rate is not None:
                objective = rate.objective(distance, out.kl.float())
            else:
                objective = condition["recon_weight"] * distance
                if out.kl is not None:
                    objective = objective + out.kl.float()
            total = objective.mean()
            if adversarial:
                total = (
                    total + condition["adversarial_weight"] * F.softplus(-disc_net(recon)).mean()
                )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if adversarial:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                # one forward over real + fake (DDP expects one forward per backward)
                logits = disc_net(torch.cat([x, recon.detach()])).float()
                real, fake = logits.chunk(2)
                d_loss = (F.softplus(-real) + F.softplus(fake)).mean()
            disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_optimizer.step()
        value = float(distance.detach().mean())
        if not math.isfinite(value):
            raise TrainingError(
                f"condition {name!r}: the loss became {value} at step {step}; lower train.lr"
            )
        history.append(value)
        if out.kl is not None:
            kl_mean = out.kl.detach().float().mean()
            if info.active:  # every rank must take the same multiplier step
                dist.all_reduce(kl_mean)
                kl_mean = kl_mean / info.world_size
            kl_history.append(float(kl_mean))
            if rate is not None:
                rate.update(kl_history[-1], step, steps)
        step += 1
        images += x.shape[0]
        speed = images * info.world_size / max(time.perf_counter() - began, 1e-9)
        postfix = {"loss": f"{value:.4g}", "img_s": f"{speed:.0f}"}
        if rate is not None:
            postfix.update(kl=f"{rate.kl_ema:.1f}", beta=f"{rate.beta:.3g}")
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if step % condition["checkpoint_every"] == 0 and step < steps:
            save(step, done=False)
            barrier(info)
    elapsed = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    bar.close()
    if info.is_main:
        _atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "condition": condition,
                "channels": channels,
                "size": size,
                "fingerprint": fingerprint,
                "model": model.state_dict(),
            },
            model_path,
        )
    save(step, done=True)
    barrier(info)
    return TrainResult(
        name,
        model_path,
        file_sha256(model_path),
        steps,
        start,
        history,
        images * info.world_size / elapsed if images else float("nan"),
        kl=kl_history,
        rate=rate.summary(kl_history) if rate is not None else None,
        peak_memory_mib=peak,
    )
