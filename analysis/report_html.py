"""The analysis report as a paper's results section: one self-contained HTML page.

Numbered sections (``REPORT_SECTIONS``), numbered tables and figures with captions that
say what is shown, n, and what the intervals are; an auto-written methods paragraph from
the study's settings (``methods_paragraphs``); numbers and headers from
``analysis.formatting``. Responsive (tables scroll inside their own box, the page never
scrolls sideways) with print CSS for ``report.pdf``. Presentation only: every number comes
from ``AnalysisResult.tables``.

To drop a table or figure from the report, delete its one entry in ``REPORT_SECTIONS``;
numbering follows what is shown.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from math import comb
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis.agreement import STATISTIC_LABELS
from analysis.formatting import display_table, format_number

if TYPE_CHECKING:
    from analysis.report import AnalysisResult

esc = html.escape


@dataclass(frozen=True)
class TableEntry:
    """A table of ``result.tables[name]``: caption (a format string over the report
    context, see :func:`report_context`), the columns shown (None: all; the CSV keeps
    all), and words for a column's machine-readable keys ({column: {key: label}}; the CSV
    keeps the keys)."""

    name: str
    caption: str
    columns: tuple[str, ...] | None = None
    value_labels: Mapping[str, Mapping[str, str]] | None = None


@dataclass(frozen=True)
class FigureEntry:
    """A figure of ``result.figures[name]`` with its caption (format string)."""

    name: str
    caption: str


@dataclass(frozen=True)
class Subsection:
    title: str
    items: tuple
    intro: str = ""


@dataclass(frozen=True)
class Section:
    """A numbered section: ``text`` writes its prose (HTML) from the result and the
    context; ``items`` are its tables, figures and subsections, in order."""

    key: str
    title: str
    items: tuple = ()
    text: Callable[[AnalysisResult, dict], str] | None = None


# ----------------------------------------------------------------------------- context


def _first(table: pd.DataFrame | None, column: str, default: str = "") -> str:
    if table is None or column not in table or table[column].dropna().empty:
        return default
    return str(table[column].dropna().iloc[0])


def report_context(result: AnalysisResult) -> dict[str, Any]:
    """Numbers the captions and prose quote, all from ``result`` (format-ready strings)."""
    options = result.provenance.get("options", {})
    alpha = float(options.get("alpha", 0.05))
    parts = result.tables["participants"]
    pairs = result.tables.get("pairs", NO_PAIRS)  # none in a JND study
    everyone = result.tables.get("pairs_everyone", pairs)
    jnd_rates = result.tables.get("jnd_rates")
    conditions = sorted(
        set(pairs["condition_a"].astype(str)) | set(pairs["condition_b"].astype(str))
    )
    anchor = options.get("anchor")
    return {
        "alpha": f"{alpha:g}".removeprefix("0"),  # APA: α = .05
        "level": f"{100 * (1 - alpha):g} %",
        "n_total": len(parts),
        "n_kept": int((~parts["excluded"].astype(bool)).sum()),
        "n_excluded": int(parts["excluded"].astype(bool).sum()),
        "n_votes": f"{int(pairs['n'].sum()):,}",
        "n_jnd": f"{int(jnd_rates['n'].sum()):,}" if jnd_rates is not None else "0",
        "n_votes_all": f"{int(everyone['n'].sum()):,}",
        "n_pairs": len(pairs),
        "n_conditions": len(conditions),
        "conditions": ", ".join(conditions),
        "n_boot": options.get("n_boot", "–"),
        "power": format_number(float(options.get("power", 0.8))),
        "mark_label": "the mixed-model test's Holm-adjusted p"
        if "pair_tests_glmm" in result.tables
        else "the two-way test's Holm-adjusted p",
        "anchor": "mean zero" if anchor is None else f"{anchor} fixed at 0",
        "jod_interval": _first(result.tables.get("scale_jod"), "interval", "see Table"),
        "bt_interval": _first(result.tables.get("scale_bt"), "interval", "see Table"),
    }


# ----------------------------------------------------------------------------- sections

NO_PAIRS = pd.DataFrame(columns=["condition_a", "condition_b", "n"])
JND_RATE_COLUMNS = (
    "condition",
    "n",
    "n_participants",
    "n_images",
    "n_different",
    "rate_different",
    "ci_low",
    "ci_high",
    "df",
)

QC_COLUMNS = (
    "participant",
    "status",
    "n_main",
    "catch_accuracy",
    "repeat_consistency",
    "side_rate",
    "median_rt_ms",
    "fast_fraction",
    "outlier_score",
    "reasons",
)
GLMM_COLUMNS = (
    "condition_a",
    "condition_b",
    "n_votes",
    "n_participants",
    "n_images",
    "rate_a",
    "rate_low",
    "rate_high",
    "log_odds",
    "se",
    "df",
    "p",
    "p_holm",
    "reason",
)
# the report's pairs table (report.pair_table); the CSV keeps se and the interval text
PAIR_COLUMNS = (
    "condition_a",
    "condition_b",
    "n",
    "wins_a",
    "rate_a",
    "ci_low",
    "ci_high",
    "df",
    "p_value",
    "p_holm",
    "p_bh",
    "cohens_h",
)
SCALE_COLUMNS = (
    "condition",
    "estimate",
    "unit",
    "se",
    "df",
    "ci_low",
    "ci_high",
    "wins",
    "comparisons",
)
DIFF_COLUMNS = (
    "condition_a",
    "condition_b",
    "difference",
    "unit",
    "se",
    "df",
    "ci_low",
    "ci_high",
    "t",
    "p_value",
    "p_holm",
)

SUPPLEMENTARY_PAIRS = Subsection(
    "Supplementary: sensitivity to the exclusions",
    (
        TableEntry(
            "pairs_everyone",
            "Sensitivity: the share of votes per pair with every "
            "participant kept ({n_votes_all} votes), as the table above.",
            PAIR_COLUMNS,
        ),
    ),
    "Shown for comparison only; the verdicts come from the primary test above.",
)

PLANNING = Subsection(
    "Planning a follow-up study",
    (
        TableEntry(
            "planning",
            "Votes per pair needed to detect a true preference rate with "
            "power {power} at α = {alpha}: for independent votes, and inflated by the "
            "design effect of this study's clustering (estimated intra-class "
            "correlation); and votes for a {level} CI of half-width 0.05 at a rate of "
            "0.5.",
        ),
    ),
)

REPORT_SECTIONS: tuple[Section, ...] = (
    Section("summary", "Summary", text=lambda result, ctx: summary_html(result)),
    Section("methods", "Methods", text=lambda result, ctx: methods_html(result, ctx)),
    Section(
        "participants",
        "Participants and quality control",
        (
            TableEntry(
                "exclusion_rules",
                "Exclusion rules: their settings, who set them (the "
                "study, the command line or the analysis defaults) and how many of the "
                "{n_total} participants each excluded (one participant can break "
                "several rules).",
            ),
            FigureEntry(
                "participant_qc",
                "Quality control per participant ({n_total} "
                "participants, {n_excluded} excluded). Left: share of main-trial "
                "answers on the left side against the median response time; crosses "
                "are excluded participants, the dotted line marks 50 %. Right: "
                "observer outlier score (leave-one-out log-likelihood, in "
                "inter-quartile ranges below the lower quartile), dashed line at 1.5 "
                "= worth a look. One mark per participant; no error bars.",
            ),
            TableEntry(
                "participants",
                "Quality-control values and the decision for each of "
                "the {n_total} participants (proportions of catch trials answered "
                "correctly, of repeated trials answered as the first time, of answers "
                "on the more frequent side, of answers faster than the rule's limit).",
                QC_COLUMNS,
            ),
            TableEntry(
                "exclusion_log",
                "Every rule that excluded a participant, with the "
                "participant's value and the rule's threshold.",
            ),
            TableEntry(
                "position_bias",
                "Position bias over the main trials of the {n_kept} "
                "kept participants ({n_votes} votes): share of left choices with its "
                "{level} CI and t test against 0.5, both counting participants and images "
                "as random (two-way cluster-robust variance, Satterthwaite df).",
            ),
            TableEntry(
                "position_bias_participants",
                "Share of left choices per kept "
                "participant, exact binomial test against 0.5, Holm over participants.",
            ),
            TableEntry(
                "display_calibration",
                "Display calibration of the {n_total} participants (before the trials): "
                "how many measured each quantity (share of all participants), its median, "
                "quartiles and range. Card: an outline matched to an ID-1 card (85.60 mm "
                "wide); viewing distance: the blind spot at 13.5°; pixels per degree: "
                "2 × distance × tan 0.5° × px/mm, in CSS pixels.",
            ),
        ),
    ),
    Section(
        "pairs",
        "Pairwise results",
        text=lambda result, ctx: (
            ""
            if "pair_tests_glmm" in result.tables or "pairs" not in result.tables
            else "<p>The mixed model was not fitted (<code>--no-mixed</code>): the verdicts come "
            "from the two-way test of the share of votes (the per-pair table below), with "
            "participants and images random.</p>"
        ),
        items=(
            FigureEntry(
                "preference_matrix",
                "Preference matrix: percentage of main trials in "
                "which the row condition was chosen over the column condition, pooled "
                "over the {n_kept} kept participants ({n_votes} votes). Brackets: "
                "{level} interval of that share with participants and images random "
                "(two-way cluster-robust variance, shares pooled over the pairs). *: {mark_label} < "
                "{alpha}. Grey: pair not compared.",
            ),
            TableEntry(
                "pair_tests_glmm",
                "Primary per-pair test: logistic mixed model with "
                "participants and images as crossed random effects. P(A chosen) is the "
                "rate for a typical participant and image, with its {level} CI; random-effect "
                "SDs pooled over the study's pairs, Wald t; p Holm-adjusted over the "
                "{n_pairs} pairs. A pair that could not be tested, or that keeps its own "
                "SDs, says why.",
                GLMM_COLUMNS,
            ),
            TableEntry(
                "pairs",
                "Share of votes per pair ({n_votes} votes of the {n_kept} kept "
                "participants): P(A chosen), the population preference rate, with its "
                "{level} CI and a t test against 0.5 that count participants and images "
                "as random (two-way cluster-robust variance with the participants' and "
                "images' shares pooled over the pairs, t with G - 1 df; a pair clustered "
                "well beyond the others keeps its own two-way variance — see the interval "
                "column), Holm and Benjamini–Hochberg adjusted over the {n_pairs} pairs; "
                "Cohen's h.",
                PAIR_COLUMNS,
            ),
            SUPPLEMENTARY_PAIRS,
            PLANNING,
        ),
    ),
    Section(
        "scales",
        "Scales",
        (
            FigureEntry(
                "scale_jod",
                "Quality scale in just-objectionable-difference units "
                "(JOD; Thurstone Case V, 1 JOD = 75 % preference) of the "
                "{n_conditions} conditions, from {n_votes} votes of {n_kept} "
                "participants, {anchor}. Dots: estimates; bars: {level} CI "
                "({jod_interval}).",
            ),
            TableEntry(
                "scale_jod",
                "JOD scale per condition: estimate, SE, df and {level} CI "
                "({jod_interval}); wins and comparisons count main-trial votes.",
                SCALE_COLUMNS,
            ),
            TableEntry(
                "significance_jod",
                "Pairwise differences on the JOD scale with their "
                "{level} CI, t test with Satterthwaite df, Holm-adjusted.",
                DIFF_COLUMNS,
            ),
            FigureEntry(
                "scale_bt",
                "Bradley–Terry scale in logits (log-odds of preference) "
                "of the {n_conditions} conditions, from {n_votes} votes of {n_kept} "
                "participants, {anchor}. Dots: estimates; bars: {level} CI "
                "({bt_interval}).",
            ),
            TableEntry(
                "scale_bt",
                "Bradley–Terry scale per condition (logit): estimate, SE, "
                "df and {level} CI ({bt_interval}).",
                SCALE_COLUMNS,
            ),
            TableEntry(
                "significance_bt",
                "Pairwise differences on the Bradley–Terry scale "
                "with their {level} CI, t test with Satterthwaite df, Holm-adjusted.",
                DIFF_COLUMNS,
            ),
            TableEntry(
                "reliability",
                "Split-half reliability of the JOD scale: mean "
                "correlation of scales fitted to random halves of the participants, and "
                "its Spearman–Brown correction.",
            ),
            Subsection(
                "Supplementary: scale sensitivity",
                (
                    TableEntry(
                        "scale_jod_everyone",
                        "JOD scale with every participant kept "
                        "({n_total} participants, {n_votes_all} votes).",
                        SCALE_COLUMNS,
                    ),
                    TableEntry(
                        "scale_jod_by_image",
                        "pwcmp's JOD scale per image (scene), and pooled over images (all).",
                    ),
                ),
            ),
        ),
    ),
    Section(
        "agreement",
        "Metric agreement",
        (
            TableEntry(
                "metric_agreement",
                "Image metrics against the {n_kept} kept "
                "participants' votes: 2AFC score (share of votes for the image the "
                "metric ranks closer to the reference) and the human ceiling (the "
                "agreement of two random participants on the same item), "
                "vote-weighted; the score's {level} interval counts participants and "
                "images as random (two-way cluster-robust variance of the per-vote "
                "agreement, Student t; column interval).",
            ),
            TableEntry(
                "metric_holdout",
                "Fitted losses (--fit-holdout): each fitted on the votes for half of "
                "the images and scored on the other half, beside the unfitted loss; "
                "the score's {level} interval counts participants and images as random "
                "(two-way cluster-robust variance of the per-vote agreement on the "
                "held-out images, Student t; column interval).",
            ),
            TableEntry("metric_status", "The metrics asked for, and whether each was computed."),
            TableEntry(
                "agreement",
                "Agreement between participants: Fleiss' κ over "
                "(image, condition pair) items and Kendall's u over condition pairs.",
                value_labels={"statistic": STATISTIC_LABELS},
            ),
        ),
        text=lambda result, ctx: (
            ""
            if "metric_agreement" in result.tables or "pairs" not in result.tables
            else "<p>No stimulus set was given (<code>--stimuli</code>), so image metrics were "
            "not compared with the votes; the agreement between participants follows.</p>"
        ),
    ),
    Section(
        "jnd",
        "Same or different (JND)",
        (
            TableEntry(
                "jnd_rates",
                'Share of "different" answers per condition ({n_jnd} answers of the '
                "{n_kept} kept participants; each condition shown before or after its "
                "reference; the identical pair is the reference twice, the catch trials' "
                "false-alarm rate), with its {level} interval counting participants and "
                "images as random (two-way cluster-robust variance, the participants' and "
                "images' shares pooled over the conditions, Student t; participants only "
                "with fewer than 5 images; column interval).",
                JND_RATE_COLUMNS,
            ),
            TableEntry(
                "jnd_levels",
                "The same shares at each condition's distortion level (--jnd-levels), in "
                "level order: the points of the psychometric function.",
                ("condition", "level", "n", "rate_different", "ci_low", "ci_high"),
            ),
            TableEntry(
                "jnd_psychometric",
                "Psychometric function: P(different) = 1 / (1 + exp(-(level - threshold) "
                "/ spread)), fitted by maximum likelihood to the answers at the given "
                'levels; threshold = the level answered "different" half of the time.',
            ),
            TableEntry(
                "jnd_metric_ap",
                "Image metrics against the answers, as in the LPIPS paper: average "
                "precision (area under the precision-recall curve) of each metric's "
                'distance to the reference as a predictor of "different", over the main '
                'and repeated answers; chance = the share of "different".',
            ),
            TableEntry(
                "jnd_metric_status", "The metrics asked for, and whether each was computed."
            ),
        ),
        text=lambda result, ctx: (
            ""
            if "jnd_rates" not in result.tables or "jnd_metric_ap" in result.tables
            else "<p>No stimulus set was given (<code>--stimuli</code>), so image metrics were "
            "not compared with the answers.</p>"
        ),
    ),
    Section(
        "timing",
        "Exposure timing",
        (
            TableEntry(
                "exposure_accuracy",
                "Frame-timed presentation, requested against measured (all participants): "
                "per phase (the limited exposure, or a sequential trial's first image, "
                "interval and second image) and requested duration, the trials, the median "
                "display frame period, the median, shortest and longest measured duration "
                "and the share within one frame of the request (|measured - requested| <= "
                "frame period + 0.5 ms).",
            ),
        ),
    ),
    Section("provenance", "Provenance", text=lambda result, ctx: provenance_html(result)),
)


# ----------------------------------------------------------------------------- prose


def summary_html(result: AnalysisResult) -> str:
    """The plain-language summary, one paragraph per line."""
    lines = [line for line in result.summary.splitlines() if line.strip()]
    return "".join(f"<p>{esc(line)}</p>" for line in lines)


RULE_TEXT = {
    "catch_accuracy": "catch-trial accuracy below {min_catch_accuracy}",
    "fast_responses": "more than {max_fast_fraction} of answers faster than {fast_rt_ms} ms",
    "side_bias": "more than {max_side_rate} of main-trial answers on one side, judged from "
    "{min_side_trials} main trials on",
    "repeat_consistency": "repeat consistency below {min_repeat_consistency}",
    "returned": "withdrew from the study (status returned)",
    "not_completed": "did not complete the study",
    "study_exclusion": "flagged as excluded by the study",
    "outlier_score": "observer outlier score above {max_outlier_score}",
    "exposure_timing": "more than {max_exposure_miss_fraction} of frame-timed exposures "
    "missing the requested duration by more than one frame",
}


def _active_rules(qc: dict) -> list[str]:
    """Rule names whose settings are switched on in ``qc`` (QCOptions as a dict)."""
    on = {
        "catch_accuracy": qc.get("min_catch_accuracy") is not None,
        "fast_responses": qc.get("max_fast_fraction") is not None,
        "side_bias": qc.get("max_side_rate") is not None,
        "repeat_consistency": qc.get("min_repeat_consistency") is not None,
        "returned": bool(qc.get("exclude_returned")),
        "not_completed": bool(qc.get("completed_only")),
        "study_exclusion": bool(qc.get("honour_study_exclusions")),
        "outlier_score": qc.get("max_outlier_score") is not None,
        "exposure_timing": qc.get("max_exposure_miss_fraction") is not None,
    }
    return [rule for rule, active in on.items() if active]


def _number(value) -> str:
    """A rule's setting as the researcher typed it (0.75, 200, 10)."""
    return f"{value:g}" if isinstance(value, int | float) else str(value)


