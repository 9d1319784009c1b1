"""Quality control: per-participant checks, exclusion rules with a log, outlier scores.

Catch-trial accuracy, consistency on repeated trials, one-side bias, too-fast responses,
the study's own exclusion flags (contract 2 ``participant_excluded``), and the pwcmp-style
observer outlier score. Catch and repeat trials never enter the main analysis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.scaling import _link_terms, condition_names, fit_scale, participant_win_tensor


@dataclass(frozen=True)
class QCOptions:
    """Exclusion thresholds; None switches a rule off.

    min_catch_accuracy: fraction of catch trials answered correctly (0..1).
    min_repeat_consistency: fraction of repeated trials answered like the first time.
    max_side_rate: the larger of left/right choice rates over main trials (0.5..1); only
    judged for participants with at least min_side_trials main trials (all on one side
    out of 3 happens by chance one time in four).
    fast_rt_ms / max_fast_fraction: a response faster than fast_rt_ms (milliseconds) is
    "too fast"; participants with more than max_fast_fraction of them are excluded.
    honour_study_exclusions: drop participants the study flagged (participant_excluded).
    exclude_returned: drop participants who withdrew (status "returned").
    completed_only: drop participants whose status is not "completed".
    max_outlier_score: exclude observers whose outlier score exceeds this (default: report only).
    max_exposure_miss_fraction: exclude participants with more than this fraction (0..1)
    of their frame-timed trials mistimed (``exposure_ok`` false: the measured exposure
    missed the request by more than one frame); trials without frame timing do not
    count. Default None: report only.

    Rule names (``catch_accuracy``, ``fast_responses``, ``side_bias``,
    ``repeat_consistency``, ``returned``) and definitions are the study platform's
    (``study_app.export.exclusion_reasons``); :func:`qc_options_from_study` turns a study's
    rules into these options.
    """

    min_catch_accuracy: float | None = 0.8
    min_repeat_consistency: float | None = None
    max_side_rate: float | None = 0.9
    min_side_trials: int = 10
    fast_rt_ms: float = 300.0
    max_fast_fraction: float | None = 0.2
    honour_study_exclusions: bool = True
    exclude_returned: bool = True
    completed_only: bool = False
    max_outlier_score: float | None = None
    max_exposure_miss_fraction: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# study_app.studies.ExclusionRules field -> QCOptions field
STUDY_RULE_FIELDS = {
    "min_catch_accuracy": "min_catch_accuracy",
    "min_repeat_consistency": "min_repeat_consistency",
    "max_side_bias": "max_side_rate",
    "min_trials_for_bias": "min_side_trials",
    "min_rt_ms": "fast_rt_ms",
    "max_fast_fraction": "max_fast_fraction",
}
RULE_SOURCES = ("study", "command line", "analysis default")


def qc_options_from_study(
    study_rules: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None
) -> tuple[QCOptions, dict[str, str]]:
    """The exclusion rules an analysis applies, and where each came from.

    ``study_rules``: the study's ``ExclusionRules`` as the export carries them (``None``:
    the input has none, so the analysis defaults apply and the study's own flags,
    ``participant_excluded``, are honoured). ``overrides``: QCOptions fields the analyst
    set (a value, or ``None`` to switch a rule off). With the study's rules the analysis
    recomputes every rule itself (the flags are not needed, and an override can loosen a
    rule); returned participants count only if the study says so.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    defaults = QCOptions()
    if study_rules is not None:
        for study_name, qc_name in STUDY_RULE_FIELDS.items():
            if study_name in study_rules:
                values[qc_name] = study_rules[study_name]
                sources[qc_name] = "study"
        if values.get("fast_rt_ms", 0.0) is None:  # the study switched the rule off
            values["fast_rt_ms"], values["max_fast_fraction"] = defaults.fast_rt_ms, None
        values["exclude_returned"] = not study_rules.get("count_returned", False)
        sources["exclude_returned"] = "study"
        values["honour_study_exclusions"] = False
    for name, value in (overrides or {}).items():
        values[name] = value
        sources[name] = "command line"
    for name in QCOptions.__dataclass_fields__:
        sources.setdefault(name, "analysis default")
    return QCOptions(**values), sources


