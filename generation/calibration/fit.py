"""Fit a loss's parameters on 2AFC triplets, the way LPIPS and Czolbe et al. did.

For every triplet the loss gives d0 = loss(p0, ref) and d1 = loss(p1, ref); a small
ranking head (LPIPS's ``BCERankingLoss``: an MLP on (d0, d1, d0 − d1, d0/(d1 + ε),
d1/(d0 + ε)), ε = 0.1, two hidden layers of 32 with leaky ReLU 0.2) turns them into the
logit of "judges prefer p1", trained with binary cross-entropy against the observed
fraction (weighted by votes). Adam updates the loss's parameters and the head together;
after every epoch the validation 2AFC score (which depends on the loss only, never on the
head) decides early stopping, and the best epoch's parameters are kept.

What is fitted:

- ``watson-dct``, ``watson-dft``: every parameter of the model (log thresholds, masking
  exponents α and w, pooling exponent β, colour channel weights, DFT phase weights), from
  the loss's starting values; β is kept ≥ 1 (a Minkowski norm) after every step;
- ``deep`` and ``lpips-*``: the per-channel weights of the unit-normalised features
  (LPIPS's linear layers), from the loss's weights (uniform for ``deep``), kept ≥ 0 after
  every step as in LPIPS; the frozen backbone runs once per triplet before training
  (the distance is linear in the weights: d = Σ_c w_c · mean_hw (f̂_c − f_c)²).

Distances are divided by a fixed scale (the median training distance of the starting
loss) before the head, so one learning rate suits losses of any magnitude.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from generation.calibration.judgments import Triplets, score_2afc, unique_pairs
from generation.losses.deep import FeatureDistanceLoss, unit_normalise
from generation.losses.watson import WatsonLoss

RANKING_EPS = 0.1  # LPIPS's ε in the ratio features
WATSON_MIN_BETA = 1.0
EVAL_BATCH = 256


@dataclass
class FitSettings:
    """Training settings (defaults documented in docs/losses.md, "Calibrating a loss").

    lr: Adam step of the loss parameters; head_lr: of the ranking head; batch_size:
    triplets per step; max_epochs: passes over the training triplets; patience: epochs
    without a better validation 2AFC score before stopping; hidden: ranking-head width;
    seed: head initialisation and batch order."""

    lr: float = 5e-2
    head_lr: float = 5e-3
    batch_size: int = 50
    max_epochs: int = 30
    patience: int = 5
    hidden: int = 32
    seed: int = 0

    def check(self) -> None:
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value}")
        for name in ("batch_size", "max_epochs", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")


class RankingHead(nn.Module):
    """LPIPS-style ranking head: distances d0, d1 (N) -> logit (N) of "p1 preferred"."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        features = torch.stack(
            [d0, d1, d0 - d1, d0 / (d1 + RANKING_EPS), d1 / (d0 + RANKING_EPS)], dim=-1
        )
        return self.net(features).squeeze(-1)


# ------------------------------------------------------------------------------ adaptors