# the participant's question when the study sets none (study_app.studies.QUESTIONS)
DEFAULT_QUESTIONS = {
    "reference": "Which image is closer to the reference?",
    "no-reference": "Which image looks better?",
}


def _jnd_design_sentences(result: AnalysisResult, ctx: dict, config: dict) -> list[str]:
    """The design of a JND study (no pairs): what was shown, for how long, and how often."""
    rates = result.tables["jnd_rates"]
    conditions = sorted(set(rates["condition"]) - {"reference (identical pair)"})
    sentences = [
        f"{len(conditions)} conditions ({', '.join(conditions)}) on "
        f"{_n_images(result)} images were judged in a same/different (just-noticeable "
        "difference, JND) task: on each trial a participant saw a condition's reconstruction "
        "and its reference one after the other at the same place and answered whether they "
        "were the same or different."
    ]
    if config:
        mask = {"grey": "a grey field", "noise": "random noise", "none": "nothing"}
        sentences.append(
            f"The first image was shown for {config.get('first_ms', 500):,} ms, then "
            f"{mask.get(config.get('isi_mask', 'grey'), 'a mask')} for "
            f"{config.get('isi_ms', 500):,} ms, then the second for "
            f"{config.get('second_ms', 500):,} ms, each in whole display frames; each "
            f"participant was to answer M = {config.get('trials_per_participant', '–')} main "
            f"trials, {config.get('catch_trials', 0)} catch trials (the reference twice) and "
            f"{config.get('repeat_trials', 0)} repeated trials (the order reversed), with "
            f"K = {config.get('votes_per_item', '–')} answers per image × condition."
        )
    return sentences