@dataclass
class QCResult:
    """``participants``: one row per participant with every QC value and the decision;
    ``log``: one row per (participant, rule) that excluded someone (value, threshold);
    ``kept``: main trials of kept participants; ``everyone``: main trials of all."""

    participants: pd.DataFrame
    log: pd.DataFrame
    kept: pd.DataFrame
    everyone: pd.DataFrame
    options: QCOptions


def two_afc(responses: pd.DataFrame) -> pd.Series:
    """Which rows are 2AFC answers (all of them in an export without a ``task`` column);
    a JND answer (same / different) has no side and no winner."""
    if "task" not in responses:
        return pd.Series(True, index=responses.index)
    return responses["task"].astype(str) != "jnd"


def repeat_consistency(responses: pd.DataFrame) -> pd.Series:
    """Per participant: fraction of repeat trials whose chosen condition matches the first
    main trial with the same image and pair (sides may be swapped)."""
    frame = responses[
        [
            "participant",
            "trial_kind",
            "image_id",
            "condition_left",
            "condition_right",
            "chosen_condition",
            "trial_index",
        ]
    ].copy()
    left = frame["condition_left"].astype(str)
    right = frame["condition_right"].astype(str)
    frame["pair"] = np.where(left < right, left + "\x1f" + right, right + "\x1f" + left)
    key = ["participant", "image_id", "pair"]
    first = (
        frame[frame["trial_kind"] == "main"]
        .sort_values("trial_index")
        .drop_duplicates(key)[key + ["chosen_condition"]]
    )
    repeats = frame[frame["trial_kind"] == "repeat"].merge(first, on=key, suffixes=("", "_first"))
    if repeats.empty:
        return pd.Series(dtype=float, name="repeat_consistency")
    same = repeats["chosen_condition"] == repeats["chosen_condition_first"]
    return same.groupby(repeats["participant"]).mean().rename("repeat_consistency")


def outlier_scores(main: pd.DataFrame, model: str = "thurstone") -> pd.DataFrame:
    """pwcmp-style observer outlier screen over main trials.

    For each observer: the mean log-likelihood per comparison of their own choices under
    the scale fitted to everyone else (leave one out, Gaussian prior as in
    ``analysis.scaling``). Score = (Q1 - L) / IQR of those likelihoods over observers,
    i.e. how many inter-quartile ranges below the lower quartile (Tukey's fence): >= 1.5
    is worth a look. Columns: participant, loo_loglik, outlier_score.
    """
    names = condition_names(main)
    participants, tensor = participant_win_tensor(main, names)
    total = tensor.sum(axis=0)
    alpha = 1.0 / 9.0 if model == "thurstone" else 0.01
    start = fit_scale(total, model, alpha)
    loglik = np.full(len(participants), np.nan)
    for p in range(len(participants)):
        own = tensor[p]
        n = own.sum()
        if n == 0:
            continue
        scale = fit_scale(total - own, model, alpha, initial=start)
        logp, _, _ = _link_terms(scale[:, None] - scale[None, :], model)
        loglik[p] = float(np.sum(own * logp) / n)
    q1, q3 = np.nanquantile(loglik, [0.25, 0.75]) if np.isfinite(loglik).any() else (np.nan, np.nan)
    iqr = q3 - q1
    score = (q1 - loglik) / iqr if iqr > 0 else np.zeros_like(loglik)
    return pd.DataFrame({"participant": participants, "loo_loglik": loglik, "outlier_score": score})


