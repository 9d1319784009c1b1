"""Inference that respects clustering (participants and images).

Per pair: per-participant proportions tested against 1/2 (t-test and Wilcoxon), a
logistic GLM with two-way cluster-robust covariance (participant, image), a crossed
random-intercept logistic model (statsmodels ``BinomialBayesMixedGLM``), and a two-way
cluster bootstrap of the preference rate.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sparse
from scipy import special, stats

from analysis.intervals import bh_adjust, holm_adjust
from analysis.pairs import ordered_pairs
from analysis.scaling import MIN_IMAGES, ScaleVariance, t_interval

MIXED_LIMITS = (
    "variational-Bayes posterior (statsmodels BinomialBayesMixedGLM.fit_vb) of a logistic "
    "model with crossed random intercepts for participant and image and a left/right term; "
    "priors N(0, 2^2) on fixed effects and log-normal on the random-effect SDs. No p-values: "
    "the interval is posterior mean +/- 1.96 posterior SD, and mean-field VB tends to "
    "understate that SD. lme4's glmer is the reference it should be judged against. "
    "statsmodels scales poorly with many random effects (seconds per pair already at 30 "
    "participants x 20 images; its Laplace fit did not converge in our checks), so each pair "
    "is fitted on at most max_participants participants and max_images images drawn at "
    "random (seeded); n_used says how many votes entered."
)

# Fewest clusters (participants, images) for a cluster-robust variance: below this the
# sandwich estimate is too unstable to test with.
MIN_CLUSTERS = 5


def _pair_frame(main: pd.DataFrame, sides_recorded: bool) -> pd.DataFrame:
    pairs = ordered_pairs(main)
    frame = pd.DataFrame(
        {
            "condition_a": pairs["condition_a"].to_numpy(),
            "condition_b": pairs["condition_b"].to_numpy(),
            "win_a": pairs["win_a"].to_numpy(),
            "participant": main["participant"].astype(str).to_numpy(),
            "image_id": main["image_id"].astype(str).to_numpy(),
        }
    )
    a_left = main["condition_left"].astype(str).to_numpy() == frame["condition_a"].to_numpy()
    frame["a_left"] = np.where(a_left, 0.5, -0.5) if sides_recorded else 0.0
    return frame


TWO_WAY_RATE_METHOD = (
    "two-way cluster-robust variance V_participants + V_images - V_cells "
    "(never below V_cells), Student t with Satterthwaite df"
)


def pooled_rate_method(over: str = "pairs") -> str:
    """The ``interval`` text of a rate whose variance shares are pooled ``over`` the
    study's pairs (table pairs) or conditions (a JND study's table jnd_rates)."""
    return (
        "two-way cluster-robust variance with the participants' and images' shares pooled "
        f"over the study's {over}: V = V_cells (1 + max(r_participants + r_images, 0)), "
        f"r = V_factor / V_cells - 1 averaged over the {over} (vote-weighted); Student t "
        "with G - 1 df, G the fewer levels of the factors whose pooled share is positive"
    )


POOLED_RATE_METHOD = pooled_rate_method("pairs")


# A pair's own two-way variance replaces the pooled one when it exceeds it by more than
# this many standard errors of a variance estimated from G_images - 1 df (one-sided 5 %).
HETEROGENEITY_Z = 1.645


def _rate_components(
    y: np.ndarray, participants, images
) -> tuple[float, dict[str, float], dict[str, int]]:
    """The rate (mean of 0/1 ``y``) and its one-way cluster-robust variances by
    participant, image and participant × image cell: sum_g (sum of y - rate in g)^2 / n^2
    × G / (G - 1) (NaN with one cluster), with the cluster counts G."""
    y = np.asarray(y, dtype=float)
    n = len(y)
    rate = float(y.mean()) if n else np.nan
    residual = y - rate
    participants = pd.factorize(pd.Series(participants).astype(str))[0]
    images = pd.factorize(pd.Series(images).astype(str))[0]
    cells = participants.astype(np.int64) * (images.max(initial=0) + 1) + images
    parts, clusters = {}, {}
    for name, codes in (("participant", participants), ("image", images), ("cell", cells)):
        codes = pd.factorize(codes)[0]
        sums = np.bincount(codes, residual) if n else np.zeros(0)
        groups = len(sums)
        parts[name] = np.sum(sums**2) / n**2 * groups / (groups - 1) if groups > 1 else np.nan
        clusters[name] = groups
    return rate, parts, clusters


def _rate_result(rate: float, var: float, df: float, level: float, interval: str) -> dict:
    """se, df, ci_low, ci_high (clipped to [0, 1]) and p_value against 1/2 of a rate with
    variance ``var`` and a Student t (``df``); NaN where the variance is 0 or unknown."""
    if np.isfinite(var) and var > 0:
        se, low, high, _, p = (
            float(v[0]) for v in t_interval(rate - 0.5, np.array([var]), np.array([df]), level)
        )
        low, high = float(np.clip(low + 0.5, 0, 1)), float(np.clip(high + 0.5, 0, 1))
    else:
        se = low = high = p = np.nan
    return {
        "rate": rate,
        "se": se,
        "df": float(df),
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "interval": interval,
    }


def two_way_rate(
    y: np.ndarray, participants: np.ndarray, images: np.ndarray, level: float = 0.95
) -> dict:
    """A rate (mean of 0/1 votes ``y``) with an interval and a test against 1/2 that count
    participants and images as random.

    Two-way cluster-robust variance (Cameron, Gelbach & Miller 2011), combined and floored
    exactly as the scale intervals are (``analysis.scaling.ScaleVariance``): V =
    V_participants + V_images - V_cells, never below V_cells, each one-way part the
    sandwich of ``_rate_components``; Student t with Satterthwaite degrees of freedom. With
    fewer than ``MIN_IMAGES`` images: participants only (G - 1 df). Returns rate, se, df,
    ci_low, ci_high (clipped to [0, 1]), p_value (NaN when the variance is 0 or not
    estimable) and interval (the method in words). For several pairs of one study,
    ``two_way_rate_tests`` pools the variance shares over the pairs instead."""
    return _own_rate(*_rate_components(y, participants, images), level)


def _own_rate(rate: float, parts: dict, clusters: dict, level: float) -> dict:
    """``two_way_rate`` from the rate's one-way parts (``_rate_components``)."""
    two_way = clusters["image"] >= MIN_IMAGES
    variance = ScaleVariance(
        method="two-way rate",
        combine="two-way" if two_way else "participants",
        components={k: np.array([[v]]) for k, v in parts.items()},
        clusters=clusters,
    )
    var, df = variance.contrast(np.ones((1, 1)))
    interval = (
        TWO_WAY_RATE_METHOD
        if two_way
        else (
            "participant cluster-robust variance, t (G - 1 df); fewer than "
            f"{MIN_IMAGES} images: image variance not included"
        )
    )
    return _rate_result(rate, float(var[0]), float(df[0]), level, interval)