def _design_sentences(result: AnalysisResult, ctx: dict) -> list[str]:
    config = (result.study or {}).get("study_config") or {}
    if "pairs" not in result.tables:
        return _jnd_design_sentences(result, ctx, config)
    pairs = result.tables["pairs"]
    n_images = _n_images(result)
    items = pairs["n"].size * n_images if n_images else None
    if not config:
        source = result.provenance["inputs"][0]
        return [
            f"The input ({str(source.get('format'))}) carries no study settings; from the "
            f"data: {ctx['n_conditions']} conditions ({ctx['conditions']}), "
            f"{n_images or 'an unknown number of'} images and {ctx['n_pairs']} condition pairs "
            "compared in a two-alternative forced-choice (2AFC) task."
        ]
    name = str(config.get("title") or config.get("slug") or result.study.get("study"))
    mode = config.get("question_mode", "reference")
    question = config.get("question") or DEFAULT_QUESTIONS.get(mode, "")
    task = (
        "the reference image and two reconstructions of it"
        if mode == "reference"
        else "two reconstructions of an image, without the reference,"
    ) + (f" and answered “{question}”" if question else "")
    exposure = config.get("exposure_ms")
    sentences = [
        f"The study “{name}” compared {ctx['n_conditions']} conditions ({ctx['conditions']}) "
        f"on {n_images} images in a two-alternative forced-choice (2AFC) task: on each trial a "
        f"participant saw {task}.",
        (
            f"The two candidates were shown for {exposure:,} ms and then masked."
            if exposure
            else "Viewing time was not limited."
        ),
        f"The {ctx['n_pairs']} condition pairs (of {comb(ctx['n_conditions'], 2)} possible) × "
        f"{n_images} images gave {items} items; the study aimed for K = "
        f"{config.get('votes_per_item', '–')} votes per item.",
        f"Each participant was to answer M = {config.get('trials_per_participant', '–')} main "
        f"trials, {config.get('catch_trials', 0)} catch trials (one candidate identical to the "
        f"reference) and {config.get('repeat_trials', 0)} repeated trials (for consistency), "
        f"after {config.get('practice_trials', 0)} practice trials that are not analysed.",
    ]
    return sentences


