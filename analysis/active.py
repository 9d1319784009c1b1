"""Active pair selection for 2AFC studies: which condition pair to show next.

Pure functions over a count matrix ``wins[i, j]`` (times condition i was chosen over j,
n × n) and per-pair vote counts; no database, no web. Two selectors:

- **ours** (:func:`select_pairs`): a Thurstone Case V posterior in JOD (the MAP of
  ``analysis.scaling.fit_scale`` with the weak Gaussian prior ``THURSTONE_PRIOR_SD``,
  Laplace approximation: full covariance = inverse Hessian at the MAP), the expected
  information gain of one more vote on each pair about the whole scale in closed form
  (the mutual information between the vote and the scale under a probit likelihood;
  Houlsby et al. 2011, "BALD", exact up to their Gaussian approximation of the
  conditional entropy), floors (a pair with fewer than ``pair_floor`` votes + open leases
  goes first), caps (pairs with no free item are never chosen) and a *batch* chosen
  jointly with the open leases: each chosen or leased pair shrinks the covariance by its
  expected Fisher information before the next choice (the outcome is not needed for the
  covariance), so a batch of 100 concurrent fetches spreads over the informative pairs
  instead of piling onto one;
- **ASAP-approx** (:func:`asap_approx_batch`): our implementation of Mikhailiuk et al.
  (ICPR 2020), approximate variant: a TrueSkill posterior (independent Gaussians, unit
  comparison noise) fitted by expectation propagation over all votes, the expected
  information gain of a pair as the expected KL divergence of the two conditions'
  marginals after a one-comparison online (ADF) update, and the batch as the minimum
  spanning tree of the complete graph weighted 1 / gain (n - 1 pairs). The published
  "selective EIG" pruning is not implemented (every pair's gain is computed).

Units: scale values in JOD (1 JOD = 75 % preference; P(i over j) = Phi((q_i - q_j) /
1.4826)), gains in bits.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import special, stats
from scipy.sparse.csgraph import minimum_spanning_tree

from analysis.scaling import THURSTONE_PRIOR_SD, _objective, fit_scale
from analysis.simulation import JOD_SIGMA

# h(Phi(x)) ~= exp(-x^2 / (pi ln 2)) (binary entropy in bits; Houlsby et al. 2011, eq. 3)
_BALD_C2 = np.pi * np.log(2.0) / 2.0
Z95 = float(stats.norm.ppf(0.975))


@dataclass(frozen=True)
class Posterior:
    """A Gaussian posterior over the n condition scale values (JOD).

    ``mean`` (n,) MAP scale values; ``cov`` (n, n) covariance (JOD^2, Laplace);
    ``n_votes`` votes it was computed from.
    """

    mean: np.ndarray
    cov: np.ndarray
    n_votes: int

    def half_widths(self, level_z: float = Z95) -> np.ndarray:
        """Half-width (JOD) of each condition's interval on the mean-centred scale (the
        scale is defined up to a constant), ``level_z`` standard errors (default 95 %)."""
        size = len(self.mean)
        centre = np.eye(size) - 1.0 / size
        var = np.einsum("ij,jk,ik->i", centre, self.cov, centre)
        return level_z * np.sqrt(np.maximum(var, 0.0))

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "cov": self.cov.tolist(), "n_votes": self.n_votes}

    @classmethod
    def from_dict(cls, data: dict) -> Posterior:
        return cls(
            np.asarray(data["mean"], float), np.asarray(data["cov"], float), int(data["n_votes"])
        )


def thurstone_posterior(
    wins: np.ndarray, prior_sd: float = THURSTONE_PRIOR_SD, initial: np.ndarray | None = None
) -> Posterior:
    """Laplace approximation of the Thurstone Case V posterior given ``wins`` (n × n).

    Prior: independent N(0, ``prior_sd``^2) per condition (JOD). Finite for any counts,
    including none (then mean 0, covariance ``prior_sd``^2 I).
    """
    wins = np.asarray(wins, dtype=float)
    alpha = 1.0 / prior_sd**2
    mean = fit_scale(wins, "thurstone", alpha, initial=initial, tol=1e-8, max_iter=50)
    _, _, hess = _objective(mean, wins, alpha, "thurstone")
    cov = np.linalg.inv(hess)
    return Posterior(mean, (cov + cov.T) / 2.0, int(wins.sum()))


def all_pairs(size: int) -> np.ndarray:
    """The n(n-1)/2 pairs (i < j) as an int array (P, 2), in lexicographic order."""
    first, second = np.triu_indices(size, 1)
    return np.stack([first, second], axis=1)


def _difference_moments(mean, cov, pairs):
    i, j = pairs[:, 0], pairs[:, 1]
    mu = (mean[i] - mean[j]) / JOD_SIGMA
    var = (cov[i, i] + cov[j, j] - 2.0 * cov[i, j]) / JOD_SIGMA**2
    return mu, np.maximum(var, 0.0)


def information_gain(mean: np.ndarray, cov: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Expected information gain (bits) about the scale of one vote on each pair (P,).

    Mutual information between the vote y and the scale s under y ~ Bernoulli(Phi((s_i -
    s_j) / 1.4826)), s ~ N(mean, cov): H[y] - E_s H[y | s] (Houlsby et al. 2011).
    """
    mu, var = _difference_moments(mean, cov, pairs)
    p = special.ndtr(mu / np.sqrt(1.0 + var))
    marginal = _binary_entropy(p)
    conditional = np.sqrt(_BALD_C2 / (var + _BALD_C2)) * np.exp(-(mu**2) / (2.0 * (var + _BALD_C2)))
    return np.maximum(marginal - conditional, 0.0)


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0 - 1e-12)
    return -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))


