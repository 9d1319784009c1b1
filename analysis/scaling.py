"""Scaling all conditions on one axis: Bradley–Terry and Thurstone Case V (JOD).

Bradley–Terry: P(i over j) = logistic(b_i - b_j), b in logits. Thurstone Case V as pwcmp
defines it: P(i over j) = Phi((q_i - q_j) / 1.4826), q in JOD (just-objectionable
differences; 1 JOD = 75 % preference). Both are fitted by damped Newton on a count matrix
``wins[i, j]`` (times i was chosen over j). Maximum likelihood is finite only when the
win graph is strongly connected; otherwise (or when asked) a Gaussian prior (ridge
penalty ``alpha / 2 * sum(s**2)``, the MAP under N(0, 1/alpha) like choix's ``alpha``)
keeps the estimates finite. Intervals come from a bootstrap over observers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import special, stats
from scipy.sparse.csgraph import connected_components

from analysis.intervals import holm_adjust
from analysis.simulation import JOD_SIGMA

AUTO_ALPHA = 0.01  # ridge used when the win graph is not strongly connected (BT, logits^-2)
THURSTONE_PRIOR_SD = 3.0  # JOD; weak Gaussian prior per condition (pwcmp uses a prior too)


def condition_names(responses: pd.DataFrame) -> list[str]:
    """Sorted names of all conditions compared in ``responses``."""
    left = responses["condition_left"].astype(str)
    right = responses["condition_right"].astype(str)
    return sorted(set(left.unique()) | set(right.unique()))


def win_matrix(responses: pd.DataFrame, names: list[str] | None = None) -> np.ndarray:
    """K x K counts: ``wins[i, j]`` = trials where names[i] was chosen over names[j]."""
    names = names or condition_names(responses)
    index = {name: i for i, name in enumerate(names)}
    left = responses["condition_left"].astype(str).map(index).to_numpy()
    right = responses["condition_right"].astype(str).map(index).to_numpy()
    chosen_left = (
        responses["chosen_condition"].astype(str) == responses["condition_left"].astype(str)
    ).to_numpy()
    winner = np.where(chosen_left, left, right)
    loser = np.where(chosen_left, right, left)
    size = len(names)
    return (
        np.bincount(winner * size + loser, minlength=size * size).reshape(size, size).astype(float)
    )


def participant_win_tensor(
    responses: pd.DataFrame, names: list[str]
) -> tuple[list[str], np.ndarray]:
    """(participants, P x K x K counts per participant) for observer bootstraps."""
    index = {name: i for i, name in enumerate(names)}
    codes, participants = pd.factorize(responses["participant"].astype(str), sort=True)
    left = responses["condition_left"].astype(str).map(index).to_numpy()
    right = responses["condition_right"].astype(str).map(index).to_numpy()
    chosen_left = (
        responses["chosen_condition"].astype(str) == responses["condition_left"].astype(str)
    ).to_numpy()
    winner = np.where(chosen_left, left, right)
    loser = np.where(chosen_left, right, left)
    size = len(names)
    flat = (codes * size + winner) * size + loser
    counts = np.bincount(flat, minlength=len(participants) * size * size)
    return list(participants), counts.reshape(len(participants), size, size).astype(float)


def strongly_connected(wins: np.ndarray) -> bool:
    """True when every condition can reach every other along 'beat' edges."""
    if wins.shape[0] < 2:
        return True
    count, _ = connected_components(wins > 0, directed=True, connection="strong")
    return count == 1


def _link_terms(diff: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log P(win), d/dd log P, -d2/dd2 log P for a difference d (elementwise)."""
    if model == "bt":
        logp = -np.logaddexp(0.0, -diff)
        p = special.expit(diff)
        return logp, 1.0 - p, p * (1.0 - p)
    x = diff / JOD_SIGMA
    logp = special.log_ndtr(x)
    mills = np.exp(stats.norm.logpdf(x) - logp)  # phi / Phi
    return logp, mills / JOD_SIGMA, mills * (mills + x) / JOD_SIGMA**2


def _objective(s, wins, alpha, model):
    diff = s[:, None] - s[None, :]
    logp, dlogp, curv = _link_terms(diff, model)
    value = -np.sum(wins * logp) + 0.5 * alpha * np.sum(s**2)
    grad = -(np.sum(wins * dlogp, axis=1) - np.sum(wins * dlogp, axis=0)) + alpha * s
    weight = wins * curv
    weight = weight + weight.T
    hess = -weight
    np.fill_diagonal(hess, 0.0)
    np.fill_diagonal(hess, weight.sum(axis=1) - np.diag(weight) + alpha)
    return value, grad, hess