def participant_table(
    responses: pd.DataFrame, options: QCOptions, sides_recorded: bool = True
) -> pd.DataFrame:
    """One row per participant: trial counts, catch accuracy, repeat consistency, side
    rates, response times, status, study flags and outlier score (before decisions)."""
    frame = responses
    by = frame.groupby("participant", sort=True)
    table = pd.DataFrame({"participant": sorted(frame["participant"].unique())}).set_index(
        "participant"
    )
    kind = frame["trial_kind"]
    table["n_main"] = (kind == "main").groupby(frame["participant"]).sum().astype(np.int64)
    table["n_catch"] = (kind == "catch").groupby(frame["participant"]).sum().astype(np.int64)
    table["n_repeat"] = (kind == "repeat").groupby(frame["participant"]).sum().astype(np.int64)
    catch = frame[kind == "catch"]
    if not catch.empty:
        correct = catch["chosen_condition"] == catch["expected_condition"]
        table["catch_accuracy"] = correct.groupby(catch["participant"]).mean()
    else:
        table["catch_accuracy"] = np.nan
    table["repeat_consistency"] = repeat_consistency(frame)
    main = frame[(kind == "main") & two_afc(frame)]  # side and scale: 2AFC answers only
    if sides_recorded and not main.empty:
        left = (main["choice"] == "left").groupby(main["participant"]).mean()
        table["left_rate"] = left
        table["side_rate"] = np.maximum(left, 1 - left)
    else:
        table["left_rate"] = np.nan
        table["side_rate"] = np.nan
    rt = frame["rt_ms"].astype(float)
    table["median_rt_ms"] = rt.groupby(frame["participant"]).median()
    fast = (rt < options.fast_rt_ms).astype(float).where(rt.notna())
    table["fast_fraction"] = fast.groupby(frame["participant"]).mean()
    timed = frame["exposure_ok"].astype("boolean") if "exposure_ok" in frame else None
    if timed is not None and timed.notna().any():
        missed = (~timed).astype("Float64")  # missing stays missing: not counted
        table["n_timed"] = timed.notna().groupby(frame["participant"]).sum().astype(np.int64)
        table["exposure_miss_fraction"] = (
            missed.groupby(frame["participant"]).mean().astype(float)
        )
    else:
        table["n_timed"] = 0
        table["exposure_miss_fraction"] = np.nan
    table["status"] = by["participant_status"].first()
    table["study_excluded"] = by["participant_excluded"].any()
    table["study_reasons"] = by["exclusion_reasons"].first().fillna("")
    if main["participant"].nunique() >= 3 and main["condition_left"].nunique() >= 1:
        scores = outlier_scores(main).set_index("participant")
        table = table.join(scores)
    else:
        table["loo_loglik"] = np.nan
        table["outlier_score"] = np.nan
    return table.reset_index()


def apply_exclusions(
    responses: pd.DataFrame, options: QCOptions | None = None, sides_recorded: bool = True
) -> QCResult:
    """Run the QC rules: per-participant table with ``excluded`` and ``reasons``, the
    exclusion log, and the main trials with and without the excluded participants."""
    options = options or QCOptions()
    table = participant_table(responses, options, sides_recorded)
    log_rows: list[dict] = []

    def rule(name: str, failed: pd.Series, values: pd.Series, threshold) -> None:
        for participant, value in zip(
            table.loc[failed, "participant"], values[failed], strict=True
        ):
            log_rows.append(
                {"participant": participant, "rule": name, "value": value, "threshold": threshold}
            )

    def below(column: str, threshold: float | None) -> pd.Series:
        if threshold is None:
            return pd.Series(False, index=table.index)
        return table[column].notna() & (table[column] < threshold)

    def above(column: str, threshold: float | None) -> pd.Series:
        if threshold is None:
            return pd.Series(False, index=table.index)
        return table[column].notna() & (table[column] > threshold)

    rule(
        "catch_accuracy",
        below("catch_accuracy", options.min_catch_accuracy),
        table["catch_accuracy"],
        options.min_catch_accuracy,
    )
    rule(
        "repeat_consistency",
        below("repeat_consistency", options.min_repeat_consistency),
        table["repeat_consistency"],
        options.min_repeat_consistency,
    )
    rule(
        "side_bias",
        above("side_rate", options.max_side_rate) & (table["n_main"] >= options.min_side_trials),
        table["side_rate"],
        options.max_side_rate,
    )
    rule(
        "fast_responses",
        above("fast_fraction", options.max_fast_fraction),
        table["fast_fraction"],
        options.max_fast_fraction,
    )
    rule(
        "outlier_score",
        above("outlier_score", options.max_outlier_score),
        table["outlier_score"],
        options.max_outlier_score,
    )
    rule(
        "exposure_timing",
        above("exposure_miss_fraction", options.max_exposure_miss_fraction),
        table["exposure_miss_fraction"],
        options.max_exposure_miss_fraction,
    )
    if options.honour_study_exclusions:
        flagged = table["study_excluded"].astype(bool)
        rule("study_exclusion", flagged, table["study_reasons"], "flagged by the study")
    if options.exclude_returned:
        rule("returned", table["status"] == "returned", table["status"], "not returned")
    if options.completed_only:
        rule("not_completed", table["status"] != "completed", table["status"], "completed")
    log = pd.DataFrame(log_rows, columns=["participant", "rule", "value", "threshold"])
    if not log.empty:
        log["value"] = log["value"].astype(str)
        log["threshold"] = log["threshold"].astype(str)
    reasons = (
        log.groupby("participant")["rule"].agg(";".join) if not log.empty else pd.Series(dtype=str)
    )
    table["reasons"] = [reasons.get(p, "") for p in table["participant"]]
    table["excluded"] = table["reasons"] != ""
    main = responses[(responses["trial_kind"] == "main") & two_afc(responses)]
    excluded = set(table.loc[table["excluded"], "participant"])
    kept = main[~main["participant"].isin(excluded)]
    return QCResult(
        participants=table,
        log=log,
        kept=kept.reset_index(drop=True),
        everyone=main.reset_index(drop=True),
        options=options,
    )


