"""pwcmp-compatible Thurstone Case V scaling: the model of pwcmp's ``pw_scale``.

pwcmp (Perez-Ortiz & Mantiuk 2017, https://github.com/mantiuk/pwcmp) scales a count
matrix ``D[i, j]`` (times condition i was chosen over j) to JOD units by maximising

    sum_a [ log L_a + log(prior_a + 0.1) ] - 0.01 * mean(q)^2

over the quality scores q (one per condition). The sums run over the ordered pairs
a = (i, j) compared at least once (both (i, j) and (j, i) appear, so every pair counts
twice, as in pwcmp):

* likelihood: L_a = P_a^D[i,j] * (1 - P_a)^D[j,i] with P_a = Phi((q_i - q_j) / 1.4826),
  Thurstone Case V with sigma chosen so that 1 JOD = 75 % preference;
* prior ("gaussian" in pwcmp, ``prior="pwcmp"`` here): a data-driven prior on each
  pair's distance, the normalised sum of the probabilities of observing the other pairs'
  outcomes at this pair's distance,

      prior_a = sum_b  B_b(P_a) / sum_c B_b(P_c),   B_b(P) = P^k_b * (1 - P)^(n_b - k_b),

  with n_b = D[i,j] + D[j,i] comparisons of pair b and k_b = D[i,j] wins, except that a
  unanimous pair (all n_b answers one way) is shifted one vote towards the middle
  (k_b = n_b - 1, or 1 for the side that never won). A pair's distance is likely when it
  explains the other pairs' outcomes too, so a unanimous pair cannot run off to infinity
  (where maximum likelihood would put it) while other pairs give finite distances, and
  non-unanimous pairs barely move. (With a single compared pair there is nothing to
  compare against and the prior does not bound it; neither does pwcmp's.);
* anchoring: the penalty 0.01 * mean(q)^2 fixes the free offset, so the scores have mean
  zero ("mean0", pwcmp's default). "fix0" gives the same scores shifted so that the
  first condition is 0 (likelihood and prior depend only on differences).

Conditions in different connected components of the comparison graph (pairs compared
at least once) cannot be placed relative to each other; pwcmp links the best condition of
every component (by the ISO 20462 score) to the best of every other with one vote each
way, i.e. declares them equal, and warns. We do the same.

This is our own implementation of that model (pwcmp minimises with MATLAB's
``fminunc``; we use scipy's BFGS with the analytic gradient, in log space). On pwcmp's
ex3 example data it reproduces pwcmp's own output to < 0.001 JOD per scene (see
docs/analysis.md and tests/test_analysis_pwcmp.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import optimize, special
from scipy.sparse.csgraph import connected_components

from analysis.scaling import (
    MIN_IMAGES,
    CellCounts,
    ScaleResult,
    ScaleVariance,
    _bootstrap_counts,
    cell_counts,
    condition_names,
    scale_result,
    win_matrix,
)
from analysis.simulation import JOD_SIGMA

PRIOR_OFFSET = 0.1  # pwcmp: log(prior + 0.1), so a pair the prior rules out costs log(0.1)
MEAN0_WEIGHT = 0.01  # pwcmp: penalty 0.01 * mean(q)^2 that anchors the mean at zero
PRIORS = ("pwcmp", "none")
ANCHORINGS = ("mean0", "fix0")
PRIOR_DESCRIPTION = {
    "pwcmp": (
        "pwcmp's distance prior (pw_scale's default 'gaussian': per compared pair, the "
        "normalised sum of binomial likelihoods of every pair's outcome at this pair's "
        "distance, unanimous pairs shifted one vote; term log(prior + 0.1))"
    ),
    "none": "no prior (maximum likelihood; pw_scale's 'none')",
}


class DisconnectedComparisonsWarning(UserWarning):
    """The comparison graph has several components; their best conditions were tied."""


def _check_counts(wins: np.ndarray) -> np.ndarray:
    counts = np.asarray(wins, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"wins must be a square C x C matrix, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0) or np.any(counts != np.floor(counts)):
        raise ValueError("wins must hold non-negative whole counts (as pwcmp requires)")
    return counts


def iso20462_scores(wins: np.ndarray) -> np.ndarray:
    """pwcmp's quick score per condition (ISO 20462 arcsine transform), used only to pick
    each component's best condition. Shape (C,); higher = better."""
    total = wins + wins.T
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(total > 0, wins / np.where(total > 0, total, 1.0), 0.5)
    # rate[i, j] = share of i over j; condition j gains when the others lose against it
    return np.sum(-(12 / np.pi * np.arcsin(np.sqrt(rate)) - 3) / 2, axis=0)