def _n_images(result: AnalysisResult) -> int | None:
    return result.design.get("n_images")


def _participant_sentences(result: AnalysisResult, ctx: dict) -> list[str]:
    parts = result.tables["participants"]
    status = parts["status"].fillna("unknown").astype(str).value_counts()
    described = ", ".join(f"{n} {s}" for s, n in status.items())
    qc = result.provenance.get("options", {}).get("qc", {})
    settings = {k: _number(v) for k, v in qc.items() if v is not None}
    if qc.get("max_fast_fraction") is not None:
        settings["max_fast_fraction"] = f"{100 * qc['max_fast_fraction']:g} %"
    counts = result.tables["exclusion_rules"].set_index("rule")["n_excluded"]
    moot = {  # rules the data cannot trigger
        "catch_accuracy": "no catch trials" if parts["n_catch"].sum() == 0 else "",
        "side_bias": "sides not recorded" if parts["side_rate"].isna().all() else "",
        "fast_responses": "no response times" if parts["fast_fraction"].isna().all() else "",
        "repeat_consistency": "no repeated trials" if parts["n_repeat"].sum() == 0 else "",
    }
    rules = [
        f"{RULE_TEXT[rule].format(**settings)} ("
        + (
            f"not applicable: {moot[rule]}"
            if moot.get(rule)
            else f"{int(counts.get(rule, 0))} excluded"
        )
        + ")"
        for rule in _active_rules(qc)
    ]
    sources = result.provenance.get("options", {}).get("qc_sources", {})
    whose = (
        "the study's own rules, as the export carries them"
        if "study" in sources.values()
        else "the analysis defaults"
    )
    overridden = sorted(k for k, v in sources.items() if v == "command line")
    if overridden:
        whose += f", with {', '.join(overridden)} set on the command line"
    return [
        f"{ctx['n_total']} participants answered at least one trial (status: {described}).",
        f"Participants were excluded by {whose}: " + "; ".join(rules) + "."
        if rules
        else "No exclusion rule was active.",
        f"{ctx['n_kept']} participants were included ({ctx['n_excluded']} excluded), "
        + (
            f"contributing {ctx['n_votes']} main-trial votes; catch and repeated trials enter "
            "only the quality control."
            if "pairs" in result.tables
            else f"contributing {ctx['n_jnd']} same/different answers (main, repeated and "
            "catch trials)."
        ),
    ]


