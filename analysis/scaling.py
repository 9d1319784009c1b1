"""Scaling all conditions on one axis: Bradley–Terry and Thurstone Case V (JOD).

Bradley–Terry: P(i over j) = logistic(b_i - b_j), b in logits. Thurstone Case V as pwcmp
defines it: P(i over j) = Phi((q_i - q_j) / 1.4826), q in JOD (just-objectionable
differences; 1 JOD = 75 % preference). Both are fitted by damped Newton on a count matrix
``wins[i, j]`` (times i was chosen over j). Maximum likelihood is finite only when the
win graph is strongly connected; otherwise (or when asked) a Gaussian prior (ridge
penalty ``alpha / 2 * sum(s**2)``, the MAP under N(0, 1/alpha) like choix's ``alpha``)
keeps the estimates finite.

Intervals account for both random factors of a 2AFC study, participants and images
(crossed: every participant judges many images, every image is judged by many
participants). Three one-way cluster bootstraps (resampling participants, images, and
(participant, image) cells; all replicates fitted at once by ``fit_scale_batch``) give
variances V_P, V_I, V_C; the two-way variance is V_P + V_I - V_C (Cameron, Gelbach &
Miller 2011; Owen 2007: resampling participants and images together, the "pigeonhole"
bootstrap, counts the vote-level variance up to three times), never below V_C, with
Student t intervals (Satterthwaite degrees of freedom). The significance matrix (Holm)
uses the same variance. ``docs/analysis.md`` gives the argument and the calibration
(``bench/bench_inference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sparse
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


def _codes(values: pd.Series, names: list[str]) -> np.ndarray:
    """Index in ``names`` of each value (compared as strings); -1 where absent."""
    codes, uniques = pd.factorize(values)
    lookup = pd.Index(names).get_indexer(pd.Index(uniques).astype(str))
    return np.where(codes >= 0, lookup[codes], -1).astype(np.int64)


def _winner_loser(responses: pd.DataFrame, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Index in ``names`` of each row's chosen and not-chosen condition."""
    left = _codes(responses["condition_left"], names)
    right = _codes(responses["condition_right"], names)
    if (left < 0).any() or (right < 0).any():
        raise ValueError("responses compare a condition that is not in names")
    chosen_left = _codes(responses["chosen_condition"], names) == left
    return np.where(chosen_left, left, right), np.where(chosen_left, right, left)


def win_matrix(responses: pd.DataFrame, names: list[str] | None = None) -> np.ndarray:
    """K x K counts: ``wins[i, j]`` = trials where names[i] was chosen over names[j]."""
    names = names or condition_names(responses)
    winner, loser = _winner_loser(responses, names)
    size = len(names)
    return (
        np.bincount(winner * size + loser, minlength=size * size).reshape(size, size).astype(float)
    )


def participant_win_tensor(
    responses: pd.DataFrame, names: list[str]
) -> tuple[list[str], np.ndarray]:
    """(participants, P x K x K counts per participant) for observer bootstraps."""
    codes, participants = pd.factorize(responses["participant"].astype(str), sort=True)
    winner, loser = _winner_loser(responses, names)
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


def _objective_batch(s, wins, alpha, model):
    """``_objective`` for a batch: s (B, K), wins (B, K, K), alpha (B,)."""
    size = s.shape[1]
    diff = s[:, :, None] - s[:, None, :]
    logp, dlogp, curv = _link_terms(diff, model)
    value = -np.sum(wins * logp, axis=(1, 2)) + 0.5 * alpha * np.sum(s**2, axis=1)
    score = wins * dlogp
    grad = -(score.sum(axis=2) - score.sum(axis=1)) + alpha[:, None] * s
    weight = wins * curv
    weight = weight + weight.transpose(0, 2, 1)
    hess = -weight
    diag = np.arange(size)
    hess[:, diag, diag] = weight.sum(axis=2) - weight[:, diag, diag] + alpha[:, None]
    return value, grad, hess