def _fisher(mean: np.ndarray, cov: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Fisher information (JOD^-2) of one vote on each pair (P,) about s_i - s_j, at the
    difference's mean shrunk by its uncertainty (mu / sqrt(1 + var), in comparison-noise
    units): a pair whose difference is still uncertain is not written off as lopsided."""
    mu, var = _difference_moments(mean, cov, pairs)
    z = mu / np.sqrt(1.0 + var)
    p = special.ndtr(z)
    return np.exp(-(z**2)) / (2.0 * np.pi) / np.maximum(p * (1.0 - p), 1e-12) / JOD_SIGMA**2


def variance_reduction(mean: np.ndarray, cov: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Expected reduction (JOD^2) of the summed variance of the mean-centred scale by one
    vote on each pair (P,): w ||C S a||^2 / (1 + w a'S a), a = e_i - e_j, w the vote's
    Fisher information at the posterior mean, C the centring matrix (A-optimal design)."""
    i, j = pairs[:, 0], pairs[:, 1]
    weight = _fisher(mean, cov, pairs)
    columns = cov[:, i] - cov[:, j]  # (n, P): S a for each pair
    var = columns[i, np.arange(len(pairs))] - columns[j, np.arange(len(pairs))]
    centred = columns - columns.mean(axis=0, keepdims=True)
    return weight * np.sum(centred**2, axis=0) / (1.0 + weight * var)


@dataclass(frozen=True)
class OracleAllocation:
    """The A-optimal design for *known* qualities (a bound, not a selector).

    ``pairs`` (P, 2) as :func:`all_pairs`; ``share`` (P,) share of the votes per pair
    (sums to 1); ``variance_ratio``: summed variance of the mean-centred scale under
    ``share`` divided by the same under equal shares (the balanced design), asymptotic
    (Fisher information at the truth). Because that variance scales as 1 / votes, it is
    also the ratio of votes the allocation needs for the balanced design's precision.
    ``lower_bound``: a certified lower bound on the best ratio any allocation reaches
    (convexity: phi* >= 2 phi(w) - max_p d_p), so no design, however adaptive, needs
    fewer than ``lower_bound`` × balanced's votes (to first order). ``iterations`` used."""

    pairs: np.ndarray
    share: np.ndarray
    variance_ratio: float
    lower_bound: float
    iterations: int


def _pair_contrasts(pairs: np.ndarray, size: int) -> np.ndarray:
    """(P, n): row p is e_i - e_j for pair p = (i, j)."""
    contrasts = np.zeros((len(pairs), size))
    contrasts[np.arange(len(pairs)), pairs[:, 0]] = 1.0
    contrasts[np.arange(len(pairs)), pairs[:, 1]] = -1.0
    return contrasts


def _centred_scale_variance(design, fisher, share) -> np.ndarray:
    """Covariance (n × n, JOD^2 per unit of votes) of the mean-centred scale when the
    votes are spread over the pairs (rows of ``design``, :func:`_pair_contrasts`) by
    ``share``, each worth ``fisher`` (inverse of the information on the sum-zero
    subspace)."""
    size = design.shape[1]
    information = (design * (share * fisher)[:, None]).T @ design
    mean_projector = np.full((size, size), 1.0 / size)
    return np.linalg.inv(information + mean_projector) - mean_projector