class WatsonAdaptor:
    """Fits every parameter of a Watson loss; distances from the images each step."""

    def __init__(self, loss: WatsonLoss, device: torch.device):
        self.loss = loss.to(device).eval()
        self.device = device

    def prepare(self, triplets: Triplets) -> dict:
        return {
            "images": triplets.images.to(self.device),
            "ref": torch.from_numpy(triplets.ref).to(self.device),
            "p0": torch.from_numpy(triplets.p0).to(self.device),
            "p1": torch.from_numpy(triplets.p1).to(self.device),
        }

    def parameters(self) -> list[nn.Parameter]:
        return list(self.loss.parameters())

    def distances(self, data: dict, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, rows = data["images"], rows.to(self.device)
        ref = images[data["ref"][rows]]
        both = torch.cat([images[data["p0"][rows]], images[data["p1"][rows]]])
        d = self.loss(both, torch.cat([ref, ref]))
        return d[: len(rows)], d[len(rows) :]

    def project(self) -> None:
        with torch.no_grad():
            self.loss.beta.clamp_(min=WATSON_MIN_BETA)

    def state(self) -> dict:
        return copy.deepcopy(self.loss.state_dict())

    def load_state(self, state: dict) -> None:
        self.loss.load_state_dict(state)

    def module(self) -> nn.Module:
        return self.loss


class FeatureHeadAdaptor:
    """Fits the non-negative per-channel weights of a deep-feature loss. The frozen
    backbone runs once: each (ref, p) pair becomes its per-channel mean squared difference
    of unit-normalised features, v (N × Σ channels), and d = v · w."""

    def __init__(self, loss: FeatureDistanceLoss, device: torch.device, progress: bool = False):
        self.loss = loss.to(device).eval()
        self.device = device
        self.progress = progress
        start = torch.cat([w.reshape(-1) for w in loss.channel_weights]).float()
        self.weights = nn.Parameter(start.clone().to(device))
        self.sizes = [w.numel() for w in loss.channel_weights]

    @torch.no_grad()
    def unit_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised float32 backbone taps of images N×C×H×W."""
        return [unit_normalise(f.float()) for f in self.loss.features(images)]

    @staticmethod
    def channel_differences(
        predicted: list[torch.Tensor], target: list[torch.Tensor]
    ) -> torch.Tensor:
        """v of unit-normalised taps: mean_hw (f̂ − f)² per channel, N × Σ channels."""
        parts = [(p - t).square().mean((2, 3)) for p, t in zip(predicted, target, strict=True)]
        return torch.cat(parts, 1)

    def prepare(self, triplets: Triplets) -> dict:
        """v of every distinct (candidate, reference) pair, each image through the backbone
        once per chunk of pairs; i0, i1 map triplets to the rows of v."""
        pairs, inverse = unique_pairs(triplets)
        images, parts = triplets.images, []
        starts = range(0, len(pairs), EVAL_BATCH)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="features", unit="chunk", leave=False)
        for start in starts:
            chunk = pairs[start : start + EVAL_BATCH]
            needed, where = np.unique(chunk, return_inverse=True)
            taps = self.unit_features(images[torch.from_numpy(needed)].to(self.device))
            where = torch.from_numpy(where.reshape(chunk.shape)).to(self.device)
            parts.append(
                self.channel_differences(
                    [t[where[:, 0]] for t in taps], [t[where[:, 1]] for t in taps]
                )
            )
        i0, i1 = np.split(inverse, 2)
        return {
            "v": torch.cat(parts),
            "i0": torch.from_numpy(i0).to(self.device),
            "i1": torch.from_numpy(i1).to(self.device),
        }

    def parameters(self) -> list[nn.Parameter]:
        return [self.weights]

    def distances(self, data: dict, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.to(self.device)
        v = data["v"]
        return v[data["i0"][rows]] @ self.weights, v[data["i1"][rows]] @ self.weights

    def project(self) -> None:
        with torch.no_grad():
            self.weights.clamp_(min=0)

    def state(self) -> dict:
        return {"weights": self.weights.detach().clone()}

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            self.weights.copy_(state["weights"])

    def module(self) -> nn.Module:
        """The loss with the current weights written into its channel-weight buffers."""
        with torch.no_grad():
            for index, part in enumerate(self.weights.detach().split(self.sizes)):
                getattr(self.loss, f"channel_weights_{index}").copy_(part)
        return self.loss


def make_adaptor(loss: nn.Module, device: torch.device, progress: bool = False):
    """The adaptor that fits ``loss`` (a Watson or a deep-feature loss module)."""
    if isinstance(loss, WatsonLoss):
        return WatsonAdaptor(loss, device)
    if isinstance(loss, FeatureDistanceLoss):
        return FeatureHeadAdaptor(loss, device, progress)
    raise ValueError(
        f"{type(loss).__name__} has no parameters to fit; fittable losses: watson-dct, "
        "watson-dft, deep, lpips-alex, lpips-vgg, lpips-squeeze"
    )


# ---------------------------------------------------------------------------- fitting


@torch.no_grad()
def all_distances(adaptor, data: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """d0, d1 (float64 numpy, N) of every triplet of a prepared set."""
    d0, d1 = [], []
    for start in range(0, n, EVAL_BATCH):
        rows = torch.arange(start, min(n, start + EVAL_BATCH))
        a, b = adaptor.distances(data, rows)
        d0.append(a.double().cpu())
        d1.append(b.double().cpu())
    return torch.cat(d0).numpy(), torch.cat(d1).numpy()


def weighted_score(d0: np.ndarray, d1: np.ndarray, triplets: Triplets) -> float:
    """Vote-weighted mean 2AFC score."""
    scores = score_2afc(d0, d1, triplets.fraction)
    return float((scores * triplets.weight).sum() / triplets.weight.sum())


class _Clock:
    """Wall-clock laps (seconds), synchronising CUDA first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self.now()
        elapsed, self.last = now - self.last, now
        return elapsed


@dataclass
class FitResult:
    """The fitted loss module and how the fit went.

    history: epoch, steps, train_bce, val_2afc (epoch 0 = before training);
    best_epoch: the epoch whose parameters ``module`` holds; unfitted/fitted: per-triplet
    validation distances (d0, d1) before and after; seconds: wall time of the one-off
    preparation ("prepare") and of the epochs with their validation passes ("train")."""

    module: nn.Module
    history: pd.DataFrame
    best_epoch: int
    steps: int
    scale: float
    settings: FitSettings
    unfitted: tuple[np.ndarray, np.ndarray]
    fitted: tuple[np.ndarray, np.ndarray]
    stopped_early: bool = False
    seconds: dict = field(default_factory=dict)

    def settings_dict(self) -> dict:
        return asdict(self.settings)


def fit_loss(
    loss: nn.Module,
    train: Triplets,
    validation: Triplets,
    settings: FitSettings | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> FitResult:
    """Fit ``loss``'s parameters on ``train``; early stopping on ``validation``'s 2AFC score.

    ``loss`` is changed in place and returned in the result (on the CPU) with the best
    epoch's parameters. Deterministic on the CPU for a given ``settings.seed``."""
    settings = settings or FitSettings()
    settings.check()
    if len(train) == 0 or len(validation) == 0:
        raise ValueError("fitting needs triplets on both sides of the split")
    device = torch.device(device)
    clock = _Clock(device)
    adaptor = make_adaptor(loss, device, progress)
    train_data, val_data = adaptor.prepare(train), adaptor.prepare(validation)
    prepare_s = clock.lap()
    unfitted = all_distances(adaptor, val_data, len(validation))
    start_d0, start_d1 = all_distances(adaptor, train_data, len(train))
    scale = float(np.median(np.concatenate([start_d0, start_d1])))
    if not (math.isfinite(scale) and scale > 0):
        scale = 1.0
    torch.manual_seed(settings.seed)
    head = RankingHead(settings.hidden).to(device)
    optimizer = torch.optim.Adam(
        [
            {"params": adaptor.parameters(), "lr": settings.lr},
            {"params": head.parameters(), "lr": settings.head_lr},
        ]
    )
    generator = torch.Generator().manual_seed(settings.seed)
    fraction = torch.from_numpy(train.fraction).float().to(device)
    weight = torch.from_numpy(train.weight).float().to(device)
    best_score = weighted_score(*unfitted, validation)
    best_state, best_epoch, steps, since_best = adaptor.state(), 0, 0, 0
    history = [{"epoch": 0, "steps": 0, "train_bce": float("nan"), "val_2afc": best_score}]
    epochs = range(1, settings.max_epochs + 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(epochs, desc=f"fit {getattr(loss, 'name', 'loss')}", unit="epoch")
        epochs = bar
    stopped_early = False
    for epoch in epochs:
        order = torch.randperm(len(train), generator=generator)
        total, count = 0.0, 0.0
        for start in range(0, len(train), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            d0, d1 = adaptor.distances(train_data, rows)
            logit = head(d0.float() / scale, d1.float() / scale)
            w = weight[rows.to(device)]
            bce = nn.functional.binary_cross_entropy_with_logits(
                logit, fraction[rows.to(device)], reduction="none"
            )
            value = (bce * w).sum() / w.sum()
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            adaptor.project()
            steps += 1
            total += float(value.detach()) * float(w.sum())
            count += float(w.sum())
        score = weighted_score(*all_distances(adaptor, val_data, len(validation)), validation)
        history.append(
            {"epoch": epoch, "steps": steps, "train_bce": total / count, "val_2afc": score}
        )
        if bar is not None:
            bar.set_postfix(val_2afc=f"{score:.4f}", best=f"{max(score, best_score):.4f}")
        if score > best_score + 1e-12:
            best_score, best_state, best_epoch, since_best = score, adaptor.state(), epoch, 0
        else:
            since_best += 1
            if since_best >= settings.patience:
                stopped_early = True
                break
    train_s = clock.lap()
    adaptor.load_state(best_state)
    fitted = all_distances(adaptor, val_data, len(validation))
    module = adaptor.module().to("cpu")
    return FitResult(
        module=module,
        history=pd.DataFrame(history),
        best_epoch=best_epoch,
        steps=steps,
        scale=scale,
        settings=settings,
        unfitted=unfitted,
        fitted=fitted,
        stopped_early=stopped_early,
        seconds={"prepare": prepare_s, "train": train_s},
    )