# rule name -> the QCOptions fields that set it
RULE_SETTINGS = {
    "catch_accuracy": ("min_catch_accuracy",),
    "fast_responses": ("fast_rt_ms", "max_fast_fraction"),
    "side_bias": ("max_side_rate", "min_side_trials"),
    "repeat_consistency": ("min_repeat_consistency",),
    "returned": ("exclude_returned",),
    "not_completed": ("completed_only",),
    "study_exclusion": ("honour_study_exclusions",),
    "outlier_score": ("max_outlier_score",),
    "exposure_timing": ("max_exposure_miss_fraction",),
}

# rule name -> the words the report's sentences use for it
RULE_LABELS = {
    "catch_accuracy": "catch trials failed",
    "fast_responses": "too many fast responses",
    "side_bias": "always the same side",
    "repeat_consistency": "inconsistent repeats",
    "returned": "returned the study",
    "not_completed": "did not complete",
    "study_exclusion": "excluded in the study",
    "outlier_score": "outlier (disagrees with the others)",
    "exposure_timing": "exposures off by a frame too often",
}


def exclusion_rules_table(result: QCResult, sources: Mapping[str, str]) -> pd.DataFrame:
    """One row per rule: its settings, where they came from (the study, the command line
    or the analysis defaults) and how many participants it excluded (a participant can
    break several rules)."""
    options = result.options.as_dict()
    counts = result.log.groupby("rule")["participant"].nunique() if not result.log.empty else {}
    rows = []
    for rule, settings in RULE_SETTINGS.items():
        rows.append({
            "rule": rule,
            "settings": "; ".join(f"{name}={options[name]}" for name in settings),
            "source": ", ".join(sorted({sources.get(name, "analysis default")
                                        for name in settings})),
            "n_excluded": int(counts.get(rule, 0)),
        })
    return pd.DataFrame(rows)


def exclusion_note(result: QCResult, sources: Mapping[str, str], study: str | None) -> str:
    """A sentence for the report: whose rules were applied and what they excluded."""
    table = exclusion_rules_table(result, sources)
    fired = table[table["n_excluded"] > 0]
    overridden = sorted(name for name, source in sources.items() if source == "command line")
    origin = (f"the study's own rules ('{study}', from the export)" if "study" in sources.values()
              else "the analysis defaults (the input carries no study rules)")
    if overridden:
        origin += f", overridden on the command line: {', '.join(overridden)}"
    n_out = int(result.participants["excluded"].sum())
    counts = ", ".join(
        f"{RULE_LABELS.get(r.rule, r.rule)} ({r.rule}) {r.n_excluded}" for r in fired.itertuples()
    ) or "none"
    return (f"Exclusions: {origin}; {n_out} of {len(result.participants)} participants "
            f"excluded (by rule: {counts}; see the exclusion rules and the exclusion log, "
            "tables exclusion_rules.csv and exclusion_log.csv).")