def a_optimal_allocation(quality: np.ndarray) -> OracleAllocation:
    """Share of votes per pair that minimises the summed variance of the mean-centred
    Thurstone scale when the true ``quality`` (n,, JOD) is known: the A-optimal
    approximate design. phi(w) = tr(V(w)) is convex in the shares w, with gradient -d_p,
    d_p = f_p a_p' V^2 a_p (V the centred covariance, a_p = e_i - e_j); it is minimised
    over the simplex through a softmax (L-BFGS, exact gradient, started from the
    balanced design), and the equivalence theorem gives the certified bound
    phi* >= 2 phi(w) - max_p d_p (``lower_bound``). A vote on pair (i, j) carries Fisher
    information f = phi(z)^2 / (Phi(z) (1 - Phi(z))) / 1.4826^2 about q_i - q_j,
    z = (q_i - q_j) / 1.4826."""
    from scipy import optimize

    quality = np.asarray(quality, dtype=float)
    if quality.ndim != 1 or quality.size < 2 or not np.all(np.isfinite(quality)):
        raise ValueError("quality must be a finite 1-d array of at least 2 conditions")
    pairs = all_pairs(quality.size)
    z = (quality[pairs[:, 0]] - quality[pairs[:, 1]]) / JOD_SIGMA
    p = special.ndtr(z)
    fisher = stats.norm.pdf(z) ** 2 / np.maximum(p * (1.0 - p), 1e-300) / JOD_SIGMA**2
    diff = _pair_contrasts(pairs, quality.size)
    balanced = float(np.trace(_centred_scale_variance(diff, fisher, 1.0 / len(pairs))))

    def ratio_and_sensitivity(share):
        share = share + 1e-12  # keeps the comparison graph connected in floating point
        cov = _centred_scale_variance(diff, fisher, share / share.sum())
        sensitivity = fisher * np.einsum("pi,ij,pj->p", diff, cov @ cov, diff)
        return float(np.trace(cov)) / balanced, sensitivity / balanced

    def objective(logits):
        share = special.softmax(logits)
        ratio, sensitivity = ratio_and_sensitivity(share)
        return ratio, share * (share @ sensitivity - sensitivity)  # chain rule, softmax

    result = optimize.minimize(
        objective,
        np.zeros(len(pairs)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20_000, "ftol": 1e-15, "gtol": 1e-12},
    )
    share = special.softmax(result.x)
    ratio, sensitivity = ratio_and_sensitivity(share)
    bound = min(ratio, 2.0 * ratio - float(sensitivity.max()))
    return OracleAllocation(pairs, share, ratio, bound, int(result.nit))


def _shrink(cov: np.ndarray, mean: np.ndarray, pair: tuple[int, int]) -> np.ndarray:
    """The covariance after one (yet unseen) vote on ``pair``: a rank-one update by its
    expected Fisher information (Sherman–Morrison). The weight is :func:`_fisher`'s for
    the one pair in scalar arithmetic (a fetch shrinks by every open lease of the study:
    hundreds of calls, where numpy's per-call overhead on one element dominated)."""
    i, j = pair
    mu = (mean[i] - mean[j]) / JOD_SIGMA
    spread = max((cov[i, i] + cov[j, j] - 2.0 * cov[i, j]) / JOD_SIGMA**2, 0.0)
    z = mu / math.sqrt(1.0 + spread)
    p = special.ndtr(z)
    weight = math.exp(-(z * z)) / (2.0 * math.pi) / max(p * (1.0 - p), 1e-12) / JOD_SIGMA**2
    column = cov[:, i] - cov[:, j]  # cov @ (e_i - e_j)
    var = column[pair[0]] - column[pair[1]]
    return cov - np.outer(column, column) * (weight / (1.0 + weight * var))


def _shrink_by_pending(cov: np.ndarray, mean: np.ndarray,
                       pending: list[tuple[int, int]]) -> np.ndarray:
    """The covariance after every (yet unseen) vote in ``pending`` (pairs, repeats
    allowed): each vote's expected Fisher information at the current posterior
    (:func:`_fisher`) added to the precision. Independent votes' information adds, so the
    result does not depend on the order of ``pending`` (the open leases, in whatever order
    the database lists them), and a fetch with hundreds of open leases costs two 16 × 16
    inverses instead of hundreds of rank-one updates. For one vote it is :func:`_shrink`."""
    votes = Counter(tuple(sorted((int(i), int(j)))) for i, j in pending)
    pairs = np.array(list(votes), dtype=int)
    weight = _fisher(mean, cov, pairs) * np.array(list(votes.values()), float)
    design = _pair_contrasts(pairs, len(mean))
    precision = np.linalg.inv(cov) + (design * weight[:, None]).T @ design
    updated = np.linalg.inv(precision)
    return (updated + updated.T) / 2.0


