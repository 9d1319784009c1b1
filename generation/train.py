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

On CUDA: bf16 autocast, channels-last, fused Adam; an in-memory training set lives on the
device (batches by ``index_select``), a folder is read by a DataLoader (pinned memory,
workers). Per-step values stay on the device until a flush every ``LOG_EVERY`` steps, so
the host never waits for the GPU inside the loop.
"""

from __future__ import annotations

import datetime
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


def init_distributed(
    device_name: str, share_gpus: bool = False
) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by ``torchrun``.

    Data parallel (the default): NCCL on CUDA, local rank r on GPU r; gloo on the CPU.
    ``share_gpus`` (``train.distribute=conditions``, where processes only exchange finished
    results): gloo everywhere and local rank r on GPU r mod (GPUs on the machine), so there
    may be more processes than GPUs — e.g. six conditions at once on one GPU."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Distributed(), resolve_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = resolve_device(device_name, gpu_index(local_rank, gpus, share_gpus))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" and not share_gpus else "gloo",
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
    info = Distributed(dist.get_rank(), dist.get_world_size(), local_rank, True)
    return info, device


def gpu_index(local_rank: int, gpus: int, share_gpus: bool) -> int:
    """The GPU of a machine's ``local_rank``-th process: its own (data parallel, which
    needs a GPU per process) or, when processes may share GPUs, ``local_rank mod gpus``."""
    if gpus == 0:
        return local_rank  # unused: the CPU
    if share_gpus:
        return local_rank % gpus
    if local_rank >= gpus:
        raise ValueError(
            f"train.distribute=data needs a GPU per process, but this machine has {gpus} "
            f"GPU(s) for process {local_rank + 1}; start --nproc_per_node {gpus}, or set "
            "train.distribute=conditions (processes may share a GPU)"
        )
    return local_rank


# how long a process waits in a collective (e.g. rank 0 for the others' conditions under
# train.distribute=conditions, which may take hours); torchrun stops every process when one
# fails, so a long wait never outlives a crash
COLLECTIVE_TIMEOUT_S = 24 * 3600


def barrier(info: Distributed) -> None:
    if info.active:
        dist.barrier()


def end_distributed() -> None:
    """Tear down this process's process group, if any, before it exits (a gloo group left
    to the interpreter's exit can abort a rank: "terminate called without an active
    exception", SIGABRT, seen once in CI)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- seeds, data


def derived_seed(seed: int, *labels: str) -> int:
    """A 63-bit seed from the base seed and labels (e.g. the condition name)."""
    text = json.dumps([seed, *labels])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def step_indices(n_items: int, batch_size: int, seed: int, first: int, count: int) -> np.ndarray:
    """Global index batches of steps ``first``…``first+count−1``: int64 ``count × batch_size``.

    Position p of the stream (step · batch_size + i) is item ``perm_e[p mod n]`` of epoch
    e = p div n, ``perm_e`` a permutation seeded by (seed, e): step k's batch depends only
    on (seed, k)."""
    positions = np.arange(first * batch_size, (first + count) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n_items)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        where = epochs == epoch
        permutation = np.random.default_rng([seed, int(epoch)]).permutation(n_items)
        indices[where] = permutation[offsets[where]]
    return indices.reshape(count, batch_size)