def _jnd_statistics_sentences(result: AnalysisResult, ctx: dict) -> list[str]:
    sentences = [
        'The share of "different" answers per condition is reported with an interval that '
        "counts participants and images as random: a two-way cluster-robust variance "
        "(Cameron, Gelbach & Miller, 2011), never below its answer-level part, with "
        "Satterthwaite (1946) degrees of freedom."
    ]
    if "jnd_psychometric" in result.tables:
        sentences.append(
            "A logistic psychometric function of the distortion level was fitted by maximum "
            "likelihood, its threshold the level answered “different” half of the time."
        )
    if "jnd_metric_ap" in result.tables:
        sentences.append(
            "Image metrics are scored, as in the LPIPS paper (Zhang et al., 2018), by the "
            'average precision of their distance as a predictor of a "different" answer.'
        )
    sentences.append(f"Intervals are {ctx['level']}.")
    return sentences


def _statistics_sentences(result: AnalysisResult, ctx: dict) -> list[str]:
    if "pairs" not in result.tables:
        return _jnd_statistics_sentences(result, ctx)
    options = result.provenance.get("options", {})
    prior = (
        "a weak N(0, 3²) prior per condition"
        if options.get("scale_prior") != "pwcmp"
        else "pwcmp's prior"
    )
    primary = (
        "The primary test of each pair is a logistic generalised linear mixed model with "
        "crossed random intercepts for participants and images (Baayen, Davidson & Bates, "
        "2008), its two random-effect variances estimated once for the study by restricted "
        "(REML) Laplace likelihood summed over the pairs, and a Wald t test of no preference "
        "whose degrees of freedom count each variance component with its levels minus one "
        "(Satterthwaite, 1946); a pair whose own spread exceeds the study's keeps its own "
        "variances"
        if "pair_tests_glmm" in result.tables
        else "The mixed model was not fitted (--no-mixed): the per-pair verdicts come from the "
        "two-way test of the share of votes described next"
    )
    sentences = [
        "The share of votes for each pair (the population preference rate) is reported with "
        "an interval and a t test against 50 % that count participants and images as random: "
        "a two-way cluster-robust variance (Cameron, Gelbach & Miller, 2011) whose "
        "participant and image shares are averaged over the study's pairs (a pair clustered "
        "well beyond the others keeps its own), never below its vote-level part, with G - 1 "
        "degrees of freedom for the factor with the fewest levels.",
        f"{primary}; p-values are adjusted over the {ctx['n_pairs']} pairs with Holm's "
        "(1979) step-down procedure (Benjamini–Hochberg, 1995, false-discovery rates in the "
        "share-of-votes table).",
        "Conditions are placed on quality scales by Thurstone's (1927) Case V model in "
        "just-objectionable-difference (JOD) units, as in pwcmp (Perez-Ortiz & Mantiuk, 2017), "
        f"with {prior}, and by the Bradley–Terry (1952) model in logits; their intervals and "
        f"pairwise tests come from {ctx['n_boot']} bootstrap replicates over participants, "
        "images and (participant, image) cells with Satterthwaite degrees of freedom, "
        "Holm-adjusted.",
        "Agreement between participants is measured by Fleiss' (1971) κ and Kendall and "
        "Babington Smith's (1940) u.",
    ]
    if "metric_agreement" in result.tables:
        sentences.append(
            "Image metrics are scored by the share of votes they predict (2AFC "
            "score) against the agreement of two random participants."
        )
    sentences.append(f"Tests are two-sided at α = {ctx['alpha']}; intervals are {ctx['level']}.")
    return sentences