@dataclass(frozen=True)
class Choice:
    """One chosen pair: condition indices ``i < j`` and the gain (bits) it had when chosen."""

    i: int
    j: int
    gain: float


def select_pairs(
    posterior: Posterior,
    n: int,
    *,
    counts: np.ndarray | None = None,
    pending: list[tuple[int, int]] = (),
    available: np.ndarray | None = None,
    pair_floor: int = 0,
    priority: np.ndarray | None = None,
    seed: int | str = 0,
    criterion: str = "variance",
) -> list[Choice]:
    """Choose ``n`` condition pairs (with repetition) to lease next.

    ``counts`` (P,) votes + open leases per pair of :func:`all_pairs` (default zeros);
    ``pending`` pairs leased but not answered (they shrink the covariance first, so this
    batch complements them: :func:`_shrink_by_pending`); ``available`` (P,) how many
    more votes each pair may take now (free items; a pair at 0 is never chosen; default
    unlimited); a pair whose count
    (plus what this batch already chose) is under ``pair_floor``, or that is flagged in
    ``priority`` (P,) bool (e.g. an image under its floor; cleared once chosen), is chosen
    before any other, the best first. ``criterion``: "variance" (default; the expected
    reduction of the centred scale's summed variance, :func:`variance_reduction`) or
    "entropy" (:func:`information_gain`); either way each choice reports its information
    gain in bits. Ties are broken by a pseudo-random order seeded with ``seed``. Returns
    fewer than ``n`` choices when nothing more is available.
    """
    if criterion not in ("variance", "entropy"):
        raise ValueError(f"criterion must be 'variance' or 'entropy', got {criterion!r}")
    pairs = all_pairs(len(posterior.mean))
    counts = np.zeros(len(pairs)) if counts is None else np.asarray(counts, float).copy()
    left = np.full(len(pairs), np.inf) if available is None else np.asarray(available, float).copy()
    flagged = np.zeros(len(pairs), bool) if priority is None else np.asarray(priority, bool).copy()
    jitter = np.random.default_rng(_seed_int(seed)).random(len(pairs)) * 1e-9
    mean, cov = posterior.mean, posterior.cov
    if len(pending):
        cov = _shrink_by_pending(cov, mean, pending)
    chosen: list[Choice] = []
    for _ in range(n):
        open_ = left > 0
        if not open_.any():
            break
        gain = information_gain(mean, cov, pairs)
        score = (gain if criterion == "entropy" else variance_reduction(mean, cov, pairs)) + jitter
        under = open_ & ((counts < pair_floor) | flagged)
        pool = under if under.any() else open_
        k = int(np.argmax(np.where(pool, score, -np.inf)))
        pair = (int(pairs[k, 0]), int(pairs[k, 1]))
        chosen.append(Choice(pair[0], pair[1], float(gain[k])))
        counts[k] += 1
        left[k] -= 1
        flagged[k] = False
        cov = _shrink(cov, mean, pair)
    return chosen


def _seed_int(seed: int | str) -> int:
    return random.Random(str(seed)).getrandbits(64)


# ---- ASAP-approx (Mikhailiuk et al. 2020), our implementation --------------------------

TRUESKILL_PRIOR_VAR = 0.5  # TrueSkill skill prior variance (noise variance 1 on a difference)