def fit_scale_batch(
    wins: np.ndarray,
    model: str = "bt",
    alpha: float | np.ndarray = 0.0,
    *,
    initial: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> np.ndarray:
    """``fit_scale`` for a stack of count matrices ``wins`` (B x K x K) at once (one damped
    Newton iteration for all of them, vectorised; used for bootstrap replicates).

    ``alpha``: one ridge strength or one per matrix (0 needs a strongly connected graph:
    the caller checks, see ``_replicate_alpha``). ``initial``: K or B x K starting values.
    Returns B x K scale values, mean zero where alpha is 0 (as ``fit_scale``).
    """
    if model not in ("bt", "thurstone"):
        raise ValueError(f"model must be 'bt' or 'thurstone', got {model!r}")
    wins = np.asarray(wins, dtype=float)
    count, size, _ = wins.shape
    alpha = np.broadcast_to(np.asarray(alpha, dtype=float), (count,)).copy()
    s = np.zeros((count, size))
    if initial is not None:
        s[:] = np.asarray(initial, dtype=float)
    centre = np.where(alpha == 0, 1.0 / size, 0.0)[:, None, None] * np.ones((1, size, size))
    value, grad, hess = _objective_batch(s, wins, alpha, model)
    active = np.ones(count, dtype=bool)
    for _ in range(max_iter):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        step = np.linalg.solve(hess[rows] + centre[rows], -grad[rows][..., None])[..., 0]
        slope = np.sum(grad[rows] * step, axis=1)
        scale = np.ones(rows.size)
        pending = np.ones(rows.size, dtype=bool)
        while pending.any():
            p = np.flatnonzero(pending)
            candidate = s[rows[p]] + scale[p, None] * step[p]
            new_value, new_grad, new_hess = _objective_batch(
                candidate, wins[rows[p]], alpha[rows[p]], model
            )
            ok = (new_value <= value[rows[p]] + 1e-4 * scale[p] * slope[p]) | (scale[p] < 1e-8)
            done = rows[p[ok]]
            s[done], value[done] = candidate[ok], new_value[ok]
            grad[done], hess[done] = new_grad[ok], new_hess[ok]
            pending[p[ok]] = False
            scale[p[~ok]] *= 0.5
        active[rows] = np.max(np.abs(scale[:, None] * step), axis=1) >= tol
    return np.where((alpha == 0)[:, None], s - s.mean(axis=1, keepdims=True), s)


def anchor_scale(values: np.ndarray, names: list[str], anchor: str | None) -> np.ndarray:
    """Mean-zero values (anchor None) or values shifted so ``anchor`` is 0 (any axis=-1)."""
    values = np.asarray(values, dtype=float)
    if anchor is None:
        return values - values.mean(axis=-1, keepdims=True)
    if anchor not in names:
        raise ValueError(f"anchor {anchor!r} is not a condition ({', '.join(names)})")
    return values - values[..., [names.index(anchor)]]


def anchor_contrasts(names: list[str], anchor: str | None) -> np.ndarray:
    """K x K matrix C with C @ s = ``anchor_scale(s, names, anchor)`` (row k: condition k
    minus the mean, or minus the anchor)."""
    size = len(names)
    if anchor is None:
        return np.eye(size) - 1.0 / size
    if anchor not in names:
        raise ValueError(f"anchor {anchor!r} is not a condition ({', '.join(names)})")
    out = np.eye(size)
    out[:, names.index(anchor)] -= 1.0
    return out


def pair_contrasts(size: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """All pairs i < j and the matrix whose rows give s_i - s_j."""
    pairs = [(i, j) for i in range(size) for j in range(i + 1, size)]
    out = np.zeros((len(pairs), size))
    for row, (i, j) in enumerate(pairs):
        out[row, i], out[row, j] = 1.0, -1.0
    return pairs, out


# ---------------------------------------------------------------------------------------
# Clustered variance of a scale: participants and images are crossed random factors.
# ---------------------------------------------------------------------------------------

MIN_IMAGES = 5  # fewer images than this: the image variance is not estimable (one-way)

INTERVALS = ("two-way", "two-way-sandwich", "participants")


@dataclass
class CellCounts:
    """Win counts per (participant, image) cell: ``counts`` (cells x K*K, sparse;
    column winner * K + loser), the participant and image code of each cell, and the
    participant and image labels."""

    names: list[str]
    participants: list[str]
    images: list[str]
    cell_participant: np.ndarray
    cell_image: np.ndarray
    counts: sparse.csr_matrix

    def by(self, level: str) -> sparse.csr_matrix:
        """Counts summed per cluster of ``level`` ("participant", "image" or "cell")."""
        if level == "cell":
            return self.counts
        codes = self.cell_participant if level == "participant" else self.cell_image
        groups = len(self.participants) if level == "participant" else len(self.images)
        member = sparse.csr_matrix(
            (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(groups, len(codes))
        )
        return (member @ self.counts).tocsr()

    def total(self) -> np.ndarray:
        size = len(self.names)
        return np.asarray(self.counts.sum(axis=0)).reshape(size, size)


def cell_counts(responses: pd.DataFrame, names: list[str]) -> CellCounts:
    """Aggregate the votes of ``responses`` per (participant, image) cell; a missing
    ``image_id`` column counts as one image."""
    size = len(names)
    winner, loser = _winner_loser(responses, names)
    p_codes, participants = pd.factorize(responses["participant"].astype(str), sort=True)
    if "image_id" in responses.columns:
        i_codes, images = pd.factorize(responses["image_id"].astype(str), sort=True)
    else:
        i_codes, images = np.zeros(len(responses), dtype=np.int64), pd.Index([""])
    cell_key = p_codes.astype(np.int64) * len(images) + i_codes
    cell_codes, cell_keys = pd.factorize(cell_key, sort=True)
    cell_keys = np.asarray(cell_keys, dtype=np.int64)
    flat = cell_codes.astype(np.int64) * size * size + winner * size + loser
    keys, counts = np.unique(flat, return_counts=True)
    matrix = sparse.csr_matrix(
        (counts.astype(float), (keys // (size * size), keys % (size * size))),
        shape=(len(cell_keys), size * size),
    )
    return CellCounts(
        names=list(names),
        participants=list(participants),
        images=list(images),
        cell_participant=cell_keys // len(images),
        cell_image=cell_keys % len(images),
        counts=matrix,
    )


def _replicate_alpha(wins: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge per replicate: ``alpha``, or AUTO_ALPHA where alpha is 0 and a replicate's
    win graph is not strongly connected."""
    out = np.full(wins.shape[0], float(alpha))
    if alpha > 0:
        return out
    size = wins.shape[1]
    off = ~np.eye(size, dtype=bool)
    complete = (wins[:, off] > 0).all(axis=1)  # every pair won both ways: connected
    for b in np.flatnonzero(~complete):
        if not strongly_connected(wins[b]):
            out[b] = AUTO_ALPHA
    return out


def _bootstrap_counts(matrix: sparse.csr_matrix, n_boot: int, rng) -> np.ndarray:
    """n_boot x K*K win counts of resamples (with replacement) of the rows (clusters) of
    ``matrix``. Clusters with identical counts are pooled first (a resample's draws of
    a pooled group are multinomial with its share), which is exact and makes resampling
    a million near-empty cells cheap."""
    groups = matrix.shape[0]
    # A row's key: its counts times fixed random weights (distinct count rows collide
    # with probability ~1e-16).
    probe = 1.0 + np.random.default_rng(12345).random(matrix.shape[1])
    keys = np.asarray(matrix @ probe).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    share = np.bincount(inverse.ravel(), minlength=len(first)) / groups
    unique = matrix[first]
    out = np.empty((n_boot, matrix.shape[1]))
    chunk = max(1, 2_000_000 // max(len(first), 1))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        draws = rng.multinomial(groups, share, size=stop - start).astype(float)
        out[start:stop] = np.asarray((unique.T @ draws.T).T)
    return out


@dataclass
class ScaleVariance:
    """Covariance of a scale's values (K x K, mean-zero parametrisation) from clustering
    by participants, by images and by (participant, image) cells, and how to combine
    them.

    ``components``: level -> covariance, each with the small-sample factor G / (G - 1)
    (G = clusters of that level, ``clusters``). ``combine``: "two-way" (Cameron, Gelbach
    & Miller 2011; Owen 2007): V = V_participant + V_image - V_cell, because each one-way
    variance contains the vote-level (residual) variance once and the sum would count it
    twice; per contrast it is floored at V_cell (the variance is never below the
    residual part). Degrees of freedom: Satterthwaite, each component's variance taken as
    that of a variance estimated from G clusters (2 v^2 / (G - 1)). "participants": V =
    V_participant with G - 1 degrees of freedom.
    """

    method: str
    combine: str
    components: dict[str, np.ndarray]
    clusters: dict[str, int]

    def contrast(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Variance and degrees of freedom of each contrast ``rows @ s`` (m x K)."""
        rows = np.atleast_2d(np.asarray(rows, dtype=float))
        parts = {
            level: np.einsum("mk,kl,ml->m", rows, cov, rows)
            for level, cov in self.components.items()
        }
        if self.combine == "participants":
            var = parts["participant"]
            df = np.full(len(rows), float(self.clusters["participant"] - 1))
            return var, df
        var = parts["participant"] + parts["image"] - parts["cell"]
        floored = var <= parts["cell"]
        var = np.where(floored, parts["cell"], var)
        spread = sum(parts[level] ** 2 / max(self.clusters[level] - 1, 1) for level in parts)
        with np.errstate(invalid="ignore", divide="ignore"):
            df = np.where(spread > 0, var**2 / spread, np.inf)
        df = np.where(floored, self.clusters["cell"] - 1, df)
        df = np.minimum(df, sum(self.clusters[level] - 1 for level in parts))
        return var, df

    def covariance(self) -> np.ndarray:
        """The combined K x K matrix (not floored; may be indefinite)."""
        if self.combine == "participants":
            return self.components["participant"]
        c = self.components
        return c["participant"] + c["image"] - c["cell"]


def _component_bootstrap(cells, level, model, alpha, n_boot, rng, start):
    matrix = cells.by(level)
    groups = matrix.shape[0]
    size = len(cells.names)
    wins = _bootstrap_counts(matrix, n_boot, rng).reshape(n_boot, size, size)
    fits = fit_scale_batch(wins, model, _replicate_alpha(wins, alpha), initial=start)
    fits = fits - fits.mean(axis=1, keepdims=True)
    cov = np.cov(fits, rowvar=False) if n_boot > 1 else np.full((size, size), np.nan)
    return fits, cov * groups / (groups - 1) if groups > 1 else cov * np.nan


def _component_sandwich(cells, level, model, alpha, estimate):
    """H^-1 (sum_g U_g U_g^T) H^-1 * G / (G - 1): U_g the score of cluster g."""
    matrix = cells.by(level)
    groups = matrix.shape[0]
    size = len(cells.names)
    diff = estimate[:, None] - estimate[None, :]
    _, dlogp, _ = _link_terms(diff, model)
    direction = np.zeros((size * size, size))
    for w in range(size):
        for lose in range(size):
            if w != lose:
                direction[w * size + lose, w] = dlogp[w, lose]
                direction[w * size + lose, lose] = -dlogp[w, lose]
    scores = np.asarray(matrix @ direction)
    meat = scores.T @ scores
    _, _, hess = _objective(estimate, cells.total(), alpha, model)
    if alpha == 0:
        hess = hess + np.ones((size, size)) / size
    bread = np.linalg.inv(hess)
    centre = np.eye(size) - 1.0 / size
    cov = centre @ bread @ meat @ bread @ centre
    return cov * groups / (groups - 1) if groups > 1 else cov * np.nan


def scale_variance(
    cells: CellCounts,
    estimate: np.ndarray,
    model: str,
    alpha: float,
    *,
    interval: str = "two-way",
    n_boot: int = 500,
    seed: int = 0,
) -> tuple[ScaleVariance, dict[str, np.ndarray]]:
    """Variance of the fitted (mean-zero) ``estimate`` of ``cells``; see ``ScaleVariance``.

    ``interval``: "two-way" (one-way cluster bootstraps over participants, images and
    cells, ``n_boot`` replicates each, combined two-way), "two-way-sandwich" (the same
    combination of analytic cluster-robust sandwich variances; no resampling),
    "participants" (participant bootstrap only; ignores images). With fewer than
    ``MIN_IMAGES`` images the two-way methods fall back to participants only.
    Returns the variance and the bootstrap replicates per level (mean zero).
    """
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
    two_way = interval != "participants" and len(cells.images) >= MIN_IMAGES
    levels = ("participant", "image", "cell") if two_way else ("participant",)
    clusters = {
        "participant": len(cells.participants),
        "image": len(cells.images),
        "cell": cells.counts.shape[0],
    }
    rng = np.random.default_rng(seed)
    components, replicates = {}, {}
    sandwich = interval == "two-way-sandwich"
    for level in levels:
        if sandwich:
            components[level] = _component_sandwich(cells, level, model, alpha, estimate)
        else:
            replicates[level], components[level] = _component_bootstrap(
                cells, level, model, alpha, n_boot, rng, estimate
            )
    if two_way:
        method = (
            "two-way cluster-robust sandwich (participants + images - cells), t"
            if sandwich
            else f"two-way cluster bootstrap (participants + images - cells, {n_boot} each), t"
        )
    else:
        why = "" if interval == "participants" else f"; fewer than {MIN_IMAGES} images"
        kind = "sandwich" if sandwich else f"bootstrap ({n_boot})"
        method = f"participant cluster {kind}, t{why}: image variance not included"
    variance = ScaleVariance(
        method=method,
        combine="two-way" if two_way else "participants",
        components=components,
        clusters={level: clusters[level] for level in levels},
    )
    return variance, replicates


@dataclass
class ScaleResult:
    """A fitted scale: tidy ``scale`` (condition, estimate, se, df, ci_low, ci_high, unit,
    interval, wins, comparisons), ``significance`` (pairwise differences with t tests,
    Holm), the options used (``prior``: which prior), the clustered ``variance`` and the
    bootstrap replicates per clustering level (n_boot x K, mean zero)."""

    model: str
    unit: str
    anchor: str | None
    alpha: float
    strongly_connected: bool
    n_boot: int
    scale: pd.DataFrame
    significance: pd.DataFrame
    variance: ScaleVariance | None = field(default=None, repr=False)
    replicates: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    prior: str | None = None  # "gaussian" (ours), "pwcmp" (analysis.pwcmp) or "none"


def _default_alpha(model: str, prior: str, wins: np.ndarray) -> float:
    if model == "thurstone" and prior == "gaussian":
        return 1.0 / THURSTONE_PRIOR_SD**2
    if prior == "none":
        return 0.0 if strongly_connected(wins) else AUTO_ALPHA
    raise ValueError(f"prior must be 'gaussian' or 'none', got {prior!r}")


def t_interval(estimate, var, df, level):
    """Student-t interval and two-sided test of ``estimate`` against 0 with variance
    ``var`` and ``df`` degrees of freedom (arrays). Returns (se, low, high, t, p)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.where(var > 0, np.sqrt(np.where(var > 0, var, 0.0)), np.where(var == 0, 0, np.nan))
        crit = stats.t.isf((1 - level) / 2, df)
        stat = np.where(se > 0, estimate / se, np.nan)
        p = 2 * stats.t.sf(np.abs(stat), df)
    return se, estimate - crit * se, estimate + crit * se, stat, p


def significance_matrix(
    names: list[str],
    estimate: np.ndarray,
    replicates: np.ndarray | None = None,
    level: float = 0.95,
    *,
    variance: ScaleVariance | None = None,
) -> pd.DataFrame:
    """Pairwise differences a - b (a before b in ``names``): se, df, interval at
    ``level``, t statistic, two-sided p-value, Holm over all pairs, ``significant`` (Holm
    p < 1 - level).

    With ``variance`` (from ``scale_variance``): Student t with its degrees of freedom.
    Else the covariance of ``replicates`` (n x K bootstrap values) and the normal (the
    old observer-bootstrap z test; df inf).
    """
    size = len(names)
    pairs, rows = pair_contrasts(size)
    diff = rows @ np.asarray(estimate, dtype=float)
    if variance is not None:
        var, df = variance.contrast(rows)
        method = variance.method
    else:
        reps = np.asarray(replicates, dtype=float)
        cov = np.cov(reps, rowvar=False) if reps.shape[0] > 1 else np.full((size, size), np.nan)
        var = np.einsum("mk,kl,ml->m", rows, cov, rows)
        df = np.full(len(pairs), np.inf)
        method = f"bootstrap ({reps.shape[0]}) covariance, normal"
    se, low, high, stat, p = t_interval(diff, var, df, level)
    table = pd.DataFrame(
        {
            "condition_a": [names[i] for i, _ in pairs],
            "condition_b": [names[j] for _, j in pairs],
            "difference": diff,
            "se": se,
            "df": df,
            "ci_low": low,
            "ci_high": high,
            "t": stat,
            "p_value": p,
        }
    )
    if not table.empty:
        table["p_holm"] = holm_adjust(table["p_value"].to_numpy())
        table["significant"] = table["p_holm"] < (1 - level)
    table["interval"] = method
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
    interval: str = "two-way",
) -> ScaleResult:
    """Fit a Bradley–Terry ("bt", logits) or Thurstone Case V ("thurstone", JOD) scale to
    the rows of ``responses`` (use main trials of kept participants) with intervals at
    ``level`` that account for participants and images (``interval``, see
    ``scale_variance``; default "two-way": one-way cluster bootstraps combined as
    participants + images - cells, Student t with Satterthwaite degrees of freedom).

    ``prior``: "gaussian" (default for thurstone: N(0, 3^2) JOD per condition), "none"
    (default for bt: plain maximum likelihood, regularised with alpha=0.01 only when the
    win graph is not strongly connected) or "pwcmp". ``alpha`` overrides the ridge strength.
    ``anchor``: None for mean zero, or a condition fixed at 0 (its interval is [0, 0]).
    ``n_boot = 0`` skips the intervals (NaN). ``prior="pwcmp"`` (thurstone only): pwcmp's
    pw_scale model and prior instead of ours (``analysis.pwcmp``). ``progress`` is
    accepted for compatibility (the replicates are fitted all at once).
    """
    if prior == "pwcmp":
        if model != "thurstone":
            raise ValueError("prior='pwcmp' is a Thurstone (JOD) prior; use model='thurstone'")
        from analysis.pwcmp import scale_conditions_pwcmp

        return scale_conditions_pwcmp(
            responses, anchor=anchor, n_boot=n_boot, level=level, seed=seed, progress=progress
        )
    del progress
    names = condition_names(responses)
    if len(names) < 2:
        raise ValueError("scaling needs at least two conditions")
    prior = prior or ("gaussian" if model == "thurstone" else "none")
    cells = cell_counts(responses, names)
    wins = cells.total()
    use_alpha = _default_alpha(model, prior, wins) if alpha is None else float(alpha)
    fitted = fit_scale(wins, model, use_alpha)
    fitted = fitted - fitted.mean()
    if n_boot > 0 or interval == "two-way-sandwich":
        variance, replicates = scale_variance(
            cells, fitted, model, use_alpha, interval=interval, n_boot=n_boot, seed=seed
        )
    else:
        variance, replicates = None, {}
    return scale_result(names, fitted, wins, model=model, anchor=anchor, alpha=use_alpha,
                        n_boot=n_boot, level=level, variance=variance, replicates=replicates,
                        prior=prior)


def scale_result(
    names: list[str],
    fitted: np.ndarray,
    wins: np.ndarray,
    *,
    model: str,
    anchor: str | None,
    alpha: float,
    n_boot: int,
    level: float,
    variance: ScaleVariance | None,
    replicates: dict[str, np.ndarray],
    prior: str | None,
) -> ScaleResult:
    """The tidy scale and significance tables of a fitted (mean-zero) scale ``fitted``
    with its clustered ``variance`` (None: intervals not computed, NaN)."""
    contrasts = anchor_contrasts(names, anchor)
    estimate = contrasts @ fitted
    size = len(names)
    if variance is not None:
        var, df = variance.contrast(contrasts)
        se, low, high, _, _ = t_interval(estimate, var, df, level)
        method = variance.method
        significance = significance_matrix(names, fitted, level=level, variance=variance)
    else:
        se = low = high = df = np.full(size, np.nan)
        method = "not computed (n_boot = 0)"
        significance = significance_matrix(names, fitted, np.empty((0, size)), level)
    unit = "JOD" if model == "thurstone" else "logit"
    significance.insert(significance.columns.get_loc("se"), "unit", unit)
    scale = pd.DataFrame(
        {
            "condition": names,
            "estimate": estimate,
            "se": se,
            "df": df,
            "ci_low": low,
            "ci_high": high,
            "unit": unit,
            "interval": method,
            "wins": wins.sum(axis=1).astype(np.int64),
            "comparisons": (wins.sum(axis=1) + wins.sum(axis=0)).astype(np.int64),
        }
    )
    return ScaleResult(
        model=model,
        unit=unit,
        anchor=anchor,
        alpha=alpha,
        strongly_connected=strongly_connected(wins),
        n_boot=n_boot,
        scale=scale,
        significance=significance,
        variance=variance,
        replicates={
            level_: anchor_scale(reps, names, anchor) for level_, reps in replicates.items()
        },
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