def link_components(wins: np.ndarray) -> tuple[np.ndarray, int]:
    """(counts with the best condition of every connected component tied to the best of
    every other by one vote each way, number of components). As pwcmp's pw_scale."""
    counts = np.array(wins, dtype=float)
    n_comp, labels = connected_components((counts + counts.T) > 0, directed=False)
    if n_comp > 1:
        score = iso20462_scores(counts)
        best = []
        for comp in range(n_comp):
            members = np.flatnonzero(labels == comp)
            best.append(int(members[np.argmax(score[members])]))  # first maximum
        for a in range(len(best)):
            for b in range(a + 1, len(best)):
                counts[best[a], best[b]] = 1.0
                counts[best[b], best[a]] = 1.0
    return counts, n_comp


class _Problem:
    """The pwcmp negative log posterior as a function of q (C scores), with gradient."""

    def __init__(self, counts: np.ndarray, unanimous: np.ndarray, prior: str):
        total = counts + counts.T
        self.size = counts.shape[0]
        self.rows, self.cols = np.nonzero(total > 0)  # ordered compared pairs (i, j)
        self.won = counts[self.rows, self.cols]  # D[i, j]
        self.lost = counts[self.cols, self.rows]  # D[j, i]
        self.n = total[self.rows, self.cols]
        k = self.won.copy()
        ua = unanimous[self.rows, self.cols]
        k[ua & (k == 0)] = 1.0  # the side that never won gets one vote
        k[ua & (self.won > 0)] -= 1.0  # ... taken from the side that always won
        self.k = k
        self.prior = prior

    def __call__(self, q: np.ndarray) -> tuple[float, np.ndarray]:
        d = q[self.rows] - q[self.cols]
        x = d / JOD_SIGMA
        log_p, log_q = special.log_ndtr(x), special.log_ndtr(-x)  # log P, log(1 - P)
        log_pdf = -0.5 * x**2 - 0.5 * np.log(2 * np.pi)
        g1 = np.exp(log_pdf - log_p) / JOD_SIGMA  # d log P / dd
        g0 = -np.exp(log_pdf - log_q) / JOD_SIGMA  # d log(1 - P) / dd
        value = -np.sum(self.won * log_p + self.lost * log_q)
        grad_d = -(self.won * g1 + self.lost * g0)
        if self.prior == "pwcmp":
            # log B_b(P_a), rows a (the pair whose distance is judged), columns b (data)
            log_aux = np.outer(log_p, self.k) + np.outer(log_q, self.n - self.k)
            weight = np.exp(log_aux - special.logsumexp(log_aux, axis=0, keepdims=True))
            prior_a = weight.sum(axis=1)
            value -= np.sum(np.log(prior_a + PRIOR_OFFSET))
            h = np.outer(g1, self.k) + np.outer(g0, self.n - self.k)  # d log B_b(P_a) / dd_a
            r = 1.0 / (prior_a + PRIOR_OFFSET)
            u = r @ weight  # per b: sum_a r_a w_ab
            grad_d += np.sum(weight * h * (u[None, :] - r[:, None]), axis=1)
        mean = q.mean()
        value += MEAN0_WEIGHT * mean**2
        grad = np.bincount(self.rows, grad_d, self.size) - np.bincount(self.cols, grad_d, self.size)
        grad += 2 * MEAN0_WEIGHT * mean / self.size
        return float(value), grad


def pw_scale(
    wins: np.ndarray,
    prior: str = "pwcmp",
    anchoring: str = "mean0",
    *,
    gtol: float = 1e-9,
) -> np.ndarray:
    """JOD scores as pwcmp's ``pw_scale(D, {'prior', ..., 'regularization', ...})``.

    ``wins``: C x C whole counts, ``wins[i, j]`` = times condition i was preferred over
    condition j (pwcmp's D). ``prior``: "pwcmp" (pw_scale's default 'gaussian' distance
    prior, see the module docstring) or "none" (maximum likelihood; infinite or
    arbitrary for unanimous pairs, like pwcmp's). ``anchoring``: "mean0" (pwcmp's
    default: mean zero) or "fix0" (first condition at 0).

    Returns shape (C,) scores in JOD (a difference of 1 = 75 % of answers preferring the
    higher one). Warns (DisconnectedComparisonsWarning) when the comparison graph falls
    apart; its components are then tied at their best conditions, as pwcmp does.
    """
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
    if anchoring not in ANCHORINGS:
        raise ValueError(f"anchoring must be one of {', '.join(ANCHORINGS)}, got {anchoring!r}")
    counts = _check_counts(wins)
    size = counts.shape[0]
    if size < 2:
        return np.zeros(size)
    both = (counts > 0) & (counts.T > 0)
    unanimous = ((counts + counts.T) > 0) & ~both  # found before components are linked
    counts, n_comp = link_components(counts)
    if n_comp > 1:
        warnings.warn(
            f"There are {n_comp} disconnected components in the comparison graph; their "
            "best conditions were tied, so scores across components are not meaningful",
            DisconnectedComparisonsWarning,
            stacklevel=2,
        )
    problem = _Problem(counts, unanimous, prior)
    fit = optimize.minimize(
        problem, np.zeros(size), jac=True, method="BFGS", options={"gtol": gtol, "maxiter": 2000}
    )
    q = fit.x
    if not np.all(np.isfinite(q)):
        raise ValueError("pwcmp scaling did not converge to finite scores")
    q = q - q.mean()  # the exact optimum of the mean0 penalty (BFGS leaves ~1e-10)
    return q - q[0] if anchoring == "fix0" else q