def _psi_lambda(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """psi = phi / Phi and lambda = psi (psi + x), stably."""
    psi = np.exp(stats.norm.logpdf(x) - special.log_ndtr(x))
    return psi, psi * (psi + x)


def trueskill_ep(
    winners: np.ndarray,
    losers: np.ndarray,
    size: int,
    n_iter: int = 4,
    prior_var: float = TRUESKILL_PRIOR_VAR,
) -> tuple[np.ndarray, np.ndarray]:
    """TrueSkill posterior by expectation propagation over all games (vectorised).

    ``winners``/``losers`` (G,) condition indices of each vote. Model: P(w beats l) =
    Phi(s_w - s_l), s ~ N(0, ``prior_var``) independently (units: comparison-noise SD,
    1 = 1.4826 JOD). Returns the marginal means and variances (size,).
    """
    games = np.stack([winners, losers], axis=1).astype(int)
    msg_prec = np.zeros(games.shape, float)
    msg_mean = np.zeros(games.shape, float)
    prec = np.full(size, 1.0 / prior_var)
    mean = np.zeros(size)
    for _ in range(n_iter):
        prec = 1.0 / prior_var + np.bincount(games.ravel(), msg_prec.ravel(), size)
        mean = np.bincount(games.ravel(), (msg_prec * msg_mean).ravel(), size) / prec
        if not len(games):
            break
        cav_prec = np.maximum(prec[games] - msg_prec, 1e-12)
        cav_mean = (prec[games] * mean[games] - msg_prec * msg_mean) / cav_prec
        var_t = 1.0 + (1.0 / cav_prec).sum(axis=1)
        mean_t = cav_mean[:, 0] - cav_mean[:, 1]
        x = mean_t / np.sqrt(var_t)
        psi, lam = _psi_lambda(x)
        post_mean_t = mean_t + np.sqrt(var_t) * psi
        post_var_t = var_t * (1.0 - lam)
        prec_tg = np.maximum(1.0 / post_var_t - 1.0 / var_t, 1e-12)
        mean_tg = (post_mean_t / post_var_t - mean_t / var_t) / prec_tg
        var_gs = 1.0 + 1.0 / prec_tg[:, None] + 1.0 / cav_prec[:, ::-1]
        msg_prec = 1.0 / var_gs
        msg_mean = np.stack([mean_tg + cav_mean[:, 1], cav_mean[:, 0] - mean_tg], axis=1)
    prec = 1.0 / prior_var + np.bincount(games.ravel(), msg_prec.ravel(), size)
    mean = np.bincount(games.ravel(), (msg_prec * msg_mean).ravel(), size) / prec
    return mean, 1.0 / prec


def _adf_update(mean_w, var_w, mean_l, var_l):
    """One online (assumed-density) TrueSkill update for 'w beats l' (arrays)."""
    c2 = 1.0 + var_w + var_l
    c = np.sqrt(c2)
    psi, lam = _psi_lambda((mean_w - mean_l) / c)
    return (
        mean_w + var_w / c * psi,
        var_w * (1.0 - var_w / c2 * lam),
        mean_l - var_l / c * psi,
        var_l * (1.0 - var_l / c2 * lam),
    )


def _kl_normal(m1, v1, m0, v0):
    return 0.5 * (np.log(v0 / v1) + (v1 + (m1 - m0) ** 2) / v0 - 1.0)


def asap_approx_gain(mean: np.ndarray, var: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """ASAP-approx's expected information gain (nats) of each pair (P,): the expected KL
    divergence of the two conditions' updated marginals from the current ones."""
    i, j = pairs[:, 0], pairs[:, 1]
    p_ij = special.ndtr((mean[i] - mean[j]) / np.sqrt(1.0 + var[i] + var[j]))
    gain = np.zeros(len(pairs))
    for prob, win, lose in ((p_ij, i, j), (1.0 - p_ij, j, i)):
        mw, vw, ml, vl = _adf_update(mean[win], var[win], mean[lose], var[lose])
        gain += prob * (
            _kl_normal(mw, vw, mean[win], var[win]) + _kl_normal(ml, vl, mean[lose], var[lose])
        )
    return gain


def asap_approx_batch(winners: np.ndarray, losers: np.ndarray, size: int) -> list[Choice]:
    """ASAP-approx's batch mode: the n - 1 pairs of the minimum spanning tree of the
    complete graph weighted by 1 / gain, from the TrueSkill EP posterior of all votes."""
    mean, var = trueskill_ep(winners, losers, size)
    pairs = all_pairs(size)
    gain = asap_approx_gain(mean, var, pairs)
    weights = np.zeros((size, size))
    weights[pairs[:, 0], pairs[:, 1]] = 1.0 / np.maximum(gain, 1e-300)
    tree = minimum_spanning_tree(weights).tocoo()
    lookup = {(int(a), int(b)): g for (a, b), g in zip(pairs, gain, strict=True)}
    out = []
    for a, b in zip(tree.row, tree.col, strict=True):
        a, b = sorted((int(a), int(b)))
        out.append(Choice(a, b, float(lookup[(a, b)])))
    return sorted(out, key=lambda c: (c.i, c.j))
