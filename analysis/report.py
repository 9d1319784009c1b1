"""The whole analysis in one call, and writing its outputs.

``run_analysis(loaded, options) -> AnalysisResult`` (pure: no printing, no files);
``write_outputs(result, out_dir)`` writes tidy tables (CSV, Parquet, JSON, LaTeX),
figures (PNG), one self-contained HTML report and a plain-language summary. Every output
records the input hash and the options (``provenance``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import (
    agreement,
    clustered,
    glmm,
    jnd,
    metrics,
    planning,
    plots,
    pwcmp,
    scaling,
    timing,
)
from analysis.display import display_calibration_table
from analysis.formatting import format_number, format_p
from analysis.io import LoadedResponses
from analysis.pairs import preference_table
from analysis.qc import QCOptions, apply_exclusions, exclusion_note, exclusion_rules_table
from analysis.report_html import render_html


@dataclass(frozen=True)
class AnalysisOptions:
    """Options of one analysis run (all recorded in every output).

    alpha: two-sided level for tests and intervals. n_boot: bootstrap replicates per
    clustering of the scale intervals. anchor: condition fixed at 0 on the
    scales (None: mean zero). mixed: fit the per-pair crossed random-effects GLMM, the
    primary per-pair test (cost grows with the cube of participants + images per pair;
    without it the verdicts come from the two-way test of the share of votes).
    stimuli: stimulus set folder for metric-vs-human agreement. metrics: names (None:
    every available loss). planning_rates / power: votes-needed table. scale_prior:
    prior of the Thurstone (JOD) scales, "ours" (N(0, 3^2) per condition) or "pwcmp"
    (pwcmp's pw_scale model and prior, ``analysis.pwcmp``; adds scale_jod_by_image).
    loss_files: fitted-loss files scored as metrics too. fit_holdout: losses fitted on
    half of the images and scored on the other half (table metric_holdout). jnd_levels:
    a JND study's conditions' distortion levels for the psychometric fit.
    """

    alpha: float = 0.05
    n_boot: int = 500
    seed: int = 0
    anchor: str | None = None
    mixed: bool = True
    stimuli: str | None = None
    metrics: tuple[str, ...] | None = None
    planning_rates: tuple[float, ...] = (0.6, 0.65, 0.7, 0.75)
    power: float = 0.8
    qc: QCOptions = field(default_factory=QCOptions)
    qc_sources: dict[str, str] = field(default_factory=dict)  # rule setting -> its origin
    progress: bool = False
    scale_prior: str = "ours"
    loss_files: tuple[str, ...] = ()
    fit_holdout: tuple[str, ...] = ()
    jnd_levels: dict[str, float] | None = None  # JND: condition -> distortion level

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class AnalysisResult:
    """Tables (name -> tidy DataFrame), figures (name -> Figure), the plain-language
    summary, notes on methods and limits, and provenance (inputs, options, versions).
    ``study``: what the export says about the study (its settings; None for other
    inputs); ``design``: counts of the analysed main trials (n_images, n_conditions) for
    the report's methods paragraph."""

    tables: dict[str, pd.DataFrame]
    figures: dict[str, Figure]
    summary: str
    notes: list[str]
    provenance: dict
    study: dict | None = None
    design: dict = field(default_factory=dict)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("perceptual-study-platform", "numpy", "pandas", "scipy", "statsmodels"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _p_is(x: float, name: str = "p") -> str:
    """``name`` and an APA p-value as a sentence reads it: "p = .011", "p < .001";
    "no p" when there is none."""
    if not np.isfinite(x):
        return f"no {name}"
    text = format_p(x)
    return f"{name} {text}" if text[0] in "<>" else f"{name} = {text}"


def _holm_p(x: float) -> str:
    return _p_is(x, "Holm-adjusted p")


# The per-pair tables as the prose names them; a table's file (tables/<name>.csv) is
# named once, in parentheses, where the prose first mentions it.
MIXED_MODEL_TEST = "the mixed-model test per pair"
SHARE_OF_VOTES = "the share of votes per pair"


def _table_file(name: str) -> str:
    return f"table {name}.csv"


SCALE_PRIORS = {"ours": "gaussian", "pwcmp": "pwcmp"}  # --scale-prior -> scale_conditions prior
SCALE_PRIOR_TEXT = {
    "gaussian": f"our prior N(0, {scaling.THURSTONE_PRIOR_SD:g}^2) per condition",
    "pwcmp": "pwcmp's prior and model (pw_scale)",
}


def _methods(table: pd.DataFrame) -> str:
    """The tests named in a pair_tests_glmm table's method column, without the model."""
    names = [m.removeprefix("GLMM ") for m in table["method"].dropna().unique() if m]
    return "; ".join(names) if names else "no pair could be tested"


def plain_summary(tables: dict[str, pd.DataFrame], loaded: LoadedResponses, alpha: float) -> str:
    """A few sentences a non-statistician can read; numbers come from ``tables``."""
    parts = tables["participants"]
    kept = int((~parts["excluded"]).sum())
    excluded = int(parts["excluded"].sum())
    pairs = tables["pairs"]
    primary = "pair_tests_glmm" in tables
    tests = tables["pair_tests_glmm" if primary else "pairs"].set_index(
        ["condition_a", "condition_b"]
    )
    level = _pct(1 - alpha)
    lines = [
        f"Input: {loaded.source} ({loaded.input_format}), sha256 {loaded.input_sha256[:12]}.",
        f"{kept} participants kept, {excluded} excluded by the quality rules "
        f"({int(pairs['n'].sum())} main votes analysed).",
        (
            f"Verdicts below come from {MIXED_MODEL_TEST} ({_table_file('pair_tests_glmm')}), "
            "the primary test: a logistic mixed model with participants and images as crossed "
            f"random effects ({_methods(tests)}), its p-values Holm-adjusted over all pairs. "
            "Each line also gives the share of all votes "
            f"({_table_file('pairs')}) with its two-way interval and test (participants and "
            "images random)."
            if primary
            else "The mixed model was not fitted (--no-mixed): verdicts below come from "
            f"{SHARE_OF_VOTES} ({_table_file('pairs')}) with its two-way cluster-robust "
            "interval and t test (participants and images random), its p-values "
            "Holm-adjusted over all pairs."
        ),
    ]
    test_name = "mixed-model test" if primary else "share of votes, two-way test"
    low_col, high_col = ("rate_low", "rate_high") if primary else ("ci_low", "ci_high")
    for row in pairs.sort_values("p_holm").itertuples(index=False):
        key = (row.condition_a, row.condition_b)
        tested = tests.loc[key] if key in tests.index else None
        clustered_p = tested["p_holm"] if tested is not None else np.nan
        # the estimate and interval of the test that gives the verdict (same model, same
        # clusters), oriented towards the preferred condition
        rate = tested["rate_a"] if tested is not None else np.nan
        low = tested[low_col] if tested is not None else np.nan
        high = tested[high_col] if tested is not None else np.nan
        a_wins = (rate >= 0.5) if np.isfinite(rate) else (row.rate_a >= 0.5)
        win, lose = (
            (row.condition_a, row.condition_b) if a_wins else (row.condition_b, row.condition_a)
        )
        pooled = row.rate_a if a_wins else 1 - row.rate_a
        pooled_low, pooled_high = (
            (row.ci_low, row.ci_high) if a_wins else (1 - row.ci_high, 1 - row.ci_low)
        )
        if not a_wins:
            rate, low, high = 1 - rate, 1 - high, 1 - low
        if not np.isfinite(clustered_p):
            if primary:
                reason = tests.loc[key, "reason"] if key in tests.index else ""
                why = reason if isinstance(reason, str) and reason else "no estimate"
            else:
                why = "no spread between participants and images, e.g. all votes one way"
            share = (
                f" Share of all votes: {level} CI {_pct(pooled_low)}–{_pct(pooled_high)}, "
                f"two-way test {_holm_p(row.p_holm)}."
                if primary and np.isfinite(row.p_holm)
                else ""
            )
            lines.append(
                f"{win} was chosen over {lose} in {_pct(pooled)} of {row.n} trials: mixed-model "
                f"test not available ({why}).{share}"
                if primary
                else f"{win} was chosen over {lose} in {_pct(pooled)} of {row.n} trials: "
                f"clustered test not available ({why})."
            )
            continue
        verdict = "a reliable preference" if clustered_p < alpha else "not a reliable difference"
        typical = " for a typical participant and image" if primary else " of all votes"
        also = (
            f" (Share of all votes: {_pct(pooled)} of {row.n} trials, {level} CI "
            f"{_pct(pooled_low)}–{_pct(pooled_high)}, two-way test {_holm_p(row.p_holm)}.)"
            if primary
            else ""
        )
        lines.append(
            f"{win} over {lose}: {test_name} with participants and images random, "
            f"{_pct(rate)}{typical} ({level} CI {_pct(low)}–{_pct(high)}, "
            f"{_holm_p(clustered_p)}): {verdict}.{also}"
        )
    scale = tables["scale_jod"].sort_values("estimate", ascending=False)
    ranking = ", ".join(f"{r.condition} ({r.estimate:+.2f})" for r in scale.itertuples())
    prior = f"; {SCALE_PRIOR_TEXT[scale['prior'].iloc[0]]}" if "prior" in scale else ""
    lines.append(f"Quality scale (JOD; 1 JOD = 75 % preference{prior}), best first: {ranking}.")
    if "position_bias" in tables:
        pb = tables["position_bias"].iloc[0]
        lines.append(
            f"The left image was chosen in {_pct(pb.left_rate)} of main trials "
            f"({_p_is(pb.p_value)})."
        )
    else:
        lines.append("Sides (left/right) were not recorded, so position bias was not assessed.")
    if "agreement" in tables:
        lines.append(_agreement_sentence(tables["agreement"]))
    if "metric_agreement" in tables and not tables["metric_agreement"].empty:
        best = tables["metric_agreement"].iloc[0]
        lines.append(
            f"Of the image metrics, {best.metric} predicted these judgments best (2AFC score "
            f"{best.score_2afc:.3f}; human ceiling {best.human_ceiling:.3f})."
        )
    sens = tables.get("pairs_everyone")
    if sens is not None and excluded:
        lines.append(
            "Sensitivity: with everyone kept, the direction of every pair's preference is "
            + (
                "unchanged."
                if np.all(
                    np.sign(sens.set_index(["condition_a", "condition_b"])["rate_a"] - 0.5)
                    .reindex(pairs.set_index(["condition_a", "condition_b"]).index)
                    .to_numpy()
                    == np.sign(pairs["rate_a"] - 0.5).to_numpy()
                )
                else "NOT the same for every pair (see the share of votes with everyone "
                f"kept, {_table_file('pairs_everyone')})."
            )
        )
    return "\n".join(lines) + "\n"


def _agreement_sentence(table: pd.DataFrame) -> str:
    """The agreement table (``agreement.agreement_table``) in words: each statistic by its
    name (Fleiss' κ, Kendall's u), 3 significant digits."""
    values = ", ".join(
        f"{agreement.STATISTIC_LABELS.get(row.statistic, row.statistic)} "
        + (f"= {format_number(row.value)}" if np.isfinite(row.value) else "not available")
        for row in table.itertuples(index=False)
    )
    return f"Agreement between participants (1 = all agree on every item): {values}."


def pair_table(main: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """The report's per-pair table: votes, wins and share of votes for condition_a with
    Cohen's h (``preference_table``), and the two-way interval and test of that share
    (``clustered.two_way_rate_tests``: se, df, ci_low, ci_high, p_value, p_holm, p_bh,
    interval). The pooled Wilson/Clopper–Pearson intervals and exact binomial tests are
    left out: they treat votes as independent and miss their level when participants or
    images differ (docs/analysis.md)."""
    counts = preference_table(main, alpha)[
        ["condition_a", "condition_b", "n", "wins_a", "rate_a", "cohens_h"]
    ]
    tested = clustered.two_way_rate_tests(main, alpha)
    if tested.empty:
        return counts
    tested = tested.drop(columns=["n", "wins_a", "rate_a"])
    return counts.merge(tested, on=["condition_a", "condition_b"], how="left")


def _marked_pairs(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The pairs table with p_holm taken from the primary test (GLMM), or its own two-way
    test without it, so the figure's asterisks follow the verdicts."""
    source = tables.get("pair_tests_glmm", tables["pairs"])
    tested = source.set_index(["condition_a", "condition_b"])["p_holm"]
    keys = pd.MultiIndex.from_frame(tables["pairs"][["condition_a", "condition_b"]])
    return tables["pairs"].assign(p_holm=tested.reindex(keys).to_numpy())


def _mark_label(tables: dict[str, pd.DataFrame]) -> str:
    return "GLMM Holm p" if "pair_tests_glmm" in tables else "two-way test Holm p"


def _provenance(loaded: LoadedResponses, options: AnalysisOptions) -> dict:
    """What an analysis read (inputs with their hashes), its options and versions."""
    provenance = {
        "tool": "pstudy analyze",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "inputs": [
            {
                "source": loaded.source,
                "format": loaded.input_format,
                "sha256": loaded.input_sha256,
                "rows": len(loaded.frame),
                "filled_columns": loaded.filled_columns,
            }
        ],
        "options": options.as_dict(),
        "versions": _versions(),
    }
    if options.stimuli:
        manifest = Path(options.stimuli) / "manifest.json"
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
        provenance["inputs"].append(
            {"source": str(options.stimuli), "format": "stimulus-set", "manifest_sha256": digest}
        )
    return provenance


def _timing_table(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``exposure_accuracy`` for a study with frame-timed exposures (else nothing)."""
    table = timing.exposure_accuracy(frame)
    return {} if table.empty else {"exposure_accuracy": table}


def _jnd_tables(trials: pd.DataFrame, options: AnalysisOptions) -> dict[str, pd.DataFrame]:
    """The JND tables of the kept participants' answers: jnd_rates, with levels
    jnd_levels and jnd_psychometric, with a stimulus set jnd_metric_ap (and the
    metric_distances / jnd_metric_status it used)."""
    rates = jnd.different_rates(trials, 1 - options.alpha)
    tables = {"jnd_rates": rates}
    if options.jnd_levels:
        tables["jnd_levels"] = jnd.level_rates(rates, options.jnd_levels)
        tables["jnd_psychometric"] = jnd.psychometric_fit(trials, options.jnd_levels)
    if options.stimuli:
        names = list(options.metrics) if options.metrics else None
        distances, status = metrics.metric_distances(
            options.stimuli, names, options.progress, options.loss_files
        )
        tables.update(
            metric_distances=distances,
            jnd_metric_status=status,
            jnd_metric_ap=jnd.metric_average_precision(trials, distances),
        )
    return tables


def _run_jnd_analysis(
    loaded: LoadedResponses, options: AnalysisOptions, qc, trials: pd.DataFrame
) -> AnalysisResult:
    """A JND study (no 2AFC answers): quality control, the share of "different" per
    condition, the psychometric fit and metric agreement (``_jnd_tables``), exposure
    accuracy; no pairs or scales."""
    tables: dict[str, pd.DataFrame] = {
        "participants": qc.participants,
        "exclusion_log": qc.log,
        "exclusion_rules": exclusion_rules_table(qc, options.qc_sources),
        **_jnd_tables(trials, options),
        **_timing_table(loaded.frame),
    }
    study_name = (loaded.export_provenance or {}).get("study")
    notes = [
        exclusion_note(qc, options.qc_sources, study_name),
        f'The share of "different" answers per condition ({_table_file("jnd_rates")}): '
        + jnd.JND_RATE_METHOD
        + ".",
        "Main and repeated answers of the kept participants enter the JND tables; catch "
        "trials (the reference twice) give the false-alarm row.",
    ]
    if options.jnd_levels:
        notes.append(
            "Psychometric function: logistic in the distortion level, maximum "
            "likelihood (statsmodels GLM, binomial); answers as independent."
        )
    summary = jnd_summary(tables, loaded, options.alpha)
    design = {
        "n_images": int(trials["image_id"].nunique()),
        "n_conditions": int(
            trials.loc[trials["condition"] != jnd.IDENTICAL, "condition"].nunique()
        ),
    }
    figures = {"participant_qc": plots.participant_qc_figure(qc.participants)}
    return AnalysisResult(
        tables,
        figures,
        summary,
        notes,
        _provenance(loaded, options),
        loaded.export_provenance,
        design,
    )


def jnd_summary(tables: dict[str, pd.DataFrame], loaded: LoadedResponses, alpha: float) -> str:
    """A few plain sentences on a JND study; numbers come from ``tables``."""
    parts = tables["participants"]
    rates = tables["jnd_rates"]
    level = _pct(1 - alpha)
    lines = [
        f"Input: {loaded.source} ({loaded.input_format}), sha256 {loaded.input_sha256[:12]}.",
        f"{int((~parts['excluded']).sum())} participants kept, {int(parts['excluded'].sum())} "
        f"excluded by the quality rules ({int(rates['n'].sum())} same/different answers "
        "analysed).",
    ]
    for row in rates.sort_values("rate_different", ascending=False).itertuples(index=False):
        what = (
            "the reference shown twice"
            if row.condition == jnd.IDENTICAL
            else f"{row.condition} against its reference"
        )
        interval = (
            f"{level} CI {_pct(row.ci_low)}–{_pct(row.ci_high)}, participants and images random"
            if np.isfinite(row.ci_low)
            else "no interval: every answer the same"
        )
        lines.append(
            f'{what}: "different" in {_pct(row.rate_different)} of {row.n} answers ({interval}).'
        )
    if "jnd_psychometric" in tables:
        fit = tables["jnd_psychometric"].iloc[0]
        lines.append(
            f'Psychometric fit: "different" half of the time at level '
            f"{fit.threshold:.3g} (spread {fit.spread:.3g} levels)."
        )
    if "jnd_metric_ap" in tables and not tables["jnd_metric_ap"].empty:
        best = tables["jnd_metric_ap"].iloc[0]
        lines.append(
            f'Of the image metrics, {best.metric} predicted "different" best '
            f"(average precision {best.average_precision:.3f}; chance "
            f"{best.chance:.3f})."
        )
    if "exposure_accuracy" in tables:
        timed = tables["exposure_accuracy"]
        share = float((timed["within_one_frame"] * timed["n"]).sum() / timed["n"].sum())
        lines.append(
            f"Frame-timed presentation: {_pct(share)} of timed phases within one "
            "frame of the request."
        )
    return "\n".join(lines) + "\n"


def run_analysis(loaded: LoadedResponses, options: AnalysisOptions | None = None) -> AnalysisResult:
    """Every layer of the analysis (QC, pairs, clustered inference, scales, bias,
    agreement, metrics, planning) on validated responses. No printing, no files."""
    options = options or AnalysisOptions()
    if options.scale_prior not in SCALE_PRIORS:
        raise ValueError(
            f"scale_prior must be one of {', '.join(SCALE_PRIORS)}, got {options.scale_prior!r}"
        )
    jod_prior = SCALE_PRIORS[options.scale_prior]
    frame = loaded.frame
    qc = apply_exclusions(frame, options.qc, loaded.sides_recorded)
    main = qc.kept
    excluded = set(qc.participants.loc[qc.participants["excluded"], "participant"])
    jnd_kept = jnd.jnd_trials(frame[~frame["participant"].isin(excluded)])
    if main.empty and not jnd_kept.empty:
        return _run_jnd_analysis(loaded, options, qc, jnd_kept)
    if main.empty:
        raise ValueError(
            "no main trials left after exclusions; relax the QC rules (see the exclusion log)"
        )
    if main["condition_left"].nunique() + main["condition_right"].nunique() < 2:
        raise ValueError("the main trials compare fewer than two conditions")
    if jod_prior == "gaussian":
        jod_note = (
            f"Scales: Thurstone Case V in JOD with a N(0, {scaling.THURSTONE_PRIOR_SD:g}^2) "
            "prior (ours; --scale-prior ours); "
        )
    else:
        jod_note = (
            "Scales: Thurstone Case V in JOD as pwcmp's pw_scale (--scale-prior pwcmp): "
            f"{pwcmp.PRIOR_DESCRIPTION['pwcmp']}; "
            + ("mean zero" if options.anchor is None else f"{options.anchor} at 0")
            + " (scale_jod_by_image: per image and pooled, mean zero); the outlier score and the "
            "split-half reliability still use our N(0, "
            f"{scaling.THURSTONE_PRIOR_SD:g}^2) prior; "
        )
    notes = [
        f"{SHARE_OF_VOTES.capitalize()} ({_table_file('pairs')}): the share of all votes "
        "for condition A, with an interval and a t test against 50 % that count "
        "participants and images as random ("
        + clustered.TWO_WAY_RATE_METHOD
        + "); it estimates the population preference rate.",
        (
            f"The primary test, {MIXED_MODEL_TEST} ({_table_file('pair_tests_glmm')}): "
            + glmm.PAIR_TEST_METHOD
            if options.mixed
            else f"{MIXED_MODEL_TEST.capitalize()} was not fitted (--no-mixed); verdicts "
            f"use the two-way test of {SHARE_OF_VOTES}."
        ),
        "Holm (family-wise) and Benjamini–Hochberg (FDR) adjust over all condition pairs.",
        jod_note + "Bradley–Terry in logits by maximum likelihood (ridge alpha "
        f"{scaling.AUTO_ALPHA:g} only when the win graph is not strongly connected). "
        "Scale intervals and significance matrices (Holm) count participants and images as "
        f"random: {options.n_boot} bootstrap replicates each over participants, images and "
        "(participant, image) cells, combined as V_participants + V_images - V_cells (never "
        "below V_cells), Student t with Satterthwaite degrees of freedom (column interval).",
        "Observer outlier score: (Q1 - L) / IQR of each observer's leave-one-out mean "
        "log-likelihood; >= 1.5 is worth a look.",
    ]
    study_name = (loaded.export_provenance or {}).get("study")
    notes.insert(0, exclusion_note(qc, options.qc_sources, study_name))
    adaptive = adaptive_design_note(loaded.export_provenance)
    if adaptive:
        notes.insert(1, adaptive)
    if not loaded.sides_recorded:
        notes.append("Sides were not recorded in this input: no position-bias analysis.")
    tables: dict[str, pd.DataFrame] = {
        "participants": qc.participants,
        "exclusion_log": qc.log,
        "exclusion_rules": exclusion_rules_table(qc, options.qc_sources),
        "pairs": pair_table(main, options.alpha),
        "pairs_everyone": pair_table(qc.everyone, options.alpha),
    }
    calibration = display_calibration_table(frame)
    if calibration is not None:
        tables["display_calibration"] = calibration
    if options.mixed:
        tables["pair_tests_glmm"] = glmm.glmm_pair_tests(main, options.alpha, loaded.sides_recorded)
    level = 1 - options.alpha
    jod = scaling.scale_conditions(
        main,
        "thurstone",
        prior=jod_prior,
        anchor=options.anchor,
        n_boot=options.n_boot,
        level=level,
        seed=options.seed,
        progress=options.progress,
    )
    bt = scaling.scale_conditions(
        main,
        "bt",
        anchor=options.anchor,
        n_boot=options.n_boot,
        level=level,
        seed=options.seed,
        progress=options.progress,
    )
    jod_all = scaling.scale_conditions(
        qc.everyone,
        "thurstone",
        prior=jod_prior,
        anchor=options.anchor,
        n_boot=options.n_boot,
        level=level,
        seed=options.seed,
    )
    if not bt.strongly_connected:
        notes.append("The win graph is not strongly connected: Bradley–Terry was regularised.")
    tables.update(
        {
            "scale_jod": jod.scale.assign(prior=jod_prior),
            "significance_jod": jod.significance,
            "scale_bt": bt.scale,
            "significance_bt": bt.significance,
            "scale_jod_everyone": jod_all.scale.assign(prior=jod_prior),
            "reliability": scaling.split_half_reliability(main, seed=options.seed),
            "agreement": agreement.agreement_table(main),
        }
    )
    if jod_prior == "pwcmp":
        # pwcmp users scale each scene on its own: point estimates per image, and pooled
        tables["scale_jod_by_image"] = pwcmp.pw_scale_groups(main, by="image_id")
    if loaded.sides_recorded:
        tables["position_bias"], tables["position_bias_participants"] = agreement.position_bias(
            main, options.alpha
        )
    per_pair, icc = planning.estimate_icc(main)
    tables["planning"] = planning.planning_table(
        options.planning_rates, options.alpha, options.power, per_pair, icc
    )
    tables["planning"]["votes_for_halfwidth_0.05"] = planning.votes_for_halfwidth(
        0.05, 0.5, options.alpha
    )
    if options.stimuli:
        names = list(options.metrics) if options.metrics else None
        distances, status = metrics.metric_distances(
            options.stimuli, names, options.progress, options.loss_files
        )
        tables["metric_distances"] = distances
        tables["metric_status"] = status
        tables["metric_agreement"] = metrics.metric_agreement(
            main, distances, options.n_boot, options.seed, options.alpha
        )
        if options.fit_holdout:
            tables["metric_holdout"] = metrics.fit_holdout(
                main,
                options.stimuli,
                options.fit_holdout,
                seed=options.seed,
                alpha=options.alpha,
                progress=options.progress,
            )
    figures = {
        "preference_matrix": plots.preference_matrix_figure(
            _marked_pairs(tables), options.alpha, _mark_label(tables)
        ),
        "scale_jod": plots.scale_figure(jod.scale, "JOD"),
        "scale_bt": plots.scale_figure(bt.scale, "logit"),
        "participant_qc": plots.participant_qc_figure(qc.participants),
    }
    provenance = _provenance(loaded, options)
    tables.update(_jnd_tables(jnd_kept, options) if not jnd_kept.empty else {})
    tables.update(_timing_table(frame))
    summary = plain_summary(tables, loaded, options.alpha)
    design = {
        "n_images": int(main["image_id"].nunique()),
        "n_conditions": int(pd.concat([main["condition_left"], main["condition_right"]]).nunique()),
    }
    return AnalysisResult(
        tables, figures, summary, notes, provenance, loaded.export_provenance, design
    )


def _jsonable(value):
    if isinstance(value, float | np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _records(table: pd.DataFrame) -> list[dict]:
    return [{k: _jsonable(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def _png(fig: Figure, provenance_line: str) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, metadata={"Description": provenance_line})
    return buffer.getvalue()


def write_outputs(result: AnalysisResult, out_dir: str | Path, pdf: bool = False) -> dict[str, str]:
    """Write everything under ``out_dir``; returns {relative path: sha256}.

    tables/<name>.csv (a plain CSV: ``pd.read_csv(path)``; its provenance in the sidecar
    ``<name>.csv.provenance.json``), .parquet (provenance in the schema metadata),
    .json ({"provenance", "rows"}), .tex (provenance as % comment); figures/<name>.png
    (provenance in the PNG Description); report.html (self-contained), summary.txt,
    provenance.json (options, inputs, and every file's hash); with ``pdf``, report.pdf
    printed from report.html by Chromium (``analysis.report_pdf``; raises its
    ``PdfUnavailable`` after writing everything else).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    line = json.dumps(result.provenance, sort_keys=True, default=str)
    written: dict[str, bytes] = {}
    for name, table in result.tables.items():
        clean = table.copy()
        for column in clean.columns:
            if clean[column].dtype == object or str(clean[column].dtype).startswith("str"):
                clean[column] = clean[column].astype(object).where(clean[column].notna(), None)
                clean[column] = clean[column].map(lambda v: v if v is None else str(v))
        written[f"tables/{name}.csv"] = clean.to_csv(index=False).encode()
        written[f"tables/{name}.csv.provenance.json"] = (line + "\n").encode()
        arrow = pa.Table.from_pandas(clean, preserve_index=False)
        arrow = arrow.replace_schema_metadata(
            {**(arrow.schema.metadata or {}), b"pstudy_provenance": line.encode()}
        )
        sink = pa.BufferOutputStream()
        pq.write_table(arrow, sink)
        written[f"tables/{name}.parquet"] = sink.getvalue().to_pybytes()
        written[f"tables/{name}.json"] = json.dumps(
            {"provenance": result.provenance, "table": name, "rows": _records(clean)},
            indent=1,
            default=str,
        ).encode()
        latex = clean.to_latex(index=False, float_format="%.4g", na_rep="--", escape=True)
        written[f"tables/{name}.tex"] = ("% " + line.replace("\n", " ") + "\n" + latex).encode()
    images = {}
    for name, fig in result.figures.items():
        data = _png(fig, line)
        written[f"figures/{name}.png"] = data
        images[name] = data
    summary = result.summary + "\nProvenance: " + line + "\n"
    written["summary.txt"] = summary.encode()
    written["report.html"] = render_html(result, images).encode()
    hashes = {}
    for rel, data in written.items():
        (out / rel).write_bytes(data)
        hashes[rel] = hashlib.sha256(data).hexdigest()
    pdf_error = None
    if pdf:
        from analysis.report_pdf import PdfUnavailable, render_pdf

        try:
            data = render_pdf(out / "report.html", out / "report.pdf").read_bytes()
            hashes["report.pdf"] = hashlib.sha256(data).hexdigest()
        except PdfUnavailable as exc:  # everything else is written and hashed first
            pdf_error = exc
    (out / "provenance.json").write_text(
        json.dumps({**result.provenance, "outputs": hashes}, indent=1, default=str)
    )
    if pdf_error is not None:
        raise pdf_error
    return hashes


def adaptive_design_note(export_provenance: dict | None) -> str | None:
    """The note for a study whose pairs were chosen adaptively (``design: active`` in the
    export's study configuration), else None."""
    config = (export_provenance or {}).get("study_config") or {}
    if config.get("design") != "active":
        return None
    return (
        "Active design: the study chose each next pair by expected information gain from "
        "the votes so far, so the number of votes per pair was chosen adaptively (pairs far "
        "apart got few). The scale estimates (maximum likelihood of all votes) remain valid "
        "under such a design; per-pair rates and tests are conditional on counts the design "
        "chose, and pairs with few votes have wide intervals. Column info_gain of the "
        "export records why each trial was chosen."
    )