def pw_scale_groups(
    responses: pd.DataFrame,
    by: str | None = "image_id",
    prior: str = "pwcmp",
    anchoring: str = "mean0",
) -> pd.DataFrame:
    """pwcmp JOD scales of tidy responses (contract-2 columns: condition_left,
    condition_right, chosen_condition; pwcmp's scene is ``image_id``), one per value of
    ``by`` and pooled over all rows as group "all" (``by=None``: only "all").

    Each group is scaled on the conditions compared in it. Returns a tidy frame: group,
    condition, jod, comparisons (of that condition in the group), components (connected
    components of the group's comparison graph; above 1, pwcmp's tie of the components'
    best conditions was used and scores across components mean little; no warning is
    given here), prior, anchoring.
    """
    groups: list[tuple[str, pd.DataFrame]] = [("all", responses)]
    if by is not None:
        groups += [(str(key), part) for key, part in responses.groupby(by, sort=True)]
    rows = []
    for group, part in groups:
        names = condition_names(part)
        wins = win_matrix(part, names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DisconnectedComparisonsWarning)
            jod = pw_scale(wins, prior, anchoring)
        n_comp = connected_components((wins + wins.T) > 0, directed=False)[0]
        total = wins.sum(axis=1) + wins.sum(axis=0)
        for name, value, n in zip(names, jod, total, strict=True):
            rows.append(
                {
                    "group": group,
                    "condition": name,
                    "jod": float(value),
                    "comparisons": int(n),
                    "components": int(n_comp),
                    "prior": prior,
                    "anchoring": anchoring,
                }
            )
    return pd.DataFrame(rows)


def pwcmp_variance(cells: CellCounts, prior: str, n_boot: int, seed: int
                   ) -> tuple[ScaleVariance, dict[str, np.ndarray]]:
    """The two-way clustered variance of ``scaling.scale_variance`` for the pwcmp model:
    one-way cluster bootstraps over participants, images and (participant, image) cells,
    each replicate fitted by :func:`pw_scale`, combined as participants + images - cells
    (participants only with fewer than ``MIN_IMAGES`` images)."""
    two_way = len(cells.images) >= MIN_IMAGES
    levels = ("participant", "image", "cell") if two_way else ("participant",)
    size = len(cells.names)
    rng = np.random.default_rng(seed)
    components, replicates = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DisconnectedComparisonsWarning)
        for level in levels:
            matrix = cells.by(level)
            groups = matrix.shape[0]
            wins = _bootstrap_counts(matrix, n_boot, rng).reshape(n_boot, size, size)
            fits = np.array([pw_scale(w, prior) for w in wins])
            fits -= fits.mean(axis=1, keepdims=True)
            cov = np.cov(fits, rowvar=False) if n_boot > 1 else np.full((size, size), np.nan)
            components[level] = cov * groups / (groups - 1) if groups > 1 else cov * np.nan
            replicates[level] = fits
    clusters = {"participant": len(cells.participants), "image": len(cells.images),
                "cell": cells.counts.shape[0]}
    if two_way:
        method = f"two-way cluster bootstrap (participants + images - cells, {n_boot} each), t"
    else:
        method = (f"participant cluster bootstrap ({n_boot}), t; fewer than {MIN_IMAGES} "
                  "images: image variance not included")
    variance = ScaleVariance(method=method, combine="two-way" if two_way else "participants",
                             components=components,
                             clusters={level: clusters[level] for level in levels})
    return variance, replicates


def scale_conditions_pwcmp(
    responses: pd.DataFrame,
    *,
    anchor: str | None = None,
    n_boot: int = 500,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
    prior: str = "pwcmp",
) -> ScaleResult:
    """``scaling.scale_conditions(responses, "thurstone", prior="pwcmp")``: the pwcmp
    model (pw_scale, mean zero or ``anchor`` at 0) with the same clustered intervals and
    significance matrix as our own Thurstone scale (:func:`pwcmp_variance`). ``progress``
    is accepted for compatibility."""
    del progress
    names = condition_names(responses)
    if len(names) < 2:
        raise ValueError("scaling needs at least two conditions")
    cells = cell_counts(responses, names)
    wins = cells.total()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DisconnectedComparisonsWarning)
        fitted = pw_scale(wins, prior)
    fitted = fitted - fitted.mean()
    variance, replicates = (pwcmp_variance(cells, prior, n_boot, seed) if n_boot > 1
                            else (None, {}))
    return scale_result(names, fitted, wins, model="thurstone", anchor=anchor, alpha=0.0,
                        n_boot=n_boot, level=level, variance=variance, replicates=replicates,
                        prior=prior)
