"""Simulated crossed-design studies and an lme4 reference for the GLMM tests and bench.

``simulate_crossed`` differs from ``analysis.simulation.simulate_responses`` in its random
effects: every participant and every image shifts every condition's quality by its own
draw (per-(participant, condition) and per-(image, condition) effects), so a pair's
difference varies by participant with SD sqrt(2) * participant_sd and by image with SD
sqrt(2) * image_sd, independently across pairs that share no condition.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

JOD_SIGMA = 1.4826


def simulate_crossed(
    qualities: Mapping[str, float],
    n_participants: int = 20,
    n_images: int = 10,
    trials_per_participant: int = 60,
    *,
    participant_sd: float = 0.0,
    image_sd: float = 0.0,
    left_bias: float = 0.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Main trials of a 2AFC study (Thurstone, JOD units): P(first chosen) =
    Phi((q_first - q_second + a[p, first] - a[p, second] + g[i, first] - g[i, second]
    + left_bias) / 1.4826), a ~ N(0, participant_sd^2), g ~ N(0, image_sd^2). Pairs and
    images uniform at random, the first condition shown on the left."""
    rng = np.random.default_rng(seed)
    names = np.array(list(qualities), dtype=object)
    q = np.array([qualities[c] for c in names], dtype=float)
    c = len(names)
    total = n_participants * trials_per_participant
    participant = np.repeat(np.arange(n_participants), trials_per_participant)
    image = rng.integers(0, n_images, total)
    first = rng.integers(0, c, total)
    second = (first + rng.integers(1, c, total)) % c
    a = rng.normal(0.0, 1.0, (n_participants, c)) * participant_sd
    g = rng.normal(0.0, 1.0, (n_images, c)) * image_sd
    diff = (
        q[first]
        - q[second]
        + a[participant, first]
        - a[participant, second]
        + g[image, first]
        - g[image, second]
        + left_bias
    )
    chose_first = rng.random(total) < stats.norm.cdf(diff / JOD_SIGMA)
    left, right = names[first], names[second]
    pw = len(str(max(n_participants - 1, 0)))
    iw = len(str(max(n_images - 1, 0)))
    return pd.DataFrame(
        {
            "participant": [f"p{i:0{pw}d}" for i in participant],
            "trial_kind": "main",
            "image_id": [f"img{i:0{iw}d}" for i in image],
            "condition_left": left,
            "condition_right": right,
            "choice": np.where(chose_first, "left", "right"),
            "chosen_condition": np.where(chose_first, left, right),
        }
    )


def small_report_study(folder: Path):
    """The report tests' study, loaded: 3 conditions (a 0, b 0.4, c 1.2 JOD), 12
    participants, 6 images, 30 trials each (``simulate_responses``, seed 9) as a CSV in
    ``folder``; returns ``analysis.io.load_responses`` of it."""
    from analysis.io import load_responses
    from analysis.simulation import simulate_responses

    path = folder / "responses.csv"
    simulate_responses(
        {"a": 0.0, "b": 0.4, "c": 1.2}, 12, 6, 30, observer_sd=0.3, image_sd=0.2, seed=9
    ).to_csv(path, index=False)
    return load_responses(path)


def rscript_with_lme4() -> bool:
    """True when Rscript runs and loads lme4."""
    if shutil.which("Rscript") is None:
        return False
    done = subprocess.run(
        ["Rscript", "-e", "suppressMessages(library(lme4))"], capture_output=True, timeout=120
    )
    return done.returncode == 0


GLMER_SCRIPT = r"""
suppressMessages(library(lme4))
cat("dataset,name,estimate,se,se_conditional\n")
for (arg in commandArgs(trailingOnly = TRUE)) {
  parts <- strsplit(arg, "=", fixed = TRUE)[[1]]
  d <- read.csv(parts[2])
  d$participant <- factor(d$participant)
  d$image <- factor(d$image)
  form <- if ("a_left" %in% names(d)) y ~ 1 + a_left + (1 | participant) + (1 | image) else
    y ~ 1 + (1 | participant) + (1 | image)
  fit <- glmer(form, data = d, family = binomial)
  vc <- as.data.frame(VarCorr(fit))
  b <- fixef(fit)
  se <- sqrt(diag(as.matrix(vcov(fit))))
  sec <- sqrt(diag(as.matrix(vcov(fit, use.hessian = FALSE))))
  out <- function(name, est, s = NA, sc = NA)
    cat(sprintf("%s,%s,%.10g,%.10g,%.10g\n", parts[1], name, est, s, sc))
  for (i in seq_along(b)) out(names(b)[i], b[i], se[i], sec[i])
  for (g in c("participant", "image")) out(paste0("sd_", g), vc$sdcor[vc$grp == g])
  out("loglik", as.numeric(logLik(fit)))
  out("singular", as.integer(isSingular(fit)))
}
"""


def glmer_reference(frames: list[pd.DataFrame], folder: Path) -> list[pd.Series]:
    """glmer(y ~ 1 [+ a_left] + (1|participant) + (1|image), family = binomial) through
    Rscript, one fit per frame (columns y, participant, image, and a_left when the model
    has the side term), all in one R session. For each frame a Series: "(Intercept)",
    "a_left", "sd_participant", "sd_image", "loglik", "singular", and for the fixed
    effects "<name>_se" (vcov: Hessian) and "<name>_se_conditional" (use.hessian = FALSE).
    """
    folder = Path(folder)
    script = folder / "glmer.R"
    script.write_text(GLMER_SCRIPT)
    args = []
    for index, frame in enumerate(frames):
        path = folder / f"data{index}.csv"
        frame.to_csv(path, index=False)
        args.append(f"{index}={path}")
    done = subprocess.run(
        ["Rscript", str(script), *args], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"Rscript failed: {done.stderr[-2000:]}")
    table = pd.read_csv(io.StringIO(done.stdout))
    results = []
    for index in range(len(frames)):
        part = table[table["dataset"] == index].set_index("name")
        out = part["estimate"].astype(float).to_dict()
        for name in ("(Intercept)", "a_left"):
            if name in part.index:
                out[f"{name}_se"] = float(part.loc[name, "se"])
                out[f"{name}_se_conditional"] = float(part.loc[name, "se_conditional"])
        results.append(pd.Series(out))
    return results