def methods_paragraphs(result: AnalysisResult, ctx: dict | None = None) -> dict[str, str]:
    """The auto-written methods: ``{"Design": ..., "Participants": ..., "Statistics":
    ...}``, each a paragraph of plain text from the study's settings (when the
    input carries them), the counts and the exclusions, and the methods actually used."""
    ctx = ctx or report_context(result)
    return {
        "Design": " ".join(_design_sentences(result, ctx)),
        "Participants": " ".join(_participant_sentences(result, ctx)),
        "Statistics": " ".join(_statistics_sentences(result, ctx)),
    }


def methods_html(result: AnalysisResult, ctx: dict) -> str:
    paragraphs = "".join(
        f"<p><strong>{esc(title)}.</strong> {esc(text)}</p>"
        for title, text in methods_paragraphs(result, ctx).items()
    )
    notes = "".join(f"<li>{esc(note)}</li>" for note in result.notes)
    return paragraphs + f"<h3>Notes and limits</h3><ul class='notes'>{notes}</ul>"


def provenance_html(result: AnalysisResult) -> str:
    prov = result.provenance
    rows = [("Tool", prov.get("tool", "")), ("Created (UTC)", prov.get("created_at", ""))]
    for item in prov.get("inputs", []):
        rows.append(("Input", f"{item.get('source')} ({item.get('format')})"))
        digest = item.get("sha256") or item.get("manifest_sha256")
        if digest:
            rows.append(("SHA-256", digest))
        if "rows" in item:
            rows.append(("Rows read", f"{item['rows']:,}"))
    if result.study:
        rows.append(("Study", str(result.study.get("study", ""))))
        if result.study.get("study_config_sha256"):
            rows.append(("Study settings SHA-256", result.study["study_config_sha256"]))
    versions = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())
    rows.append(("Software", versions))
    listing = "".join(f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>" for k, v in rows)
    raw = esc(json.dumps(prov, indent=1, default=str))
    return (
        f"<dl class='provenance'>{listing}</dl>"
        "<p>Every table is also in <code>tables/&lt;name&gt;.csv</code> (plain CSV, raw "
        "column names, full precision; its provenance in "
        "<code>&lt;name&gt;.csv.provenance.json</code>), Parquet, JSON and LaTeX; "
        "<code>provenance.json</code> holds the SHA-256 of every output.</p>"
        f"<details><summary>Options and provenance (JSON)</summary><pre>{raw}</pre></details>"
    )


# ----------------------------------------------------------------------------- rendering


@dataclass
class _Counter:
    tables: int = 0
    figures: int = 0


def _table_html(entry: TableEntry, result: AnalysisResult, ctx: dict, n: _Counter) -> str:
    table = result.tables.get(entry.name)
    if table is None:
        return ""
    n.tables += 1
    level = 1 - float(result.provenance.get("options", {}).get("alpha", 0.05))
    shown = display_table(table, level, entry.columns, value_labels=entry.value_labels)
    caption = entry.caption.format(**ctx)
    more = (
        f" All columns: <code>tables/{esc(entry.name)}.csv</code>."
        if entry.columns
        else f" <code>tables/{esc(entry.name)}.csv</code>."
    )
    if table.empty:
        body = "<p class='empty'>No rows.</p>"
    else:
        body = shown.to_html(index=False, border=0, classes="tidy", escape=True)
    return (
        f"<div class='table-block' id='table-{esc(entry.name)}'>"
        f"<p class='caption'><strong>Table {n.tables}.</strong> {esc(caption)}{more}</p>"
        f"<div class='table-wrap' role='region' tabindex='0' "
        f"aria-label='Table {n.tables}'>{body}</div></div>"
    )


def _figure_html(entry: FigureEntry, images: dict[str, bytes], ctx: dict, n: _Counter) -> str:
    data = images.get(entry.name)
    if data is None:
        return ""
    n.figures += 1
    encoded = base64.b64encode(data).decode()
    caption = entry.caption.format(**ctx)
    return (
        f"<figure id='figure-{esc(entry.name)}'><img alt='Figure {n.figures}: "
        f"{esc(entry.name.replace('_', ' '))}' src='data:image/png;base64,{encoded}'>"
        f"<figcaption><strong>Figure {n.figures}.</strong> {esc(caption)}</figcaption></figure>"
    )


def _items_html(items, result, images, ctx, n: _Counter, number: str) -> str:
    out, sub = [], 0
    for item in items:
        if isinstance(item, TableEntry):
            out.append(_table_html(item, result, ctx, n))
        elif isinstance(item, FigureEntry):
            out.append(_figure_html(item, images, ctx, n))
        else:
            inner = _items_html(item.items, result, images, ctx, n, number)
            if inner:
                sub += 1
                intro = f"<p>{esc(item.intro)}</p>" if item.intro else ""
                out.append(f"<h3>{number}.{sub} {esc(item.title)}</h3>{intro}{inner}")
    return "".join(out)


STYLE = """
*,*::before,*::after{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{font:16px/1.5 Georgia,'Times New Roman',serif;color:#222;margin:0;padding:0 1rem;
 overflow-wrap:break-word}
main,header,nav{max-width:56rem;margin:0 auto}
h1{font-size:1.7rem;line-height:1.25;margin:1.2rem 0 .3rem}
h2{font-size:1.35rem;margin:2rem 0 .6rem;border-bottom:1px solid #ccc}
h3{font-size:1.1rem;margin:1.4rem 0 .4rem}
p.meta{color:#555;margin:0 0 1rem;font-size:.9rem}
nav ol{columns:2 12rem;font-family:system-ui,sans-serif;font-size:.9rem;padding-left:1.4rem}
.caption,figcaption{font-family:system-ui,sans-serif;font-size:.85rem;color:#333;
 margin:.3rem 0}
.table-block{margin:1.2rem 0}
.table-wrap{overflow-x:auto;max-width:100%;-webkit-overflow-scrolling:touch}
table.tidy{border-collapse:collapse;font:12px/1.35 system-ui,sans-serif;
 font-variant-numeric:tabular-nums}
table.tidy th{text-align:left;vertical-align:bottom;border-bottom:1.5px solid #333;
 padding:3px 8px;max-width:12rem}
table.tidy td{padding:2px 8px;border-bottom:1px solid #e3e3e3;vertical-align:top;
 max-width:24rem}
table.tidy thead tr{border-top:1.5px solid #333}
figure{margin:1.4rem 0}
img{max-width:100%;height:auto;display:block}
dl.provenance{display:grid;grid-template-columns:minmax(6rem,max-content) 1fr;gap:.2rem 1rem;
 font:13px/1.4 system-ui,sans-serif}
dl.provenance dt{font-weight:600}
dl.provenance dd{margin:0;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;padding:.6rem;
 font-size:12px}
code{overflow-wrap:anywhere}
ul.notes{font-size:.92rem}
@media (max-width:40rem){body{font-size:15px;padding:0 .75rem}h1{font-size:1.4rem}
 h2{font-size:1.2rem}}
@page{size:A4;margin:16mm 14mm}
@media print{
 body{font-size:10.5pt;padding:0}
 nav,details{display:none}
 main,header{max-width:none}
 section.section{break-before:page}
 section.section:first-of-type{break-before:auto}
 h2,h3,.caption{break-after:avoid}
 figure,.table-block,tr,img{break-inside:avoid}
 .table-wrap{overflow:visible}
 table.tidy{font-size:7.5pt;max-width:100%}
 table.tidy th,table.tidy td{padding:1px 4px;overflow-wrap:anywhere}
 a{color:inherit;text-decoration:none}
}
"""


def render_html(result: AnalysisResult, images: dict[str, bytes]) -> str:
    """One self-contained page (figures inlined as base64 PNG, no external files):
    title, contents, then the numbered ``REPORT_SECTIONS``."""
    ctx = report_context(result)
    counter = _Counter()
    sections, toc = [], []
    for section in REPORT_SECTIONS:
        number = str(len(sections) + 1)
        prose = section.text(result, ctx) if section.text else ""
        items = _items_html(section.items, result, images, ctx, counter, number)
        if not (prose or items):
            continue
        anchor = f"sec-{section.key}"
        toc.append(f"<li><a href='#{anchor}'>{esc(section.title)}</a></li>")
        sections.append(
            f"<section class='section' id='{anchor}'><h2>{number} {esc(section.title)}</h2>"
            f"{prose}{items}</section>"
        )
    study = result.study or {}
    name = (study.get("study_config") or {}).get("title") or study.get("study")
    title = "Preference analysis" + (f": {name}" if name else "")
    created = result.provenance.get("created_at", "")
    source = result.provenance.get("inputs", [{}])[0].get("source", "")
    header = (
        f"<header><h1>{esc(title)}</h1><p class='meta'>{esc(str(source))} · "
        f"written by pstudy analyze, {esc(created)}</p></header>"
        f"<nav aria-label='Contents'><ol>{''.join(toc)}</ol></nav>"
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        + header
        + "<main>"
        + "\n".join(sections)
        + "</main></body></html>"
    )


def section_titles(result: AnalysisResult) -> list[str]:
    """The numbered headings the report shows for ``result`` (e.g. ``"1 Summary"``)."""
    ctx = report_context(result)
    titles = []
    for section in REPORT_SECTIONS:
        prose = section.text(result, ctx) if section.text else ""
        items = _items_html(section.items, result, {}, ctx, _Counter(), "0")
        if prose or items:
            titles.append(f"{len(titles) + 1} {section.title}")
    return titles
