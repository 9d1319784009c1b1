"""Logistic GLMM with crossed random intercepts, fitted by maximum Laplace likelihood.

Model (lme4's parametrisation): ``y_i ~ Binomial(m_i, expit(eta_i))`` with
``eta = X beta + Z Lambda b``, ``b ~ N(0, I_q)``; ``Z`` holds one indicator column per
level of each grouping factor (participant, image, ...) and ``Lambda`` is diagonal with
``theta_k`` on the levels of factor k, so factor k's random intercepts ``u = Lambda b`` have
SD ``theta_k``.

For given ``theta`` (and ``beta``) penalized iteratively reweighted least squares (PIRLS,
Newton steps with step halving) finds the conditional mode of ``b``; the Laplace
approximation of the deviance there is

    D(theta, beta) = -2 log p(y | beta, b*) + |b*|^2 + log det(Lambda Z'WZ Lambda + I),

``W = diag(m mu (1 - mu))``. The fit has lme4's two stages: (1) ``theta`` by a bounded
derivative-free search (scipy's Nelder-Mead, ``theta >= 0``; lme4 uses bobyqa) with
``(beta, b)`` at their joint conditional modes (lme4's ``nAGQ = 0`` objective); (2)
Newton steps on ``D(theta, beta)`` with a finite-difference gradient and Hessian (lme4's
``nAGQ = 1`` default). The covariance of ``beta`` is the inverse of half that Hessian
(the beta block), as ``vcov(glmer_fit)`` in lme4 >= 1.1; the cheaper conditional
covariance (the inverse Schur complement of the penalized system at the mode, lme4's
``use.hessian = FALSE``) is also returned. A factor whose SD ends at 0 (below
``BOUNDARY_TOL``) is a boundary (singular) fit: it is held at 0 in stage 2 and flagged.

``fit_glmm(..., reml=True)`` estimates the SDs by restricted Laplace likelihood instead
(beta integrated out as well), and ``GLMMFit.df`` holds Satterthwaite degrees of freedom
for each fixed effect's Wald t. ``glmm_pair_tests`` turns this into the report's primary
per-pair test (see ``PAIR_TEST_METHOD`` and docs/analysis.md for why that test).

Dense linear algebra on the small ``(p + q)`` penalized system; the data are first
collapsed to cells of identical (levels, covariates) so cost scales with the cells, not the
votes. numpy/scipy only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special
from scipy.linalg.lapack import dpotrf as _potrf
from scipy.linalg.lapack import dpotrs as _potrs

# An SD below this is reported as 0 (a boundary / singular fit), lme4's isSingular tolerance.
BOUNDARY_TOL = 1e-4
# Step of the central finite differences for the Hessian (lme4's deriv12 default).
FD_STEP = 1e-4
# When the Hessian is not positive definite, an SD below DROP_SD is set to 0 if that
# raises the deviance by at most DROP_DEVIANCE (it cannot be told from 0).
DROP_SD = 0.1
DROP_DEVIANCE = 1e-3
# A boundary SD is checked by moving it to this value; if the deviance drops, stage 2 is
# redone by a bounded search over (theta, beta) from there.
RELEASE_SD = 0.05


@dataclass(frozen=True, eq=False)
class GLMMFit:
    """A fitted logistic GLMM (see module docstring).

    beta, se, cov: fixed effects, their standard errors and covariance (``vcov`` says which
    covariance); se_conditional: SEs from the conditional covariance; df: Satterthwaite
    degrees of freedom of each fixed effect's Wald t from the SDs' Hessian covariance (inf
    when every SD is 0, NaN when the SDs' covariance is unknown); df_components: from the
    factors' shares of the variance, each with G - 1 df (``_satterthwaite``); sd: random-intercept SD per grouping factor
    (``factors``); theta_cov: covariance of the SDs from the Hessian (NaN for boundary
    SDs); deviance: the Laplace deviance (-2 log-likelihood; with ``method`` "REML" the
    restricted one), loglik = -deviance / 2; converged: stage 2 converged with a positive
    definite Hessian; boundary: per factor, SD at 0; iterations: deviance evaluations in
    all; n_obs (trials), n_cells (distinct rows), n_levels per factor; message: why not
    converged.
    """

    names: tuple[str, ...]
    beta: np.ndarray
    se: np.ndarray
    cov: np.ndarray
    se_conditional: np.ndarray
    df: np.ndarray
    df_components: np.ndarray
    factors: tuple[str, ...]
    sd: np.ndarray
    theta_cov: np.ndarray
    deviance: float
    converged: bool
    boundary: tuple[bool, ...]
    iterations: int
    n_obs: int
    n_cells: int
    n_levels: tuple[int, ...]
    vcov: str
    method: str = "ML"
    message: str = ""

    @property
    def loglik(self) -> float:
        return -0.5 * self.deviance

    @property
    def singular(self) -> bool:
        return any(self.boundary)


class _Design:
    """Collapsed data: successes k and trials m per cell, X (cells x p), level codes
    (cells x K), and the sparse structure of Z as index arrays."""

    def __init__(self, successes, trials, X, codes, n_levels):
        self.k = successes
        self.m = trials
        self.X = X
        self.codes = codes
        self.n_levels = np.asarray(n_levels, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.n_levels)[:-1]])
        self.q = int(self.n_levels.sum())
        self.p = X.shape[1]
        self.K = codes.shape[1]
        self.flat = codes + self.offsets  # column of Z per cell and factor
        self.cross = {
            (a, c): codes[:, a] * self.n_levels[c] + codes[:, c]
            for a in range(self.K)
            for c in range(a + 1, self.K)
        }
        self.factor_of_level = np.repeat(np.arange(self.K), self.n_levels)

    def z(self, u: np.ndarray) -> np.ndarray:
        return u[self.flat].sum(axis=1)

    def zt(self, v: np.ndarray) -> np.ndarray:
        return np.bincount(self.flat.ravel(), np.repeat(v, self.K), minlength=self.q)

    def ztwz(self, w: np.ndarray) -> np.ndarray:
        out = np.diag(self.zt(w))
        for (a, c), idx in self.cross.items():
            na, nc = self.n_levels[a], self.n_levels[c]
            block = np.bincount(idx, w, minlength=na * nc).reshape(na, nc)
            oa, oc = self.offsets[a], self.offsets[c]
            out[oa : oa + na, oc : oc + nc] = block
            out[oc : oc + nc, oa : oa + na] = block.T
        return out

    def ztwx(self, w: np.ndarray) -> np.ndarray:
        wx = self.X * w[:, None]
        return np.stack([self.zt(wx[:, j]) for j in range(self.p)], axis=1)


def _collapse(y, trials, X, codes):
    """Sum successes and trials over rows with identical (codes, X)."""
    key = np.column_stack([codes.astype(float), X])
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    n_cells = len(first)
    k = np.bincount(inverse, y, minlength=n_cells)
    m = np.bincount(inverse, trials, minlength=n_cells)
    return k, m, X[first], codes[first]


class _Model:
    """Deviance evaluations with warm-started PIRLS."""

    def __init__(self, design: _Design):
        self.d = design
        self.evaluations = 0

    # -- one Newton system ------------------------------------------------------------
    def _state(self, eta):
        mu = special.expit(eta)
        w = self.d.m * mu * (1.0 - mu)
        r = self.d.k - self.d.m * mu
        loglik = float(np.dot(self.d.k, eta) - np.dot(self.d.m, np.logaddexp(0.0, eta)))
        return w, r, loglik

    def _hbb(self, lam, w):
        hbb = lam[:, None] * self.d.ztwz(w) * lam[None, :]
        hbb.flat[:: self.d.q + 1] += 1.0
        return hbb

    def pirls(
        self,
        theta,
        beta,
        b,
        joint: bool,
        reml: bool = False,
        tol: float = 1e-9,
        max_iter: int = 60,
    ):
        """Conditional mode of b (and of beta when ``joint``) for given theta: Newton steps
        with step halving on the penalized deviance, stopped after the step whose Newton
        decrement was below ``tol`` (the next would change the deviance by ~tol^2).

        Returns (beta, b, laplace_deviance, converged, w); with ``reml`` (and ``joint``)
        the deviance is the restricted one: beta integrated out too (+ log det of the
        Schur complement of the penalized system, lme4's log|RX|^2)."""
        d = self.d
        p = d.p
        lam = theta[d.factor_of_level]
        beta = beta.copy()
        b = b.copy()
        eta = d.X @ beta + d.z(lam * b)
        w, r, loglik = self._state(eta)
        pdev = -2.0 * loglik + b @ b
        converged = False
        size = p + d.q if joint else d.q
        for _ in range(max_iter):
            hbb = self._hbb(lam, w)
            grad_b = lam * d.zt(r) - b
            if joint:
                hess = np.empty((size, size))
                hess[p:, p:] = hbb
                hxb = d.ztwx(w).T * lam[None, :]
                hess[:p, p:] = hxb
                hess[p:, :p] = hxb.T
                hess[:p, :p] = (d.X * w[:, None]).T @ d.X
                grad = np.concatenate([d.X.T @ r, grad_b])
            else:
                hess, grad = hbb, grad_b
            chol, info = _potrf(hess, lower=True, clean=False)
            if info == 0:
                step = _potrs(chol, grad, lower=True)[0]
            else:
                step = np.linalg.lstsq(hess, grad, rcond=None)[0]
            decrement = float(grad @ step)
            scale = 1.0
            for _ in range(40):
                if joint:
                    new_beta, new_b = beta + scale * step[:p], b + scale * step[p:]
                else:
                    new_beta, new_b = beta, b + scale * step
                new_eta = d.X @ new_beta + d.z(lam * new_b)
                new_w, new_r, new_loglik = self._state(new_eta)
                new_pdev = -2.0 * new_loglik + new_b @ new_b
                if new_pdev <= pdev + 1e-12 * max(1.0, abs(pdev)):
                    break
                scale /= 2
            else:
                break  # no descent along the Newton direction: at the mode to precision
            beta, b, w, r, pdev = new_beta, new_b, new_w, new_r, new_pdev
            if decrement < tol:
                converged = True
                break
        else:
            converged = False
        if not converged:
            converged = bool(decrement < 1e-6)
        chol, info = _potrf(self._hbb(lam, w), lower=True, clean=False)
        logdet = 2.0 * float(np.log(np.diag(chol)).sum()) if info == 0 else np.inf
        if reml and info == 0:
            hxb = d.ztwx(w) * lam[:, None]  # Lambda Z'WX
            schur = (d.X * w[:, None]).T @ d.X - hxb.T @ _solve_columns(chol, hxb)
            rx, info = _potrf(schur, lower=True, clean=False)
            logdet += 2.0 * float(np.log(np.diag(rx)).sum()) if info == 0 else np.inf
        self.evaluations += 1
        return beta, b, pdev + logdet, converged, w


# Small dense systems are solved one right-hand side at a time with LAPACK's potrs: the
# multi-column BLAS-3 routines (trsm, the inverse) start OpenBLAS's thread pool, which
# costs ~10x on matrices this small.
def _solve_columns(chol: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """A^{-1} rhs column by column, from A's lower Cholesky factor (potrf output)."""
    return np.column_stack([_potrs(chol, rhs[:, j], lower=True)[0] for j in range(rhs.shape[1])])


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix (LinAlgError if it is not)."""
    chol, info = _potrf(a, lower=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError("matrix not positive definite")
    inverse = _solve_columns(chol, np.eye(len(a)))
    return (inverse + inverse.T) / 2


def _conditional_cov(design: _Design, theta: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Covariance of beta given theta: the inverse Schur complement of the penalized
    system [[X'WX, X'WZL], [LZ'WX, LZ'WZL + I]] at the mode (lme4's RX-based vcov)."""
    lam = theta[design.factor_of_level]
    hbb = lam[:, None] * design.ztwz(w) * lam[None, :]
    hbb.flat[:: design.q + 1] += 1.0
    hxb = design.ztwx(w).T * lam[None, :]
    hxx = (design.X * w[:, None]).T @ design.X
    chol, info = _potrf(hbb, lower=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError("penalized system not positive definite")
    schur = hxx - hxb @ _solve_columns(chol, hxb.T)
    return _spd_inverse(schur)


def _variance_gradient(model, theta, beta, b, idx, h=1e-4) -> np.ndarray:
    """d var(beta_j) / d theta_k for the SDs ``idx`` (rows) and every fixed effect j
    (columns): the conditional variance with beta and b at their joint modes for theta,
    central differences."""
    grad = np.empty((idx.size, len(beta)))
    for row, k in enumerate(idx):
        values = []
        for sign in (1.0, -1.0):
            th = theta.copy()
            th[k] += sign * h
            _, _, _, _, w = model.pirls(th, beta, b, joint=True)
            values.append(np.diag(_conditional_cov(model.d, th, w)))
        grad[row] = (values[0] - values[1]) / (2 * h)
    return grad


def _satterthwaite(model, theta, beta, b, free, theta_cov, variance):
    """Satterthwaite degrees of freedom of each fixed effect's Wald statistic, two ways.

    Hessian: df_j = 2 V_j^2 / (g_j' Cov(theta) g_j), V_j the variance of beta_j, g_j the
    gradient of V_j(theta) (``_variance_gradient``), Cov(theta) the SDs' covariance from
    the Laplace Hessian. Components: the binomial part of V_j is known, and factor k adds
    c_kj = theta_k g_kj / 2 (V is about linear in theta_k^2), a variance estimated from
    G_k levels (G_k - 1 df), so df_j = V_j^2 / sum_k c_kj^2 / (G_k - 1) — the same rule
    as the two-way scale and rate intervals; it is at least the smallest G_k - 1 and
    grows without bound as the SDs shrink. SDs at the boundary add nothing; with every
    SD there the statistic is a z (df = inf). Returns (hessian df, component df)."""
    p = len(beta)
    idx = np.flatnonzero(free)
    if idx.size == 0:
        return np.full(p, np.inf), np.full(p, np.inf)
    grad = _variance_gradient(model, theta, beta, b, idx)
    variance = np.asarray(variance)
    share = theta[idx][:, None] * grad / 2
    levels = model.d.n_levels[idx][:, None] - 1.0
    spread_share = np.sum(share**2 / np.maximum(levels, 1.0), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        df_share = np.where(spread_share > 0, variance**2 / spread_share, np.inf)
    sigma = theta_cov[np.ix_(idx, idx)]
    if not np.all(np.isfinite(sigma)):
        return np.full(p, np.nan), df_share
    spread = np.einsum("kj,kl,lj->j", grad, sigma, grad)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(spread > 0, 2 * variance**2 / spread, np.inf)
    return df, df_share


def _fd_derivatives(f, x, h):
    """Central finite-difference gradient and Hessian of f at x (1 + 2n + 2n(n-1) calls)."""
    n = len(x)
    f0 = f(x)
    grad = np.empty(n)
    hess = np.empty((n, n))
    plus = np.empty(n)
    minus = np.empty(n)
    eye = np.eye(n) * h
    for i in range(n):
        plus[i] = f(x + eye[i])
        minus[i] = f(x - eye[i])
        grad[i] = (plus[i] - minus[i]) / (2 * h)
        hess[i, i] = (plus[i] - 2 * f0 + minus[i]) / h**2
    for i in range(n):
        for j in range(i + 1, n):
            value = (
                f(x + eye[i] + eye[j])
                - f(x + eye[i] - eye[j])
                - f(x - eye[i] + eye[j])
                + f(x - eye[i] - eye[j])
            ) / (4 * h**2)
            hess[i, j] = hess[j, i] = value
    return f0, grad, hess


_NOT_PD = "Hessian of the Laplace deviance is not positive definite"


def _newton(f, x, recenter, max_steps: int = 20):
    """Newton steps with a central finite-difference gradient and Hessian of ``f`` and
    step halving; ``recenter(x)`` is called before each Hessian (it moves PIRLS's warm
    start there). Returns (x, Hessian, converged, message); converged means the Newton
    decrement fell below 1e-5 with a positive definite Hessian (the one returned, taken
    at most one tiny step away from x)."""
    if x.size == 0:  # nothing to optimise (REML with every SD at 0)
        recenter(x)
        return x, np.zeros((0, 0)), True, ""
    hess = None
    for _ in range(max_steps):
        recenter(x)
        f0, grad, hess = _fd_derivatives(f, x, FD_STEP)
        chol, info = _potrf(hess, lower=True, clean=False)
        if info != 0:
            return x, hess, False, _NOT_PD
        step = -_potrs(chol, grad, lower=True)[0]
        decrement = -float(grad @ step)
        if decrement < 1e-8:
            return x, hess, True, ""
        scale = 1.0
        while scale > 1e-6:
            trial = x + scale * step
            if f(trial) <= f0:
                break
            scale /= 2
        else:
            return x, hess, False, "line search failed"
        x = trial
        if decrement < 1e-5:  # a tiny step: the Hessian at the start is still accurate
            recenter(x)
            return x, hess, True, ""
    return x, hess, False, f"no convergence in {max_steps} Newton steps"


def _newton_stage(model: _Model, theta, beta, b, free):
    """Stage 2 (ML): Newton on the Laplace deviance over (theta[free], beta), b at its
    conditional mode for each; other SDs held at their values. Returns (theta, beta, b,
    Hessian, converged, message)."""
    n_free = int(free.sum())
    anchor = {"b": b}

    def unpack(x):
        th = theta.copy()  # SDs not free stay as given (0 for boundary SDs)
        th[free] = x[:n_free]
        return th, x[n_free:]

    def dev(x):
        th, be = unpack(x)
        return model.pirls(th, be, anchor["b"], joint=False)[2]

    def recenter(x):
        th, be = unpack(x)
        anchor["b"] = model.pirls(th, be, anchor["b"], joint=False)[1]

    x, hess, converged, message = _newton(dev, np.concatenate([theta[free], beta]), recenter)
    th, be = unpack(x)
    return np.abs(th), be, anchor["b"], hess, converged, message  # D is even in theta


def _reml_stage(model: _Model, theta, beta, b, free):
    """REML: Newton on the restricted Laplace deviance over theta[free], (beta, b) at
    their joint modes. Returns (theta, beta, b, Hessian over theta[free], converged,
    message)."""
    K = len(theta)
    anchor = {"beta": beta, "b": b}

    def unpack(x):
        th = np.zeros(K)
        th[free] = x
        return th

    def dev(x):
        return model.pirls(unpack(x), anchor["beta"], anchor["b"], joint=True, reml=True)[2]

    def recenter(x):
        out = model.pirls(unpack(x), anchor["beta"], anchor["b"], joint=True)
        anchor["beta"], anchor["b"] = out[0], out[1]

    x, hess, converged, message = _newton(dev, theta[free], recenter)
    return np.abs(unpack(x)), anchor["beta"], anchor["b"], hess, converged, message


def _with(theta: np.ndarray, k: int, value: float) -> np.ndarray:
    out = theta.copy()
    out[k] = value
    return out


def _stage1(model: _Model, theta, beta, b, reml: bool):
    """Stage 1: the SDs minimising the Laplace deviance with (beta, b) at their joint
    conditional modes (lme4's nAGQ = 0), or the restricted deviance with ``reml``; bounded
    Nelder-Mead from ``theta`` (derivative free, and free of BLAS thread start-up, which
    dominates L-BFGS-B's cost on systems this small). Returns (theta, beta, b)."""
    state = {"beta": beta, "b": b}

    def dev(th):
        beta_, b_, value, ok, _ = model.pirls(th, state["beta"], state["b"], joint=True, reml=reml)
        if ok and np.all(np.isfinite(b_)):
            state["beta"], state["b"] = beta_, b_
        return value

    result = _nelder_mead(dev, theta, len(theta))
    theta = np.where(result < BOUNDARY_TOL, 0.0, result)
    beta, b, _, _, _ = model.pirls(theta, state["beta"], state["b"], joint=True)
    return theta, beta, b


def _bounded_stage(model: _Model, theta, beta, b):
    """Fallback for ML stage 2: bounded Nelder-Mead on the Laplace deviance over
    (theta >= 0, beta), from theta moved at least RELEASE_SD off 0."""
    K = len(theta)
    anchor = {"b": b}

    def dev(x):
        out = model.pirls(x[:K], x[K:], anchor["b"], joint=False)
        if np.all(np.isfinite(out[1])):
            anchor["b"] = out[1]
        return out[2]

    x = _nelder_mead(dev, np.concatenate([np.maximum(theta, RELEASE_SD), beta]), K)
    theta = np.where(x[:K] < BOUNDARY_TOL, 0.0, x[:K])
    return theta, x[K:], anchor["b"]


def _nelder_mead(f, x0, n_bounded: int) -> np.ndarray:
    """Minimise f from x0 with its first ``n_bounded`` coordinates >= 0."""
    bounds = [(0.0, None)] * n_bounded + [(None, None)] * (len(x0) - n_bounded)
    simplex = [x0] + [x0 + np.eye(len(x0))[i] * 0.25 for i in range(len(x0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = optimize.minimize(
            f,
            x0,
            method="Nelder-Mead",
            bounds=bounds,
            options={
                "initial_simplex": np.array(simplex),
                "xatol": 1e-5,
                "fatol": 1e-9,
                "maxfev": 400 * len(x0),
            },
        )
    return result.x


def fit_glmm(
    y,
    X,
    groups,
    trials=None,
    *,
    names: tuple[str, ...] | None = None,
    factors: tuple[str, ...] | None = None,
    theta_start: float = 1.0,
    reml: bool = False,
) -> GLMMFit:
    """Fit a logistic GLMM with crossed random intercepts by maximum Laplace likelihood.

    y: successes per row (0/1 for Bernoulli rows); trials: trials per row (default 1);
    X: (n, p) fixed-effect design (include the intercept column); groups: (n, K) integer
    codes or a sequence of K label arrays, one per grouping factor, each with at least two
    levels; names/factors: labels of X's columns and of the factors.
    reml: estimate the SDs by restricted (REML) Laplace likelihood instead: beta is
    integrated out as well (flat prior), which removes most of ML's downward bias of the
    SDs with few levels; beta then maximises the Laplace likelihood at those SDs and
    ``cov`` is the inverse of half the Hessian over beta there (as GLS at REML variances
    in a linear mixed model; glmer has no REML for GLMMs).
    Raises ValueError on inputs that have no finite maximum (no variation in y, fewer
    rows than parameters, a factor with one level).
    """
    y = np.asarray(y, dtype=float)
    n = len(y)
    trials = np.ones(n) if trials is None else np.asarray(trials, dtype=float)
    X = np.asarray(X, dtype=float).reshape(n, -1)
    if isinstance(groups, np.ndarray):
        columns = [groups] if groups.ndim == 1 else [groups[:, j] for j in range(groups.shape[1])]
    elif hasattr(groups, "columns"):  # a DataFrame: one factor per column
        columns = [np.asarray(groups[c]) for c in groups.columns]
    else:
        columns = [np.asarray(g) for g in groups]
    codes = []
    n_levels = []
    for column in columns:
        if len(column) != n:
            raise ValueError("every grouping factor needs one label per row")
        _, inverse = np.unique(column, return_inverse=True)
        codes.append(inverse.ravel())
        n_levels.append(int(inverse.max()) + 1 if n else 0)
    codes = np.column_stack(codes).astype(np.int64)
    names = tuple(names) if names is not None else tuple(f"x{j}" for j in range(X.shape[1]))
    factors = (
        tuple(factors) if factors is not None else tuple(f"g{j}" for j in range(len(n_levels)))
    )
    if min(n_levels) < 2:
        raise ValueError("every grouping factor needs at least two levels")
    if n <= X.shape[1] or np.all(y == 0) or np.all(y == trials):
        raise ValueError("no variation in the outcome (or too few rows): no finite estimate")
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise ValueError("the fixed-effect design is rank deficient")

    design = _Design(*_collapse(y, trials, X, codes), n_levels)
    model = _Model(design)
    K, p, q = design.K, design.p, design.q
    # Stage 1: theta with (beta, b) at their joint modes, the start of stage 2 (for REML
    # the restricted deviance, whose optimum stage 2 then polishes).
    theta, beta, b = _stage1(model, np.full(K, theta_start), np.zeros(p), np.zeros(q), reml)

    # Stage 2: Newton on the Laplace deviance over (free theta, beta) (ML), or on the
    # restricted deviance over free theta (REML). An SD the deviance cannot tell from 0
    # (Hessian not positive definite there) is set to 0 when that costs no likelihood.
    stage = _reml_stage if reml else _newton_stage

    def criterion(th, be, b_):
        return model.pirls(th, be, b_, joint=reml, reml=reml)[2]

    free = theta > 0
    polished = False
    for _ in range(K + 3):
        theta, beta, b, hess, converged, message = stage(model, theta, beta, b, free)
        if converged:
            # a boundary SD must be a minimum there too (stage 1 put it at 0), else the
            # bounded search moves it off once
            at = criterion(theta, beta, b)
            if polished or not any(
                criterion(_with(theta, k, RELEASE_SD), beta, b) < at - 1e-6
                for k in np.flatnonzero(~free)
            ):
                break
        elif message == _NOT_PD and np.any(free & (theta < DROP_SD)):
            small = np.flatnonzero(free & (theta < DROP_SD))
            trial = _with(theta, small[np.argmin(theta[small])], 0.0)
            if criterion(trial, beta, b) - criterion(theta, beta, b) <= DROP_DEVIANCE:
                theta, free = trial, trial > 0
                continue
        if polished:
            break
        if reml:
            theta, beta, b = _stage1(model, np.maximum(theta, RELEASE_SD), beta, b, True)
        else:
            theta, beta, b = _bounded_stage(model, theta, beta, b)
        free, polished = theta > 0, True
    boundary = ~free
    beta, b, deviance, _, w = model.pirls(theta, beta, b, joint=reml, reml=reml)
    cov_conditional = _conditional_cov(design, theta, w)
    se_conditional = np.sqrt(np.diag(cov_conditional))

    n_free = int(free.sum())
    theta_cov = np.full((K, K), np.nan)
    idx = np.flatnonzero(free)
    if reml:
        # REML SDs; beta then maximises the Laplace likelihood at those SDs (as GLS does
        # at the REML variances of a linear mixed model), its covariance from the Hessian
        # over beta there
        if converged and n_free:
            theta_cov[np.ix_(idx, idx)] = 2 * _spd_inverse(hess)
        fixed = np.zeros(K, dtype=bool)
        _, beta, b, hess_beta, beta_ok, beta_message = _newton_stage(model, theta, beta, b, fixed)
        w = model.pirls(theta, beta, b, joint=False)[4]
        cov_conditional = _conditional_cov(design, theta, w)
        se_conditional = np.sqrt(np.diag(cov_conditional))
        if beta_ok:
            inverse = _spd_inverse(hess_beta)
            cov, vcov = inverse + inverse.T, "hessian over beta at the REML SDs"
        else:
            cov, vcov = cov_conditional, "conditional (REML)"
            converged, message = False, message or beta_message
    elif converged:
        inverse = _spd_inverse(hess)
        cov_full = inverse + inverse.T  # = 2 inv(H), symmetrised
        cov, vcov = cov_full[n_free:, n_free:], "hessian"
        theta_cov[np.ix_(idx, idx)] = cov_full[:n_free, :n_free]
    else:
        cov, vcov = cov_conditional, "conditional"
    if not converged:
        message = (message or "stage 2 did not converge") + "; SDs' covariance unknown"
    df, df_components = _satterthwaite(model, theta, beta, b, free, theta_cov, np.diag(cov))
    return GLMMFit(
        names=names,
        beta=beta,
        se=np.sqrt(np.diag(cov)),
        cov=cov,
        se_conditional=se_conditional,
        df=df,
        df_components=df_components,
        factors=factors,
        sd=theta,
        theta_cov=theta_cov,
        deviance=float(deviance),
        converged=bool(converged),
        boundary=tuple(bool(v) for v in boundary),
        iterations=model.evaluations,
        n_obs=int(trials.sum()),
        n_cells=len(design.k),
        n_levels=tuple(int(v) for v in n_levels),
        vcov=vcov,
        method="REML" if reml else "ML",
        message=message,
    )


# --------------------------------------------------------------------------- per pair

PAIR_TEST_METHOD = (
    "per pair, logistic GLMM win_a ~ 1 + a_left + (1|participant) + (1|image) (a_left = "
    "+-1/2: condition_a shown left or right; only when sides were recorded). The "
    "intercept (log_odds) is the log-odds of preferring condition_a for a typical "
    "participant and image; rate_a / rate_low / rate_high are it and its interval on the "
    "rate scale. The two random-effect SDs are estimated once for the study, by restricted "
    "(REML) Laplace likelihood summed over its pairs (the same participants and images "
    "judge every pair; each pair keeps its own random intercepts), and each pair's "
    "intercept and SE are taken at those SDs; test of no preference: Wald t with each "
    "factor's share of the variance counted with G - 1 degrees of freedom (z when both "
    "pooled SDs are 0); Holm over the pairs. A pair whose own REML fit has a variance more "
    "than 1.645 SEs above the pooled one keeps its own fit (Satterthwaite df, at least "
    "G - 1), and its reason says so. Measured in simulations with 10 to 20 participants "
    "and 5 to 10 images, with and without participant and image effects, the intervals "
    "covered 0.938-0.971 and the Holm family-wise error stayed at or below 0.05 within "
    "Monte Carlo error (docs/analysis.md, docs/benchmarks.md). log_odds_ml / se_ml: the pair's own "
    "maximum-likelihood Laplace fit, i.e. lme4's glmer (estimates and SEs within 3 % of "
    "glmer's in the tests). A pair without a finite estimate has NaN and a reason."
)

PAIR_TEST_COLUMNS = [
    "condition_a",
    "condition_b",
    "n_votes",
    "n_participants",
    "n_images",
    "log_odds",
    "se",
    "statistic",
    "df",
    "df_components",
    "p",
    "p_holm",
    "ci_low",
    "ci_high",
    "rate_a",
    "rate_low",
    "rate_high",
    "side_log_odds",
    "side_se",
    "sd_participant",
    "sd_image",
    "log_odds_ml",
    "se_ml",
    "converged",
    "boundary",
    "method",
    "reason",
]

TESTS = {
    "pooled": "GLMM REML-Laplace, SDs pooled over the study's pairs, Wald t (component df)",
    "reml": "GLMM REML-Laplace, Wald t (Satterthwaite df >= G - 1)",
    "ml": "GLMM ML-Laplace, Wald t (Satterthwaite df >= G - 1)",
    "ml-z": "GLMM ML-Laplace, Wald z",
}

# Above this many participants + images in a pair the dense fit would take minutes; the
# pair gets the cluster-robust GLM instead (many clusters: its level is then fine).
MAX_LEVELS = 1000
# A random-intercept SD above this (log-odds) is not an estimate: the participants' (or
# images') votes are all one way within levels, the likelihood keeps rising as the SD
# grows (quasi-separation), and the fixed effect and its SE are then meaningless (seen
# with a handful of votes per participant: SDs of 1e5-1e7 with "significant" log-odds).
MAX_SD = 10.0


def glmm_pair_tests(
    main,
    alpha: float = 0.05,
    sides_recorded: bool = True,
    test: str = "pooled",
    max_levels: int = MAX_LEVELS,
    with_ml: bool = True,
):
    """Per unordered condition pair: logistic GLMM ``win_a ~ 1 + a_left + (1|participant)
    + (1|image)`` (``a_left`` = +1/2 when condition_a was shown left, -1/2 otherwise; only
    when sides are recorded and both sides occur without separating the data).

    log_odds: the intercept, the log-odds of choosing condition_a for a typical
    participant and image with sides balanced. ``test`` picks how it is tested against 0:
    "pooled" (default; see ``PAIR_TEST_METHOD`` and docs/analysis.md for why): the SDs
    estimated once for the study by REML Laplace likelihood summed over the pairs
    (:func:`pooled_sds`), each pair's intercept and its SE at those SDs, Wald t with the
    component df (each factor's share of the variance with G - 1 df); a pair whose own REML
    fit's variance exceeds that by more than ``clustered.HETEROGENEITY_Z`` SEs (its spread
    is not the study's) keeps its own fit ("reml"). "reml": each pair's own SDs by REML
    Laplace likelihood, Wald t with Satterthwaite df (at least G - 1); "ml": the glmer
    fit (ML Laplace, Hessian SE), Wald t with Satterthwaite df; "ml-z": the glmer fit
    with a Wald z (liberal with few participants or images). df = inf (a z) when every SD
    is estimated at 0. p_holm: Holm over the pairs tested. ci_low/ci_high: the (1 -
    alpha) Wald interval in log-odds; rate_a/rate_low/rate_high: the same on the rate
    scale (expit). sd_participant/sd_image: random-intercept SDs (log-odds) of the fit
    tested; boundary: factors whose SD is estimated at 0. log_odds_ml/se_ml: the ML
    (glmer) estimate and SE. method: the test behind p, per pair. A pair with no finite
    estimate (all votes one way, fewer than two participants, a failed fit) has NaN and
    says why in ``reason``, which also notes a left-out side term or image factor. A pair
    with more than ``max_levels`` participants + images gets the two-way cluster-robust
    GLM (``analysis.clustered``) instead, named in ``method``. ``with_ml=False`` skips the
    ML fit that only fills log_odds_ml/se_ml when ``test="reml"`` (NaN then).
    """
    import pandas as pd

    from analysis.clustered import _pair_frame
    from analysis.intervals import holm_adjust

    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, got {test!r}")
    frame = _pair_frame(main, sides_recorded)
    rows = []
    for (a, b), group in frame.groupby(["condition_a", "condition_b"], sort=True):
        row = {
            "condition_a": a,
            "condition_b": b,
            "n_votes": len(group),
            "n_participants": group["participant"].nunique(),
            "n_images": group["image_id"].nunique(),
            "converged": False,
            "boundary": "",
            "method": "",
            "reason": "",
        }
        own_test = "reml" if test == "pooled" else test
        row.update(_pair_row(group, alpha, sides_recorded, own_test, max_levels, with_ml, row))
        rows.append(row)
    if test == "pooled":
        _pool_pairs(rows, alpha)
    else:  # the pooled fit's inputs are not needed
        for row in rows:
            row.pop("_inputs", None)
    table = pd.DataFrame(rows).reindex(columns=PAIR_TEST_COLUMNS)
    table["p_holm"] = holm_adjust(table["p"].to_numpy(dtype=float))
    for column in ("n_votes", "n_participants", "n_images"):
        table[column] = table[column].astype(np.int64)
    table["converged"] = table["converged"].astype(bool)
    for column in ("boundary", "method", "reason"):
        table[column] = table[column].fillna("").astype(object)
    return table


def _pair_row(group, alpha, sides_recorded, test, max_levels, with_ml, row) -> dict:
    """The fitted columns of one pair (or a reason)."""
    from analysis.clustered import _side_term_estimable

    y = group["win_a"].to_numpy(dtype=float)
    if y.min() == y.max():
        return {"reason": "all votes one way: the log-odds has no finite estimate"}
    if row["n_participants"] < 2:
        return {"reason": "fewer than 2 participants: no participant variance to test against"}
    notes = []
    columns = [np.ones(len(group))]
    names = ["(Intercept)"]
    if sides_recorded:
        if _side_term_estimable(group["a_left"], y):
            columns.append(group["a_left"].to_numpy(dtype=float))
            names.append("a_left")
        else:
            notes.append("side term left out (one side only, or it separates the votes)")
    X = np.column_stack(columns)
    groups = [group["participant"].to_numpy()]
    factors = ["participant"]
    if row["n_images"] >= 2:
        groups.append(group["image_id"].to_numpy())
        factors.append("image")
    else:
        notes.append("one image: image factor left out, inference is about that image")
    if row["n_participants"] + row["n_images"] > max_levels:
        return _cluster_row(y, X, group, alpha, notes, row)
    try:
        kwargs = {"names": tuple(names), "factors": tuple(factors)}
        ml = fit_glmm(y, X, groups, **kwargs) if test != "reml" or with_ml else None
        fit = fit_glmm(y, X, groups, reml=True, **kwargs) if test == "reml" else ml
    except (ValueError, np.linalg.LinAlgError, FloatingPointError) as error:
        return {"reason": "; ".join([*notes, f"fit failed: {error}"])}
    runaway = [f for f, sd in zip(fit.factors, fit.sd, strict=True) if sd > MAX_SD]
    if runaway:
        return {
            "reason": "; ".join(
                [
                    *notes,
                    f"the {' and '.join(runaway)} SD ran off (> {MAX_SD:g} log-odds): within "
                    "levels the votes are all one way, too few votes per level for the mixed "
                    "model",
                ]
            )
        }
    est, se = float(fit.beta[0]), float(fit.se[0])
    df = np.inf if test == "ml-z" else _test_df(fit)
    if not np.isfinite(se) or se <= 0 or np.isnan(df):
        return {"reason": "; ".join([*notes, "no standard error: " + (fit.message or "?")])}
    method = TESTS[test]
    if not np.isfinite(df) and test != "ml-z":
        method = method.replace("Wald t (Satterthwaite df >= G - 1)", "Wald z (every SD at 0)")
    if not fit.converged:
        notes.append(fit.message or "optimiser did not converge")
    sds = dict(zip(fit.factors, fit.sd, strict=True))
    return {
        "_inputs": (y, X, groups) if len(groups) == 2 else None,
        **_wald_columns(est, se, df, alpha),
        "df_components": float(fit.df_components[0]),
        "side_log_odds": float(fit.beta[1]) if len(names) > 1 else np.nan,
        "side_se": float(fit.se[1]) if len(names) > 1 else np.nan,
        "sd_participant": float(sds["participant"]),
        "sd_image": float(sds.get("image", np.nan)),
        "log_odds_ml": float(ml.beta[0]) if ml is not None else np.nan,
        "se_ml": float(ml.se[0]) if ml is not None else np.nan,
        "converged": fit.converged,
        "boundary": ",".join(f for f, at in zip(fit.factors, fit.boundary, strict=True) if at),
        "method": method,
        "reason": "; ".join(notes),
    }


def _wald_columns(est: float, se: float, df: float, alpha: float) -> dict:
    """The Wald t (z when ``df`` is inf) of a log-odds: statistic, p, the (1 - alpha)
    interval in log-odds (ci_*) and on the rate scale (rate_*)."""
    from scipy import stats

    statistic = est / se
    if np.isfinite(df):
        p = float(2 * stats.t.sf(abs(statistic), df))
        crit = float(stats.t.isf(alpha / 2, df))
    else:
        p = float(2 * stats.norm.sf(abs(statistic)))
        crit = float(stats.norm.isf(alpha / 2))
    return {
        "log_odds": est,
        "se": se,
        "statistic": statistic,
        "df": df,
        "p": p,
        "ci_low": est - crit * se,
        "ci_high": est + crit * se,
        "rate_a": float(special.expit(est)),
        "rate_low": float(special.expit(est - crit * se)),
        "rate_high": float(special.expit(est + crit * se)),
    }


def pair_model(y, X, groups) -> _Model:
    """The deviance machinery of one pair: y (0/1 per vote), X (votes x p fixed-effect
    design), groups (one label array per grouping factor)."""
    codes = np.column_stack([np.unique(g, return_inverse=True)[1].ravel() for g in groups])
    n_levels = codes.max(axis=0) + 1
    return _Model(_Design(*_collapse(np.asarray(y, float), np.ones(len(y)), X, codes), n_levels))


def pooled_sds(
    models: list[_Model], start: np.ndarray, reml: bool = True
) -> tuple[np.ndarray, list[tuple]]:
    """The random-intercept SDs (log-odds, one per factor) that minimise the restricted
    Laplace deviance summed over ``models`` (one per pair, ``pair_model``: each pair its
    own fixed effects and its own random intercepts, the SDs common), i.e. the study's
    SDs estimated from all its pairs at once; in lme4 terms ``y ~ 0 + pair + pair:a_left
    + (1|participant:pair) + (1|image:pair)``. ``reml=False``: the Laplace deviance with
    (beta, b) at their joint modes instead (glmer's ``nAGQ = 0`` fit of that model).
    Bounded Nelder-Mead from ``start``. Returns (SDs, each model's (beta, b) at its joint
    mode there). An SD below ``BOUNDARY_TOL`` is 0."""
    state = [(np.zeros(m.d.p), np.zeros(m.d.q)) for m in models]

    def deviance(theta):
        total = 0.0
        for j, model in enumerate(models):
            beta, b, value, ok, _ = model.pirls(theta, *state[j], joint=True, reml=reml)
            if ok and np.all(np.isfinite(b)):
                state[j] = (beta, b)
            total += value
        return total

    theta = _nelder_mead(deviance, np.maximum(start, RELEASE_SD), len(start))
    theta = np.where(theta < BOUNDARY_TOL, 0.0, theta)
    deviance(theta)
    return theta, state


def _fit_at_sds(model: _Model, theta, beta, b):
    """A pair's fixed effects at given SDs: (beta, their covariance from the Hessian over
    beta, each factor's share c_k = theta_k dV/dtheta_k / 2 of the intercept's variance),
    or None when the Hessian is not positive definite."""
    K = len(theta)
    _, beta, b, hess, ok, _ = _newton_stage(model, theta, beta, b, np.zeros(K, dtype=bool))
    if not ok:
        return None
    inverse = _spd_inverse(hess)
    cov = inverse + inverse.T
    share = np.zeros(K)
    idx = np.flatnonzero(theta > 0)
    if idx.size:
        share[idx] = theta[idx] * _variance_gradient(model, theta, beta, b, idx)[:, 0] / 2
    return beta, cov, share


def _pool_pairs(rows: list[dict], alpha: float) -> None:
    """Replace each fitted pair's own-SD test (``rows``, from ``_pair_row``) by the test at
    the study's pooled SDs (``pooled_sds``), in place, unless the pair's own variance
    exceeds the pooled one by more than ``HETEROGENEITY_Z`` SEs of a variance with
    G_images - 1 df (then its own fit stays, and ``reason`` says why)."""
    from analysis.clustered import HETEROGENEITY_Z

    fitted, inputs = [], []
    for row in rows:
        pair_inputs = row.pop("_inputs", None)
        if pair_inputs is not None:
            fitted.append(row)
            inputs.append(pair_inputs)
        elif np.isfinite(row.get("se", np.nan)) and row["method"].startswith("GLMM"):
            row["reason"] = _join(row["reason"], "own SDs (one image: nothing to pool)")
    if len(fitted) < 2:
        for row in fitted:
            row["reason"] = _join(row["reason"], "own SDs (no other pair to pool with)")
        return
    models = [pair_model(*pair_inputs) for pair_inputs in inputs]
    start = np.nanmedian([[r["sd_participant"], r["sd_image"]] for r in fitted], axis=0)
    theta, state = pooled_sds(models, np.where(np.isfinite(start), start, 0.1))
    for row, model, (beta, b) in zip(fitted, models, state, strict=True):
        at = _fit_at_sds(model, theta, beta, b)
        if at is None:
            row["reason"] = _join(row["reason"], "own SDs (no fit at the pooled SDs)")
            continue
        beta, cov, share = at
        variance = float(cov[0, 0])
        levels = np.maximum(model.d.n_levels - 1.0, 1.0)
        spread = float(np.sum(share**2 / levels))
        df = variance**2 / spread if spread > 0 else np.inf
        images = row["n_images"]
        if row["se"] ** 2 > variance * (1.0 + HETEROGENEITY_Z * np.sqrt(2.0 / (images - 1.0))):
            row["reason"] = _join(
                row["reason"],
                "own SDs: this pair's spread exceeds the study's pooled SDs "
                f"(participant {theta[0]:.3g}, image {theta[1]:.3g})",
            )
            continue
        row.update(_wald_columns(float(beta[0]), float(np.sqrt(variance)), df, alpha))
        row.update(
            df_components=df,
            side_log_odds=float(beta[1]) if len(beta) > 1 else np.nan,
            side_se=float(np.sqrt(cov[1, 1])) if len(beta) > 1 else np.nan,
            sd_participant=float(theta[0]),
            sd_image=float(theta[1]),
            boundary=",".join(
                f for f, sd in zip(("participant", "image"), theta, strict=True) if sd == 0
            ),
            method=TESTS["pooled"]
            if np.isfinite(df)
            else TESTS["pooled"].replace("Wald t (component df)", "Wald z (every SD at 0)"),
        )


def _join(text: str, note: str) -> str:
    return "; ".join(part for part in (text, note) if part)


def _test_df(fit: GLMMFit) -> float:
    """Degrees of freedom of the intercept's Wald t: Satterthwaite's, but at least G - 1,
    G the fewest levels among the factors whose SD is not 0 (inf when every SD is 0).

    The binomial variance is known, so var(beta) is a positive combination of the
    factors' variance estimates and its Satterthwaite df cannot be below the smallest of
    theirs (G_k - 1 for factor k); the Hessian-based df can fall below it with few
    levels (1.3 with 5 images in the pwcmp data), which only costs power. Without a
    Satterthwaite df (SDs' covariance unknown) G - 1 is used."""
    active = [g for g, at in zip(fit.n_levels, fit.boundary, strict=True) if not at]
    floor = min(active) - 1.0 if active else np.inf
    satterthwaite = float(fit.df[0])
    return floor if np.isnan(satterthwaite) else max(satterthwaite, floor)


def _cluster_row(y, X, group, alpha, notes, row) -> dict:
    """The two-way cluster-robust GLM for a pair too large for the dense GLMM."""
    import pandas as pd
    from scipy import stats

    from analysis.clustered import _cluster_robust_fit

    levels = row["n_participants"] + row["n_images"]
    notes = [*notes, f"GLMM skipped: {levels} participants + images"]
    codes = np.column_stack(
        [pd.factorize(group["participant"])[0], pd.factorize(group["image_id"])[0]]
    )
    fit, cov, clusters = _cluster_robust_fit(y, X, codes)
    if fit is None:
        return {"reason": "; ".join([*notes, cov])}
    est, se, df = float(fit.params[0]), float(fit.bse[0]), clusters - 1
    crit = float(stats.t.isf(alpha / 2, df))
    return {
        "log_odds": est,
        "se": se,
        "statistic": est / se,
        "df": float(df),
        "p": float(2 * stats.t.sf(abs(est / se), df)),
        "ci_low": est - crit * se,
        "ci_high": est + crit * se,
        "rate_a": float(special.expit(est)),
        "rate_low": float(special.expit(est - crit * se)),
        "rate_high": float(special.expit(est + crit * se)),
        "side_log_odds": float(fit.params[1]) if X.shape[1] > 1 else np.nan,
        "side_se": float(fit.bse[1]) if X.shape[1] > 1 else np.nan,
        "converged": True,
        "method": f"cluster-robust GLM, {cov}, t (G - 1 df)",
        "reason": "; ".join(notes),
    }