def fit_scale(
    wins: np.ndarray,
    model: str = "bt",
    alpha: float = 0.0,
    *,
    initial: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> np.ndarray:
    """Scale values (mean zero) maximising the (penalised) likelihood of ``wins``.

    ``model``: "bt" (logits) or "thurstone" (JOD). ``alpha`` >= 0: ridge strength. With
    alpha = 0 the win graph must be strongly connected (else ValueError).
    """
    if model not in ("bt", "thurstone"):
        raise ValueError(f"model must be 'bt' or 'thurstone', got {model!r}")
    size = wins.shape[0]
    if alpha == 0 and not strongly_connected(wins):
        raise ValueError(
            "the win graph is not strongly connected, so the maximum-likelihood scale is "
            "infinite; use a prior (alpha > 0)"
        )
    s = np.zeros(size) if initial is None else np.array(initial, dtype=float)
    centre = np.ones((size, size)) / size
    value, grad, hess = _objective(s, wins, alpha, model)
    for _ in range(max_iter):
        step = np.linalg.solve(hess + (centre if alpha == 0 else 0.0), -grad)
        scale = 1.0
        while True:
            candidate = s + scale * step
            new_value, new_grad, new_hess = _objective(candidate, wins, alpha, model)
            if new_value <= value + 1e-4 * scale * grad @ step or scale < 1e-8:
                break
            scale *= 0.5
        s, value, grad, hess = candidate, new_value, new_grad, new_hess
        if np.max(np.abs(scale * step)) < tol:
            break
    return s - s.mean() if alpha == 0 else s


def anchor_scale(values: np.ndarray, names: list[str], anchor: str | None) -> np.ndarray:
    """Mean-zero values (anchor None) or values shifted so ``anchor`` is 0 (any axis=-1)."""
    values = np.asarray(values, dtype=float)
    if anchor is None:
        return values - values.mean(axis=-1, keepdims=True)
    if anchor not in names:
        raise ValueError(f"anchor {anchor!r} is not a condition ({', '.join(names)})")
    return values - values[..., [names.index(anchor)]]


@dataclass
class ScaleResult:
    """A fitted scale: tidy ``scale`` (condition, estimate, se, ci_low, ci_high, wins,
    comparisons), ``significance`` (pairwise differences with bootstrap z tests),
    the options used (``prior``: which prior), and the bootstrap replicates (n_boot x K,
    anchored)."""

    model: str
    unit: str
    anchor: str | None
    alpha: float
    strongly_connected: bool
    n_boot: int
    scale: pd.DataFrame
    significance: pd.DataFrame
    replicates: np.ndarray = field(repr=False)
    prior: str | None = None  # "gaussian" (ours), "pwcmp" (analysis.pwcmp) or "none"


def _default_alpha(model: str, prior: str, wins: np.ndarray) -> float:
    if model == "thurstone" and prior == "gaussian":
        return 1.0 / THURSTONE_PRIOR_SD**2
    if prior == "none":
        return 0.0 if strongly_connected(wins) else AUTO_ALPHA
    raise ValueError(f"prior must be 'gaussian' or 'none', got {prior!r}")


def significance_matrix(
    names: list[str], estimate: np.ndarray, replicates: np.ndarray, level: float = 0.95
) -> pd.DataFrame:
    """Pairwise differences a - b with bootstrap SE, two-sided normal z test, Holm."""
    cov = (
        np.cov(replicates, rowvar=False)
        if replicates.shape[0] > 1
        else np.full((len(names), len(names)), np.nan)
    )
    rows = []
    z_crit = stats.norm.isf((1 - level) / 2)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            diff = estimate[i] - estimate[j]
            var = cov[i, i] + cov[j, j] - 2 * cov[i, j]
            se = float(np.sqrt(var)) if var > 0 else np.nan
            z = diff / se if se and np.isfinite(se) else np.nan
            rows.append(
                {
                    "condition_a": names[i],
                    "condition_b": names[j],
                    "difference": diff,
                    "se": se,
                    "ci_low": diff - z_crit * se,
                    "ci_high": diff + z_crit * se,
                    "z": z,
                    "p_value": 2 * stats.norm.sf(abs(z)) if np.isfinite(z) else np.nan,
                }
            )
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_holm"] = holm_adjust(table["p_value"].to_numpy())
        table["significant"] = table["p_holm"] < (1 - level)
    return table


def scale_conditions(
    responses: pd.DataFrame,
    model: str = "thurstone",
    *,
    prior: str | None = None,
    alpha: float | None = None,
    anchor: str | None = None,
    n_boot: int = 500,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> ScaleResult:
    """Fit a Bradley–Terry ("bt") or Thurstone Case V ("thurstone", JOD) scale to the
    rows of ``responses`` (use main trials of kept participants) with observer-bootstrap
    percentile intervals at ``level``.

    ``prior``: "gaussian" (default for thurstone: N(0, 3^2) JOD per condition), "none"
    (default for bt: plain maximum likelihood, regularised with alpha=0.01 only when the
    win graph is not strongly connected) or "pwcmp". ``alpha`` overrides the ridge strength.
    ``anchor``: None for mean zero, or a condition fixed at 0. ``prior="pwcmp"`` (thurstone
    only): pwcmp's pw_scale model and prior instead of ours (``analysis.pwcmp``).
    """
    if prior == "pwcmp":
        if model != "thurstone":
            raise ValueError("prior='pwcmp' is a Thurstone (JOD) prior; use model='thurstone'")
        from analysis.pwcmp import scale_conditions_pwcmp

        return scale_conditions_pwcmp(
            responses, anchor=anchor, n_boot=n_boot, level=level, seed=seed, progress=progress
        )
    names = condition_names(responses)
    if len(names) < 2:
        raise ValueError("scaling needs at least two conditions")
    prior = prior or ("gaussian" if model == "thurstone" else "none")
    wins = win_matrix(responses, names)
    connected = strongly_connected(wins)
    use_alpha = _default_alpha(model, prior, wins) if alpha is None else float(alpha)
    estimate = anchor_scale(fit_scale(wins, model, use_alpha), names, anchor)
    participants, tensor = participant_win_tensor(responses, names)
    rng = np.random.default_rng(seed)
    replicates = np.empty((n_boot, len(names)))
    iterator = range(n_boot)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"bootstrap {model}", unit="fit", leave=False)
    start = estimate - estimate.mean()
    for b in iterator:
        weights = np.bincount(
            rng.integers(0, len(participants), len(participants)), minlength=len(participants)
        ).astype(float)
        boot_wins = np.tensordot(weights, tensor, axes=1)
        boot_alpha = use_alpha
        if boot_alpha == 0 and not strongly_connected(boot_wins):
            boot_alpha = AUTO_ALPHA
        replicates[b] = fit_scale(boot_wins, model, boot_alpha, initial=start)
    replicates = anchor_scale(replicates, names, anchor)
    tail = (1 - level) / 2
    low = np.quantile(replicates, tail, axis=0) if n_boot else np.full(len(names), np.nan)
    high = np.quantile(replicates, 1 - tail, axis=0) if n_boot else np.full(len(names), np.nan)
    se = replicates.std(axis=0, ddof=1) if n_boot > 1 else np.full(len(names), np.nan)
    scale = pd.DataFrame(
        {
            "condition": names,
            "estimate": estimate,
            "se": se,
            "ci_low": low,
            "ci_high": high,
            "wins": wins.sum(axis=1).astype(np.int64),
            "comparisons": (wins.sum(axis=1) + wins.sum(axis=0)).astype(np.int64),
        }
    )
    return ScaleResult(
        model=model,
        unit="JOD" if model == "thurstone" else "logit",
        anchor=anchor,
        alpha=use_alpha,
        strongly_connected=connected,
        n_boot=n_boot,
        scale=scale,
        significance=significance_matrix(names, estimate, replicates, level),
        replicates=replicates,
        prior=prior,
    )


def split_half_reliability(
    responses: pd.DataFrame, model: str = "thurstone", n_splits: int = 20, seed: int = 0
) -> pd.DataFrame:
    """Correlate scales fitted to random halves of the participants; Spearman–Brown.

    Returns one row: n_splits, mean Pearson r between halves, Spearman–Brown corrected
    reliability 2r / (1 + r) (NaN when r is -1 or undefined).
    """
    names = condition_names(responses)
    participants, tensor = participant_win_tensor(responses, names)
    rng = np.random.default_rng(seed)
    alpha = _default_alpha(
        model, "gaussian" if model == "thurstone" else "none", win_matrix(responses, names)
    )
    rs = []
    for _ in range(n_splits):
        order = rng.permutation(len(participants))
        half = len(order) // 2
        fits = []
        for part in (order[:half], order[half:]):
            wins = tensor[part].sum(axis=0)
            a = alpha if alpha > 0 or strongly_connected(wins) else AUTO_ALPHA
            fits.append(fit_scale(wins, model, a))
        if np.std(fits[0]) > 0 and np.std(fits[1]) > 0:
            rs.append(np.corrcoef(fits[0], fits[1])[0, 1])
    r = float(np.mean(rs)) if rs else np.nan
    return pd.DataFrame(
        [
            {
                "model": model,
                "n_splits": len(rs),
                "half_correlation": r,
                # undefined at r = -1 (two halves that always disagree, e.g. 2 conditions)
                "spearman_brown": 2 * r / (1 + r) if np.isfinite(r) and r > -1 else np.nan,
            }
        ]
    )