def pooled_variance_shares(components: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """The participants' and images' variance shares r_k = V_k / V_cells - 1 averaged over
    pairs, each pair weighted by its votes (``components``: (n, one-way parts) per pair;
    pairs with V_cells 0 or unknown are left out). A pair's own shares scatter around
    theirs with G - 1 df (G = 10 images: an SD of about half the binomial variance), and
    the scatter floored at 0 only ever adds variance; over a study's pairs — the same
    participants and images judge every pair — it averages out. Empty dict: no pair
    qualifies."""
    used = [
        (n, parts)
        for n, parts in components
        if np.isfinite(parts["cell"])
        and parts["cell"] > 0
        and np.isfinite(parts["participant"])
        and np.isfinite(parts["image"])
    ]
    if not used:
        return {}
    weights = np.array([n for n, _ in used], dtype=float)
    return {
        k: float(np.average([parts[k] / parts["cell"] - 1.0 for _, parts in used], weights=weights))
        for k in ("participant", "image")
    }


def pooled_two_way_rates(
    groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    level: float = 0.95,
    over: str = "pairs",
) -> list[dict]:
    """Several rates of one study, each ``(y, participants, images)`` (0/1 votes and their
    clusters), with intervals and tests against 1/2 whose participants' and images'
    variance shares are pooled over the rates (``pooled_variance_shares``; the same
    participants and images judge every one): V = V_cells (1 + max(r_p + r_i, 0)), t with
    G - 1 df for the fewest levels among factors with a positive share, V_cells' cells - 1
    when neither is. A rate whose own two-way variance (``two_way_rate``) exceeds the
    pooled one by more than ``HETEROGENEITY_Z`` standard errors of a variance with
    G_images - 1 df keeps its own, as does one with fewer than ``MIN_IMAGES`` images
    (participants only). One ``two_way_rate``-style dict per group, in order; the pooled
    ones' ``interval`` is ``pooled_rate_method(over)``."""
    parts_of = [_rate_components(y, participants, images) for y, participants, images in groups]
    eligible = [
        (len(y), parts)
        for (y, _, _), (_, parts, clusters) in zip(groups, parts_of, strict=True)
        if clusters["image"] >= MIN_IMAGES
    ]
    shares = pooled_variance_shares(eligible)
    method = pooled_rate_method(over)
    results = []
    for rate, parts, clusters in parts_of:
        result = _own_rate(rate, parts, clusters, level)
        if clusters["image"] >= MIN_IMAGES and shares:
            var = parts["cell"] * (1.0 + max(shares["participant"] + shares["image"], 0.0))
            active = [clusters[k] for k in ("participant", "image") if shares[k] > 0]
            df = (min(active) if active else clusters["cell"]) - 1.0
            # a rate clustered well beyond the study's shares keeps its own variance
            limit = var * (1.0 + HETEROGENEITY_Z * np.sqrt(2.0 / (clusters["image"] - 1.0)))
            if not result["se"] ** 2 > limit:
                result = _rate_result(rate, var, df, level, method)
        results.append(result)
    return results


def two_way_rate_tests(main: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per pair: the pooled rate of choosing condition_a (rate_a = wins_a / n) with an
    interval and a test against 1/2 that count participants and images as random; Holm and
    Benjamini–Hochberg over all pairs. Columns: condition_a, condition_b, n, wins_a,
    rate_a, se, df, ci_low, ci_high, p_value, p_holm, p_bh, interval.

    The variance is the two-way cluster-robust one with the factors' shares pooled over the
    study's pairs (``pooled_two_way_rates``). Each pair's own two-way variance
    (``two_way_rate``) was measured conservative without random effects and liberal in
    Holm's tail with them (docs/benchmarks.md). Pairs with fewer than ``MIN_IMAGES``
    images keep ``two_way_rate``'s participants-only interval."""
    frame = _pair_frame(main, sides_recorded=False)
    keys, groups = [], []
    for (a, b), group in frame.groupby(["condition_a", "condition_b"], sort=True):
        keys.append((a, b))
        groups.append(
            (group["win_a"].to_numpy(dtype=float), group["participant"], group["image_id"])
        )
    rows = []
    for (a, b), (y, _, _), result in zip(
        keys, groups, pooled_two_way_rates(groups, 1 - alpha), strict=True
    ):
        rows.append(
            {
                "condition_a": a,
                "condition_b": b,
                "n": len(y),
                "wins_a": int(y.sum()),
                "rate_a": result.pop("rate"),
                **result,
            }
        )
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_holm"] = holm_adjust(table["p_value"].to_numpy())
        table["p_bh"] = bh_adjust(table["p_value"].to_numpy())
    return table


def per_participant_tests(main: pd.DataFrame) -> pd.DataFrame:
    """Per pair: each participant's rate of choosing condition_a, tested against 1/2 with
    a one-sample t-test and a Wilcoxon signed-rank test; Holm over pairs (t-test)."""
    frame = _pair_frame(main, sides_recorded=False)
    rates = frame.groupby(["condition_a", "condition_b", "participant"], sort=True)["win_a"].mean()
    rows = []
    for (a, b), group in rates.groupby(level=[0, 1], sort=True):
        values = group.to_numpy(dtype=float)
        row = {
            "condition_a": a,
            "condition_b": b,
            "n_participants": len(values),
            "mean_rate_a": values.mean(),
            "t": np.nan,
            "p_t": np.nan,
            "p_wilcoxon": np.nan,
        }
        if len(values) >= 2 and np.std(values) > 0:
            test = stats.ttest_1samp(values, 0.5)
            row.update(t=float(test.statistic), p_t=float(test.pvalue))
        if len(values) >= 2 and np.any(values != 0.5):
            row["p_wilcoxon"] = float(stats.wilcoxon(values - 0.5, zero_method="wilcox").pvalue)
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_t_holm"] = holm_adjust(table["p_t"].to_numpy())
    return table


def cluster_robust_glm(
    main: pd.DataFrame, sides_recorded: bool = True, alpha: float = 0.05
) -> pd.DataFrame:
    """Per pair: logistic GLM win_a ~ 1 (+ a_left, coded +-1/2) with two-way
    cluster-robust covariance (participant, image). The intercept is the log-odds of
    choosing a with sides balanced; rate_a = expit(intercept) with its interval. Column
    ``cov`` says which covariance was used (one-way by participant when there is a single
    image or the two-way variance is not positive; not estimated with fewer than
    ``MIN_CLUSTERS`` participants). p-values and intervals use Student t with G - 1 degrees
    of freedom (column ``df``), G the fewest clusters of a dimension used. The side term is
    left out when it would separate the data (a side x outcome cell is empty)."""
    frame = _pair_frame(main, sides_recorded)
    rows = []
    for (a, b), group in frame.groupby(["condition_a", "condition_b"], sort=True):
        y = group["win_a"].to_numpy(dtype=float)
        columns = [np.ones(len(group))]
        if sides_recorded and _side_term_estimable(group["a_left"], y):
            columns.append(group["a_left"].to_numpy())
        exog = np.column_stack(columns)
        groups = np.column_stack(
            [pd.factorize(group["participant"])[0], pd.factorize(group["image_id"])[0]]
        )
        row = {"condition_a": a, "condition_b": b, "n": len(group)}
        if y.min() == y.max():  # separation: all votes one way, logit is infinite
            row.update(
                log_odds=np.inf if y[0] == 1 else -np.inf,
                se=np.nan,
                p_value=np.nan,
                rate_a=float(y[0]),
                ci_low=np.nan,
                ci_high=np.nan,
            )
        else:
            fit, row["cov"], n_clusters = _cluster_robust_fit(y, exog, groups)
            if fit is None:
                row.update(
                    log_odds=np.nan,
                    se=np.nan,
                    p_value=np.nan,
                    rate_a=float(y.mean()),
                    ci_low=np.nan,
                    ci_high=np.nan,
                )
                rows.append(row)
                continue
            # Few clusters: Student t with G - 1 degrees of freedom (G = the fewest
            # clusters in a clustering dimension), not the normal.
            est, se = float(fit.params[0]), float(fit.bse[0])
            t_crit = stats.t.isf(alpha / 2, n_clusters - 1)
            row.update(
                log_odds=est,
                se=se,
                df=n_clusters - 1,
                p_value=float(2 * stats.t.sf(abs(est / se), n_clusters - 1)),
                rate_a=float(special.expit(est)),
                ci_low=float(special.expit(est - t_crit * se)),
                ci_high=float(special.expit(est + t_crit * se)),
            )
            if exog.shape[1] > 1:
                row["side_log_odds"] = float(fit.params[1])
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_holm"] = holm_adjust(table["p_value"].to_numpy())
    return table


def _side_term_estimable(a_left: pd.Series, won: np.ndarray) -> bool:
    """True when the side (a shown left) can enter the model: both sides occur and no
    side x outcome cell is empty (an empty cell separates the data and sends the
    estimates to infinity)."""
    if a_left.nunique() < 2:
        return False
    cells = pd.crosstab(a_left.to_numpy(), won)
    return cells.shape == (2, 2) and bool((cells.to_numpy() > 0).all())


def _cluster_robust_fit(y: np.ndarray, exog: np.ndarray, groups: np.ndarray):
    """Logistic GLM with the richest cluster-robust covariance the data support.

    Two-way (participant, image) when both have at least ``MIN_CLUSTERS`` clusters and the
    variance comes out positive; else clustered by participant; else not estimated (fewer
    than ``MIN_CLUSTERS`` participants, or no more votes than parameters).
    Returns (fit or None, description, G = clusters in the smallest dimension used).
    """
    import statsmodels.api as sm

    def fit(cluster_groups):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = sm.GLM(y, exog, family=sm.families.Binomial()).fit(
                cov_type="cluster", cov_kwds={"groups": cluster_groups}
            )
        se = float(result.bse[0])
        return result if np.isfinite(se) and se > 0 else None

    n_participants = len(np.unique(groups[:, 0]))
    n_images = len(np.unique(groups[:, 1]))
    if len(y) <= exog.shape[1] or n_participants < MIN_CLUSTERS:
        return None, f"not estimated: fewer than {MIN_CLUSTERS} participants", 0
    if n_images >= MIN_CLUSTERS:
        result = fit(groups)
        if result is not None:
            return result, "two-way cluster (participant, image)", min(n_participants, n_images)
        reason = "two-way variance was not positive"
    else:
        reason = f"fewer than {MIN_CLUSTERS} images"
    result = fit(groups[:, 0])
    if result is None:
        return None, "not estimated: cluster-robust variance was not positive", 0
    return result, f"cluster (participant); {reason}", n_participants


def mixed_logistic(
    main: pd.DataFrame,
    sides_recorded: bool = True,
    *,
    max_participants: int = 30,
    max_images: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """Per pair: crossed random intercepts (participant, image) logistic model, see
    ``MIXED_LIMITS``. Columns: log_odds (posterior mean), sd (posterior SD), rate_a and
    ci_low/ci_high on the rate scale, participant_sd / image_sd (random-effect SDs),
    n_used (rows fitted)."""
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    frame = _pair_frame(main, sides_recorded)
    rng = np.random.default_rng(seed)
    rows = []
    for (a, b), group in frame.groupby(["condition_a", "condition_b"], sort=True):
        people = group["participant"].unique()
        images = group["image_id"].unique()
        if len(people) > max_participants:
            people = rng.choice(people, max_participants, replace=False)
        if len(images) > max_images:
            images = rng.choice(images, max_images, replace=False)
        used = group[group["participant"].isin(people) & group["image_id"].isin(images)]
        row = {"condition_a": a, "condition_b": b, "n": len(group), "n_used": len(used)}
        y = used["win_a"].to_numpy(dtype=float)
        if len(used) < 10 or y.min() == y.max():
            row.update(
                log_odds=np.nan,
                sd=np.nan,
                rate_a=np.nan,
                ci_low=np.nan,
                ci_high=np.nan,
                participant_sd=np.nan,
                image_sd=np.nan,
            )
            rows.append(row)
            continue
        p_codes, _ = pd.factorize(used["participant"])
        i_codes, _ = pd.factorize(used["image_id"])
        n = len(used)
        rows_idx = np.arange(n)
        exog_vc = sparse.hstack(
            [
                sparse.csr_matrix((np.ones(n), (rows_idx, p_codes)), shape=(n, p_codes.max() + 1)),
                sparse.csr_matrix((np.ones(n), (rows_idx, i_codes)), shape=(n, i_codes.max() + 1)),
            ]
        ).tocsr()
        ident = np.r_[np.zeros(p_codes.max() + 1, int), np.ones(i_codes.max() + 1, int)]
        columns = [np.ones(n)]
        if sides_recorded and used["a_left"].nunique() > 1:
            columns.append(used["a_left"].to_numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = BinomialBayesMixedGLM(
                y, np.column_stack(columns), exog_vc, ident, vcp_p=1.0, fe_p=2.0
            )
            fit = model.fit_vb()
        est, sd = float(fit.fe_mean[0]), float(fit.fe_sd[0])
        vc = np.exp(np.asarray(fit.vcp_mean, dtype=float))
        row.update(
            log_odds=est,
            sd=sd,
            rate_a=float(special.expit(est)),
            ci_low=float(special.expit(est - 1.96 * sd)),
            ci_high=float(special.expit(est + 1.96 * sd)),
            participant_sd=float(vc[0]),
            image_sd=float(vc[1]),
        )
        rows.append(row)
    return pd.DataFrame(rows)


def cluster_bootstrap_rates(
    main: pd.DataFrame,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    two_way: bool = True,
) -> pd.DataFrame:
    """Per pair: percentile interval of rate_a from resampling participants (and, with
    ``two_way``, images independently; a row's weight is the product of its
    participant's and its image's draw counts). Vectorised over cells."""
    frame = _pair_frame(main, sides_recorded=False)
    pair_codes, pair_index = pd.factorize(
        pd.MultiIndex.from_arrays([frame["condition_a"], frame["condition_b"]]), sort=True
    )
    p_codes, p_names = pd.factorize(frame["participant"])
    i_codes, i_names = (
        pd.factorize(frame["image_id"]) if two_way else (np.zeros(len(frame), int), [0])
    )
    cells = pd.DataFrame({"pair": pair_codes, "p": p_codes, "i": i_codes, "w": frame["win_a"]})
    agg = cells.groupby(["pair", "p", "i"], sort=False)["w"].agg(["sum", "size"]).reset_index()
    pair = agg["pair"].to_numpy()
    pc = agg["p"].to_numpy()
    ic = agg["i"].to_numpy()
    wins = agg["sum"].to_numpy(dtype=float)
    counts = agg["size"].to_numpy(dtype=float)
    n_pairs = len(pair_index)
    rng = np.random.default_rng(seed)
    rates = np.empty((n_boot, n_pairs))
    for b in range(n_boot):
        wp = np.bincount(rng.integers(0, len(p_names), len(p_names)), minlength=len(p_names))
        weight = wp[pc].astype(float)
        if two_way:
            wi = np.bincount(rng.integers(0, len(i_names), len(i_names)), minlength=len(i_names))
            weight = weight * wi[ic]
        k = np.bincount(pair, weight * wins, minlength=n_pairs)
        n = np.bincount(pair, weight * counts, minlength=n_pairs)
        with np.errstate(invalid="ignore", divide="ignore"):
            rates[b] = k / n
    tail = (1 - level) / 2
    k0 = np.bincount(pair, wins, minlength=n_pairs)
    n0 = np.bincount(pair, counts, minlength=n_pairs)
    return pd.DataFrame(
        {
            "condition_a": [a for a, _ in pair_index],
            "condition_b": [b for _, b in pair_index],
            "rate_a": k0 / n0,
            "boot_se": np.nanstd(rates, axis=0, ddof=1),
            "ci_low": np.nanquantile(rates, tail, axis=0),
            "ci_high": np.nanquantile(rates, 1 - tail, axis=0),
            "n_boot": n_boot,
            "resampled": "participants and images" if two_way else "participants",
        }
    )


def cluster_bootstrap(
    frame: pd.DataFrame,
    statistic,
    cluster: str = "participant",
    n_boot: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Generic cluster bootstrap: ``statistic(resampled_frame) -> float or 1-D array``
    over ``n_boot`` resamples of the clusters in column ``cluster`` (with replacement).
    Returns an (n_boot, ...) array of replicates."""
    rng = np.random.default_rng(seed)
    groups = {key: idx for key, idx in frame.groupby(cluster, sort=True).indices.items()}
    keys = list(groups)
    out = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(keys), len(keys))
        rows = np.concatenate([groups[keys[d]] for d in drawn])
        out.append(np.asarray(statistic(frame.iloc[rows]), dtype=float))
    return np.array(out)
