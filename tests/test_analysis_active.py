"""The pure active-selection core (analysis.active): its numbers against independent
computations (numerical integration, explicit matrix inverses, choix) and the selector's
properties (caps, floors, seeded determinism, batches that spread)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize, special, stats

from analysis.active import (
    Posterior,
    _shrink,
    _shrink_by_pending,
    a_optimal_allocation,
    all_pairs,
    asap_approx_batch,
    asap_approx_gain,
    information_gain,
    select_pairs,
    thurstone_posterior,
    trueskill_ep,
    variance_reduction,
)
from analysis.simulation import JOD_SIGMA


def _posterior(size: int, seed: int, votes: int = 4) -> Posterior:
    rng = np.random.default_rng(seed)
    wins = rng.integers(0, votes + 1, (size, size)).astype(float)
    np.fill_diagonal(wins, 0.0)
    return thurstone_posterior(wins)


def test_information_gain_matches_numerical_mutual_information():
    """BALD's closed form vs the mutual information integrated numerically over the
    difference's Gaussian posterior (exact up to BALD's entropy approximation)."""
    post = _posterior(5, 1)
    pairs = all_pairs(5)
    gain = information_gain(post.mean, post.cov, pairs)

    def entropy(p):
        return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))

    for k, (i, j) in enumerate(pairs):
        mu = post.mean[i] - post.mean[j]
        sd = np.sqrt(post.cov[i, i] + post.cov[j, j] - 2 * post.cov[i, j])
        density = stats.norm(mu, sd).pdf
        p_win = integrate.quad(
            lambda d, f=density: f(d) * special.ndtr(d / JOD_SIGMA), mu - 10 * sd, mu + 10 * sd
        )[0]
        cond = integrate.quad(
            lambda d, f=density: f(d) * entropy(special.ndtr(d / JOD_SIGMA)),
            mu - 10 * sd,
            mu + 10 * sd,
        )[0]
        assert gain[k] == pytest.approx(entropy(p_win) - cond, abs=3e-3)


def test_variance_reduction_and_batch_shrink_match_explicit_inverses():
    post = _posterior(6, 2)
    pairs = all_pairs(6)
    reduction = variance_reduction(post.mean, post.cov, pairs)
    centre = np.eye(6) - 1 / 6
    for k, (i, j) in enumerate(pairs):
        a = np.zeros(6)
        a[i], a[j] = 1.0, -1.0
        mu = (post.mean[i] - post.mean[j]) / JOD_SIGMA
        z = mu / np.sqrt(1 + a @ post.cov @ a / JOD_SIGMA**2)
        w = stats.norm.pdf(z) ** 2 / (special.ndtr(z) * special.ndtr(-z)) / JOD_SIGMA**2
        after = np.linalg.inv(np.linalg.inv(post.cov) + w * np.outer(a, a))
        expected = np.trace(centre @ post.cov @ centre) - np.trace(centre @ after @ centre)
        assert reduction[k] == pytest.approx(expected, rel=1e-9)
        # one vote's update: the batch's rank-one step and the open leases' precision sum
        shrunk = _shrink(post.cov, post.mean, (int(i), int(j)))
        np.testing.assert_allclose(shrunk, after, rtol=1e-9, atol=1e-12)
        pending = _shrink_by_pending(post.cov, post.mean, [(int(j), int(i))])
        np.testing.assert_allclose(pending, after, rtol=1e-9, atol=1e-12)


def test_open_leases_add_their_information_in_any_order():
    """Hundreds of open leases: their Fisher information at the posterior summed into the
    precision (an explicit inverse), whatever order the database lists them in."""
    post = _posterior(7, 9, votes=10)
    pairs = all_pairs(7)
    rng = np.random.default_rng(3)
    leases = [tuple(int(c) for c in pairs[k]) for k in rng.integers(0, len(pairs), 300)]
    precision = np.linalg.inv(post.cov)
    for i, j in leases:
        a = np.zeros(7)
        a[i], a[j] = 1.0, -1.0
        mu = (post.mean[i] - post.mean[j]) / JOD_SIGMA
        z = mu / np.sqrt(1 + a @ post.cov @ a / JOD_SIGMA**2)
        w = stats.norm.pdf(z) ** 2 / (special.ndtr(z) * special.ndtr(-z)) / JOD_SIGMA**2
        precision += w * np.outer(a, a)
    expected = np.linalg.inv(precision)
    got = _shrink_by_pending(post.cov, post.mean, leases)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    shuffled = [(j, i) if n % 2 else (i, j) for n, (i, j) in enumerate(reversed(leases))]
    np.testing.assert_allclose(_shrink_by_pending(post.cov, post.mean, shuffled), got,
                               rtol=1e-12, atol=1e-15)
    chosen = select_pairs(post, 4, pending=leases, seed=2)
    again = select_pairs(post, 4, pending=shuffled, seed=2)
    assert [(c.i, c.j) for c in chosen] == [(c.i, c.j) for c in again]
    assert [c.gain for c in chosen] == pytest.approx([c.gain for c in again], rel=1e-12)


def test_thurstone_posterior_is_the_laplace_approximation():
    """Mean: the MAP (gradient zero); covariance: the inverse of the numerically
    differentiated Hessian of the negative log posterior."""
    rng = np.random.default_rng(3)
    wins = rng.integers(0, 6, (4, 4)).astype(float)
    np.fill_diagonal(wins, 0)
    post = thurstone_posterior(wins, prior_sd=3.0)

    def neg_log_post(s):
        d = (s[:, None] - s[None, :]) / JOD_SIGMA
        return -np.sum(wins * special.log_ndtr(d)) + np.sum(s**2) / 18.0

    eps = 1e-4
    hess = np.zeros((4, 4))
    for i in range(4):
        for j in range(4):
            e_i, e_j = np.eye(4)[i] * eps, np.eye(4)[j] * eps
            hess[i, j] = (
                neg_log_post(post.mean + e_i + e_j)
                - neg_log_post(post.mean + e_i - e_j)
                - neg_log_post(post.mean - e_i + e_j)
                + neg_log_post(post.mean - e_i - e_j)
            ) / (4 * eps**2)
    np.testing.assert_allclose(post.cov, np.linalg.inv(hess), rtol=1e-4, atol=1e-6)
    assert post.n_votes == int(wins.sum())
    empty = thurstone_posterior(np.zeros((3, 3)))
    np.testing.assert_allclose(empty.cov, 9.0 * np.eye(3))
    np.testing.assert_allclose(empty.half_widths(), 1.959964 * 3 * np.sqrt(2 / 3), rtol=1e-5)


def test_trueskill_ep_single_game_is_the_closed_form_update_and_agrees_with_choix():
    mean, var = trueskill_ep(np.array([0]), np.array([1]), 2, prior_var=0.5)
    c = np.sqrt(1 + 0.5 + 0.5)
    psi = stats.norm.pdf(0) / 0.5
    assert mean[0] == pytest.approx(0.5 / c * psi) and mean[1] == pytest.approx(-0.5 / c * psi)
    assert var[0] == pytest.approx(0.5 * (1 - 0.5 / c**2 * psi * psi))
    # many games: EP marginal means agree with choix's EP (probit, full covariance)
    import choix

    rng = np.random.default_rng(4)
    truth = np.array([0.0, 0.5, 1.0, 1.5])
    games = []
    for _ in range(300):
        i, j = rng.choice(4, 2, replace=False)
        games.append((i, j) if rng.random() < special.ndtr(truth[i] - truth[j]) else (j, i))
    winners, losers = np.array(games).T
    mean, var = trueskill_ep(winners, losers, 4, n_iter=30, prior_var=0.5)
    ref_mean, ref_cov = choix.ep_pairwise(4, games, alpha=2.0, model="probit")
    np.testing.assert_allclose(mean - mean.mean(), ref_mean - ref_mean.mean(), atol=0.05)


def test_asap_batch_is_a_spanning_tree_of_the_most_informative_pairs():
    post_wins = np.array([0, 0, 1, 2]), np.array([1, 2, 3, 3])
    batch = asap_approx_batch(*post_wins, 5)
    assert len(batch) == 4  # n - 1 edges
    nodes = {0}
    for _ in range(4):  # connected: every node reachable
        nodes |= {c.i for c in batch if c.j in nodes} | {c.j for c in batch if c.i in nodes}
    assert nodes == set(range(5))
    gain = asap_approx_gain(*trueskill_ep(*post_wins, 5), all_pairs(5))
    assert (gain > 0).all()


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(3, 9),
    seed=st.integers(0, 10**6),
    n=st.integers(1, 40),
    floor=st.integers(0, 3),
    cap=st.integers(0, 3),
)
def test_selector_respects_caps_and_floors_and_is_seeded(size, seed, n, floor, cap):
    post = _posterior(size, seed % 97)
    pairs = all_pairs(size)
    rng = np.random.default_rng(seed)
    available = rng.integers(0, cap + 1, len(pairs))
    counts = rng.integers(0, 4, len(pairs))
    chosen = select_pairs(post, n, counts=counts, available=available, pair_floor=floor, seed=seed)
    again = select_pairs(post, n, counts=counts, available=available, pair_floor=floor, seed=seed)
    assert chosen == again
    assert len(chosen) == min(n, int(available.sum()))
    taken = np.zeros(len(pairs), int)
    index = {(int(a), int(b)): k for k, (a, b) in enumerate(pairs)}
    for c in chosen:
        k = index[(c.i, c.j)]
        taken[k] += 1
        assert taken[k] <= available[k]  # never beyond what is free
        assert c.gain >= 0
    # floors: while an open pair is under its floor, only such pairs are chosen
    running = counts.astype(int).copy()
    left = available.astype(int).copy()
    for c in chosen:
        k = index[(c.i, c.j)]
        under = (left > 0) & (running < floor)
        if under.any():
            assert under[k], "a pair above its floor was chosen while another was under it"
        running[k] += 1
        left[k] -= 1


def test_a_batch_spreads_over_pairs_and_complements_the_open_leases():
    post = _posterior(8, 5, votes=20)
    batch = select_pairs(post, 40, seed=1)
    from collections import Counter

    per_pair = Counter((c.i, c.j) for c in batch)  # 40 concurrent fetches: not one pair
    assert len(per_pair) >= 5 and max(per_pair.values()) <= 12, per_pair
    first = select_pairs(post, 1, seed=1)[0]
    after = select_pairs(post, 1, pending=[(first.i, first.j)] * 30, seed=1)[0]
    assert (after.i, after.j) != (first.i, first.j)
    with pytest.raises(ValueError, match="criterion"):
        select_pairs(post, 1, criterion="bogus")


def test_a_optimal_allocation_of_equal_conditions_is_the_balanced_design():
    oracle = a_optimal_allocation(np.zeros(5))
    assert oracle.share == pytest.approx(np.full(10, 0.1))
    assert oracle.variance_ratio == pytest.approx(1.0)


def _centred_variance_sum(quality, share):
    """Summed variance of the centred Thurstone MLE per unit of votes, written out with
    an explicit Moore-Penrose pseudo-inverse (numpy) of the information matrix."""
    pairs = all_pairs(len(quality))
    z = (quality[pairs[:, 0]] - quality[pairs[:, 1]]) / JOD_SIGMA
    fisher = stats.norm.pdf(z) ** 2 / (stats.norm.cdf(z) * stats.norm.sf(z)) / JOD_SIGMA**2
    information = np.zeros((len(quality), len(quality)))
    for (i, j), f, w in zip(pairs, fisher, share, strict=True):
        a = np.zeros(len(quality))
        a[i], a[j] = 1.0, -1.0
        information += w * f * np.outer(a, a)
    return float(np.trace(np.linalg.pinv(information)))


def test_a_optimal_allocation_matches_a_generic_optimiser_and_the_equivalence_theorem():
    quality = np.array([0.0, 0.4, 1.5, 4.0, 6.5])
    oracle = a_optimal_allocation(quality)
    n_pairs = len(oracle.pairs)
    best = optimize.minimize(
        lambda w: _centred_variance_sum(quality, np.abs(w) / np.abs(w).sum()),
        np.full(n_pairs, 1.0 / n_pairs),
        method="Nelder-Mead",
        options={"maxiter": 40_000, "maxfev": 40_000, "xatol": 1e-9, "fatol": 1e-12},
    )
    balanced = _centred_variance_sum(quality, np.full(n_pairs, 1.0 / n_pairs))
    ours = _centred_variance_sum(quality, oracle.share)
    assert oracle.variance_ratio == pytest.approx(ours / balanced, rel=1e-6)
    assert ours <= best.fun * (1 + 1e-4)  # no generic optimum below ours
    assert oracle.lower_bound <= oracle.variance_ratio < oracle.lower_bound + 1e-4
    assert best.fun / balanced >= oracle.lower_bound  # the bound is a bound
    assert oracle.variance_ratio < 0.9  # a wide spread: some pairs are worth little
    assert oracle.share.sum() == pytest.approx(1.0) and oracle.share.min() >= 0.0


def test_the_oracle_variance_is_the_thurstone_estimators_variance():
    """The Fisher information behind the oracle bound, against the spread of the actual
    maximum-likelihood scale over simulated balanced studies (4 conditions, 2,400 votes
    each): the summed variance of the centred estimate agrees within 15 %."""
    from analysis.scaling import fit_scale

    quality = np.array([0.0, 0.5, 1.2, 2.4])
    pairs = all_pairs(4)
    votes_per_pair = 400
    rng = np.random.default_rng(7)
    p_first = stats.norm.cdf((quality[pairs[:, 0]] - quality[pairs[:, 1]]) / JOD_SIGMA)
    estimates = []
    for _ in range(300):
        first = rng.binomial(votes_per_pair, p_first)
        wins = np.zeros((4, 4))
        wins[pairs[:, 0], pairs[:, 1]] = first
        wins[pairs[:, 1], pairs[:, 0]] = votes_per_pair - first
        estimate = fit_scale(wins, "thurstone")
        estimates.append(estimate - estimate.mean())
    empirical = float(np.var(np.array(estimates), axis=0, ddof=1).sum())
    predicted = _centred_variance_sum(quality, np.full(len(pairs), 1.0 / len(pairs)))
    predicted /= votes_per_pair * len(pairs)
    assert empirical == pytest.approx(predicted, rel=0.15)