class StepBatches(Sampler[list[int]]):
    """Index batches for steps ``start``…``steps−1`` (see :func:`step_indices`); each rank
    takes ``batch[rank::world_size]`` of the global batch."""

    chunk = 256  # steps computed at once

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

    def rank_indices(self, first: int, count: int) -> np.ndarray:
        """This rank's share of steps ``first``…``first+count−1``: ``count × batch/world``."""
        batches = step_indices(self.n, self.batch, self.seed, first, count)
        return batches[:, self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        for first in range(self.start, self.steps, self.chunk):
            yield from self.rank_indices(first, min(self.chunk, self.steps - first)).tolist()


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


class RateControl:
    """The multiplier of the rate constraint KL = ``target`` (nats per image).

    Objective per image: ``d/d0 + beta · kl/target``; d0 (the distortion of the mean
    training image, "zero rate") makes β dimensionless, so one starting value and one
    step size suit every loss. With e = clip(KL̄/target − 1, −1, 1) (KL̄ an exponential
    moving average of the batch KL), :meth:`update` moves the integral state by
    ``dual_lr · e`` after each step (dual ascent on the constraint, in log space so β stays
    positive and can travel orders of magnitude) and β = exp(state + RATE_KP · e) adds a
    proportional term against overshoot. While KL̄ < target β falls (no collapse: the
    reconstruction term dominates until the latent carries the target rate).

    The state lives in float64 0-dim tensors on ``device``, so :meth:`update` takes the
    batch KL as a tensor and never waits for the GPU; the float properties (``beta``,
    ``log_beta``, ``kl_ema``) and :meth:`state`/:meth:`summary` read it back."""

    def __init__(
        self,
        target: float,
        dual_lr: float,
        d0: float,
        log_beta: float,
        device: str | torch.device = "cpu",
    ):
        self.target, self.dual_lr, self.d0 = float(target), float(dual_lr), float(d0)
        scalar = {"dtype": torch.float64, "device": device}
        self._target = torch.tensor(self.target, **scalar)
        self._cap = torch.tensor(KL_EMA_CAP * self.target, **scalar)
        self._log_beta = torch.tensor(float(log_beta), **scalar)
        self._kl_ema = torch.tensor(0.0, **scalar)
        self._started = False  # KL̄ defined once the first batch is in
        self._trajectory: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # [step, KL̄, β]

    @property
    def log_beta(self) -> float:
        return float(self._log_beta)

    @property
    def kl_ema(self) -> float | None:
        return float(self._kl_ema) if self._started else None

    @property
    def beta(self) -> float:
        """The multiplier used now: the integral state plus the proportional term."""
        return float(self._beta())

    @property
    def trajectory(self) -> list[list[float]]:
        return [[step, float(kl), float(beta)] for step, kl, beta in self._trajectory]

    def _error(self) -> torch.Tensor:
        if not self._started:
            return torch.zeros_like(self._kl_ema)
        return (self._kl_ema / self._target - 1.0).clamp(-1.0, 1.0)

    def _beta(self) -> torch.Tensor:
        return torch.exp(self._log_beta + RATE_KP * self._error())

    def objective(self, distance: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        return distance / self.d0 + self._beta() * kl / self.target

    def update(self, kl_mean: float | torch.Tensor, step: int, steps: int) -> None:
        """One step of the controller from the batch's mean KL (nats; a float or a 0-dim
        tensor, kept on its device)."""
        kl = torch.as_tensor(kl_mean, dtype=torch.float64, device=self._kl_ema.device)
        kl = torch.minimum(kl, self._cap)
        if self._started:
            kl = KL_EMA_DECAY * self._kl_ema + (1 - KL_EMA_DECAY) * kl
        self._kl_ema, self._started = kl, True
        low, high = LOG_BETA_LIMITS
        self._log_beta = (self._log_beta + self.dual_lr * self._error()).clamp(low, high)
        every = max(1, steps // RATE_TRAJECTORY_POINTS)
        if step % every == 0 or step == steps - 1:
            self._trajectory.append((step, self._kl_ema, self._beta()))

    def state(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "dual_lr": self.dual_lr,
            "d0": self.d0,
            "log_beta": self.log_beta,
            "kl_ema": self.kl_ema,
            "trajectory": self.trajectory,
        }

    def load_state(self, saved: dict[str, Any]) -> None:
        """Continue from :meth:`state` (a checkpoint's ``rate``)."""
        self.d0 = float(saved["d0"])
        self._log_beta = torch.full_like(self._log_beta, saved["log_beta"])
        self._started = saved["kl_ema"] is not None
        self._kl_ema = torch.full_like(self._kl_ema, saved["kl_ema"] or 0.0)
        device = self._kl_ema.device
        self._trajectory = [
            (
                int(s),
                torch.tensor(k, dtype=torch.float64, device=device),
                torch.tensor(b, dtype=torch.float64, device=device),
            )
            for s, k, b in saved["trajectory"]
        ]

    def summary(self, kl_history: list[float]) -> dict[str, Any]:
        """For the manifest: target, final KL̄ and β, the last 10 % of steps' mean KL,
        the β range and the (step, KL̄, β) trajectory."""
        tail = kl_history[-max(1, len(kl_history) // 10) :] if kl_history else []
        trajectory = self.trajectory
        betas = [point[2] for point in trajectory]
        return {
            "kl_target": self.target,
            "final_kl_ema": self.kl_ema,
            "final_kl_mean_last_10pct": float(np.mean(tail)) if tail else None,
            "final_beta": self.beta,
            "beta_min": min(betas) if betas else self.beta,
            "beta_max": max(betas) if betas else self.beta,
            "zero_rate_distortion": self.d0,
            "trajectory": [[int(s), float(k), float(b)] for s, k, b in trajectory],
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


LOG_EVERY = 100  # steps between host synchronisations (loss history, NaN check, progress)
RESIDENT_MAX_BYTES = 8 * 2**30  # a training set up to this size is copied to the device


def _adam(params, lr: float, cuda: bool, **options: Any) -> torch.optim.Adam:
    """Adam with one fused kernel on CUDA and the multi-tensor (foreach) path on the CPU:
    the same update as the per-parameter loop (bit-identical on the CPU, tested)."""
    if cuda:
        return torch.optim.Adam(params, lr=lr, fused=True, **options)
    return torch.optim.Adam(params, lr=lr, foreach=True, **options)


def loader_workers(settings: dict[str, Any], device: torch.device) -> int:
    """DataLoader workers: ``num_workers`` of a condition (or of a config's ``train``);
    -1 = 0 on the CPU, min(4, cores) on CUDA."""
    workers = settings.get("train", settings)["num_workers"]
    if workers >= 0:
        return workers
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def resident_images(dataset: Dataset) -> torch.Tensor | None:
    """The uint8 N×C×H×W tensor behind an in-memory dataset (``TensorImages``), or None
    for a dataset that decodes its items (a folder)."""
    images = getattr(dataset, "images", None)
    return images if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 else None


def _batches(
    dataset: Dataset, sampler: StepBatches, condition: dict[str, Any], device: torch.device
) -> Iterator[torch.Tensor]:
    """This rank's uint8 batches, step by step.

    An in-memory training set up to ``RESIDENT_MAX_BYTES`` lives on ``device``: the
    indices of ``StepBatches.chunk`` steps travel at once and each batch is an
    ``index_select`` there (no loader, no per-step host→device copy). Anything else goes
    through a DataLoader over the same index batches (workers and pinned memory on CUDA).
    Both give the same batches, and both take one draw from the global RNG here (the
    DataLoader's iterator does), so Watson's shift augmentation sees the same RNG either
    way and as in earlier versions."""
    images = resident_images(dataset)
    if images is not None and images.numel() <= RESIDENT_MAX_BYTES:
        torch.empty((), dtype=torch.int64).random_()
        return _resident_batches(images.to(device), sampler)
    workers = loader_workers(condition, device)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda"
    )
    return iter(loader)


def _resident_batches(images: torch.Tensor, sampler: StepBatches) -> Iterator[torch.Tensor]:
    for first in range(sampler.start, sampler.steps, sampler.chunk):
        count = min(sampler.chunk, sampler.steps - first)
        indices = torch.from_numpy(sampler.rank_indices(first, count).copy()).to(images.device)
        for row in indices:
            yield images.index_select(0, row)


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
    optimizer = _adam(model.parameters(), condition["lr"], cuda)
    adversarial = condition["adversarial_weight"] > 0
    disc = disc_optimizer = None
    if adversarial:
        torch.manual_seed(derived_seed(seed, name, "discriminator"))
        disc = Discriminator(channels, size).to(device)
        disc_optimizer = _adam(disc.parameters(), condition["lr"], cuda, betas=(0.5, 0.999))
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
            device=device,
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
            rate.load_state(state["rate"])
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

    per_rank = max(1, condition["batch_size"] // info.world_size)
    sampler = StepBatches(
        len(dataset), per_rank * info.world_size, steps, cseed, start, info.rank, info.world_size
    )
    if getattr(model, "architecture", None) == "vae":  # each rank: its rows of the global noise
        model.noise_shard = (info.rank, info.world_size)

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
    # the per-step values stay on the device until a flush (every LOG_EVERY steps, before
    # each checkpoint, at the end): no host synchronisation inside the loop
    pending_loss = torch.zeros(LOG_EVERY, device=device)
    pending_kl = torch.zeros(LOG_EVERY, device=device)
    pending = 0
    images, began = 0, time.perf_counter()
    batches = _batches(dataset, sampler, condition, device)  # one global RNG draw

    def flush(step: int) -> None:
        nonlocal pending
        if not pending:
            return
        if info.active:  # the loss of the global batch, as one process records it
            dist.all_reduce(pending_loss)
            pending_loss.div_(info.world_size)
        values = pending_loss[:pending].tolist()
        bad = [i for i, value in enumerate(values) if not math.isfinite(value)]
        if bad:
            raise TrainingError(
                f"condition {name!r}: the loss became {values[bad[0]]} at step "
                f"{step - pending + bad[0]}; lower train.lr"
            )
        history.extend(values)
        if model_is_vae:
            kl_history.extend(pending_kl[:pending].tolist())
        bar.update(pending)
        speed = images * info.world_size / max(time.perf_counter() - began, 1e-9)
        postfix = {"loss": f"{values[-1]:.4g}", "img_s": f"{speed:.0f}"}
        if rate is not None:
            postfix.update(kl=f"{rate.kl_ema:.1f}", beta=f"{rate.beta:.3g}")
        bar.set_postfix(postfix, refresh=False)
        pending = 0

    model_is_vae = getattr(model, "architecture", None) == "vae"
    if resumed_rng is not None:  # the global RNG where it was (Watson's shift augmentation)
        torch.set_rng_state(resumed_rng.cpu())
    step = start
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
        pending_loss[pending] = distance.detach().mean()
        if out.kl is not None:
            kl_mean = out.kl.detach().float().mean()
            if info.active:  # every rank must take the same multiplier step
                dist.all_reduce(kl_mean)
                kl_mean = kl_mean / info.world_size
            pending_kl[pending] = kl_mean
            if rate is not None:
                rate.update(kl_mean, step, steps)
        pending += 1
        step += 1
        images += x.shape[0]
        checkpoint = step % condition["checkpoint_every"] == 0 and step < steps
        if pending == LOG_EVERY or checkpoint or step == steps:
            flush(step)
        if checkpoint:
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
