"""``pstudy analyze``: responses in, tables, figures, report and summary out."""

from __future__ import annotations

from pathlib import Path

import click

from analysis.io import ResponsesFormatError, load_responses
from analysis.qc import qc_options_from_study

OFF = "off"


# generation.losses.fitted.FITTABLE_LOSSES, repeated so that `--help` does not import torch
FITTABLE_LOSSES = ("watson-dct", "watson-dft", "deep", "lpips-alex", "lpips-vgg", "lpips-squeeze")


class RuleValue(click.ParamType):
    """A rule's threshold in [low, high], or ``off``; not given: the study's rule."""

    name = "number|off"

    def __init__(self, low: float, high: float | None = None, integer: bool = False):
        self.low, self.high, self.integer = low, high, integer

    def convert(self, value, param, ctx):
        if isinstance(value, int | float) or value is None:
            return value
        if str(value).strip().lower() == OFF:
            return OFF
        try:
            number = int(value) if self.integer else float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or 'off'", param, ctx)
        if number < self.low or (self.high is not None and number > self.high):
            self.fail(f"{value} is outside [{self.low:g}, {self.high if self.high is not None else 'inf'}]",
                      param, ctx)
        return number


RULES_HELP = "Default: the study's own rule (from the export), else {default}; 'off' disables."


def _jnd_levels(text: str | None) -> dict[str, float] | None:
    from analysis.jnd import parse_levels

    if text is None:
        return None
    try:
        return parse_levels(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--jnd-levels") from None


def _rates(ctx, param, value: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"give comma-separated rates like 0.6,0.7 ({exc})") from exc
    if not rates or any(not 0 < r < 1 or r == 0.5 for r in rates):
        raise click.BadParameter("each rate must be in (0, 1) and differ from 0.5")
    return rates


@click.command("analyze")
@click.argument("input_", metavar="INPUT")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for tables/, figures/, report.html, report.pdf, summary.txt, provenance.json.",
)
@click.option(
    "--study", default=None, help="Study slug/id (required with a database URL; filters a file)."
)
@click.option(
    "--stimuli",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Stimulus set folder: adds metric-vs-human 2AFC agreement for every loss.",
)
@click.option(
    "--metric",
    "metric_names",
    multiple=True,
    help="Only these metrics (repeatable; default: all of generation.losses).",
)
@click.option(
    "--loss-weights",
    "loss_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A fitted-loss file from `pstudy losses fit` scored as one more metric "
    "(repeatable; needs --stimuli).",
)
@click.option(
    "--fit-holdout",
    "fit_holdout",
    multiple=True,
    type=click.Choice(FITTABLE_LOSSES),
    help="Fit this loss on the votes of half of the images, score it on the other half "
    "(table metric_holdout; repeatable; needs --stimuli).",
)
@click.option(
    "--jnd-levels",
    "jnd_levels",
    default=None,
    metavar="COND=LEVEL,...",
    help="JND studies: each condition's distortion level (e.g. 'q90=1,q50=2,q10=3'; a "
    "number such as a JPEG quality or noise SD) for the psychometric fit (tables "
    "jnd_levels, jnd_psychometric; needs two or more levels).",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.05,
    show_default=True,
    help="Two-sided level for tests and intervals.",
)
@click.option(
    "--n-boot",
    type=click.IntRange(0),
    default=500,
    show_default=True,
    help="Bootstrap replicates (observer bootstrap of scales, cluster bootstrap of rates).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--anchor", default=None, help="Condition fixed at 0 on the scales (default: mean zero)."
)
@click.option(
    "--scale-prior",
    type=click.Choice(["ours", "pwcmp"]),
    default="ours",
    show_default=True,
    help="Prior of the JOD (Thurstone) scales: ours, N(0, 3^2) per condition, or pwcmp's "
    "pw_scale model and prior (also adds per-image scales, scale_jod_by_image).",
)
@click.option(
    "--mixed/--no-mixed",
    default=True,
    show_default=True,
    help="Fit the per-pair crossed random-effects GLMM, the primary test (--no-mixed: the "
    "two-way test of the share of votes gives the verdicts).",
)
@click.option("--min-catch-accuracy", type=RuleValue(0, 1), default=None,
              help=RULES_HELP.format(default=0.8))
@click.option("--min-repeat-consistency", type=RuleValue(0, 1), default=None,
              help=RULES_HELP.format(default="off"))
@click.option("--max-side-rate", type=RuleValue(0.5, 1), default=None,
              help=RULES_HELP.format(default=0.9))
@click.option(
    "--min-side-trials",
    type=click.IntRange(1),
    default=None,
    help="Judge side bias only from this many main trials on. "
    + RULES_HELP.format(default=10).split(";")[0] + ".",
)
@click.option("--fast-rt-ms", type=click.FloatRange(0), default=None,
              help="A response faster than this (ms) is too fast. "
              + RULES_HELP.format(default=300).split(";")[0] + ".")
@click.option("--max-fast-fraction", type=RuleValue(0, 1), default=None,
              help=RULES_HELP.format(default=0.2))
@click.option(
    "--max-outlier-score",
    type=float,
    default=None,
    help="Exclude observers above this outlier score (default: report only).",
)
@click.option(
    "--max-exposure-miss-fraction",
    type=click.FloatRange(0, 1),
    default=None,
    help="Exclude participants with more than this fraction of frame-timed exposures "
    "missing the request by more than one frame (exposure_ok false; default: report only).",
)
@click.option("--completed-only", is_flag=True, help="Drop participants who did not complete.")
@click.option(
    "--count-returned/--drop-returned",
    default=None,
    help="Whether participants who withdrew count. Default: the study's rule, else they don't.",
)
@click.option(
    "--ignore-study-exclusions",
    is_flag=True,
    help="Keep participants the study itself flagged as excluded.",
)
@click.option(
    "--planning-rates",
    default="0.6,0.65,0.7,0.75",
    callback=_rates,
    show_default=True,
    help="True preference rates for the votes-needed table.",
)
@click.option(
    "--power",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.8,
    show_default=True,
)
@click.option(
    "--pdf/--no-pdf",
    default=None,
    help="Also print report.pdf from report.html with Chromium (/usr/bin/chromium). "
    "Default: on when Chromium is installed.",
)
@click.option("--quiet", is_flag=True, help="No progress bars or summary on the terminal.")
def analyze(
    input_,
    out_dir,
    study,
    stimuli,
    metric_names,
    loss_files,
    fit_holdout,
    jnd_levels,
    alpha,
    n_boot,
    seed,
    anchor,
    scale_prior,
    mixed,
    min_catch_accuracy,
    min_repeat_consistency,
    max_side_rate,
    min_side_trials,
    fast_rt_ms,
    max_fast_fraction,
    max_outlier_score,
    max_exposure_miss_fraction,
    completed_only,
    count_returned,
    ignore_study_exclusions,
    planning_rates,
    power,
    pdf,
    quiet,
):
    """Analyse 2AFC votes: QC, rates, clustered tests, scales, report.

    INPUT is a responses file (contract 2, .csv or .parquet), a pwcmp long-format CSV
    (observer, scene, condition_A, condition_B, is_A_selected), or a database URL
    together with --study.

    \b
    Examples:
      pstudy analyze responses.csv --out results/
      pstudy analyze tests/data/pwcmp/ex3_tmo_cmp_data.csv --out pwcmp-results --no-mixed
      pstudy analyze ex3_tmo_cmp_data.csv --scale-prior pwcmp --out pwcmp-jod --no-mixed
      pstudy analyze sqlite:///instance/study.sqlite3 --study demo --out results/
      pstudy analyze responses.parquet --stimuli stimuli/demo --metric l1 --metric l2 --out r/
      pstudy analyze responses.csv --out results/ --no-pdf   # HTML report only
      pstudy analyze votes.parquet --stimuli stimuli/demo --loss-weights fitted/watson-dft.pt \\
          --fit-holdout watson-dft --out r/
    """
    from analysis.report import AnalysisOptions, run_analysis, write_outputs
    from analysis.report_pdf import PdfUnavailable, pdf_unavailable_reason

    no_pdf = pdf_unavailable_reason() if pdf is not False else None
    if pdf and no_pdf:  # asked for explicitly: stop before the work
        raise click.BadParameter(f"cannot print report.pdf: {no_pdf}", param_hint="--pdf")
    try:
        loaded = load_responses(input_, study)
    except ResponsesFormatError as exc:
        raise click.ClickException(str(exc)) from exc
    known = set(loaded.frame["condition_left"]) | set(loaded.frame["condition_right"])
    if anchor is not None and anchor not in known:
        raise click.BadParameter(
            f"{anchor!r} is not a condition ({', '.join(sorted(known))})", param_hint="--anchor"
        )
    if metric_names:
        from generation.losses import available_losses

        unknown = [m for m in metric_names if m not in available_losses()]
        if unknown:
            raise click.BadParameter(
                f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(available_losses())}",
                param_hint="--metric",
            )
    if (loss_files or fit_holdout) and not stimuli:
        option = "--loss-weights" if loss_files else "--fit-holdout"
        raise click.BadParameter(
            "needs --stimuli DIR (the stimulus set the study showed)", param_hint=option
        )
    for path in loss_files:
        from generation.losses.fitted import read_fitted

        try:
            fitted = read_fitted(path)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--loss-weights") from exc
        if fitted is None:
            raise click.BadParameter(
                f"{path} is not a fitted-loss file (written by `pstudy losses fit`)",
                param_hint="--loss-weights",
            )
    given = {  # what the analyst set on the command line (None: not given)
        "min_catch_accuracy": min_catch_accuracy,
        "min_repeat_consistency": min_repeat_consistency,
        "max_side_rate": max_side_rate,
        "min_side_trials": min_side_trials,
        "fast_rt_ms": fast_rt_ms,
        "max_fast_fraction": max_fast_fraction,
        "exclude_returned": None if count_returned is None else not count_returned,
        "max_outlier_score": max_outlier_score,
        "max_exposure_miss_fraction": max_exposure_miss_fraction,
        "completed_only": completed_only or None,
        "honour_study_exclusions": False if ignore_study_exclusions else None,
    }
    overrides = {k: (None if v == OFF else v) for k, v in given.items() if v is not None}
    qc, rule_sources = qc_options_from_study(loaded.study_exclusion_rules, overrides)
    options = AnalysisOptions(
        alpha=alpha,
        n_boot=n_boot,
        seed=seed,
        anchor=anchor,
        mixed=mixed,
        stimuli=str(stimuli) if stimuli else None,
        metrics=tuple(metric_names) or None,
        loss_files=tuple(str(path) for path in loss_files),
        fit_holdout=tuple(fit_holdout),
        planning_rates=planning_rates,
        power=power,
        qc=qc,
        qc_sources=rule_sources,
        progress=not quiet,
        scale_prior=scale_prior,
        jnd_levels=_jnd_levels(jnd_levels),
    )
    try:
        result = run_analysis(loaded, options)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        hashes = write_outputs(result, out_dir, pdf=pdf is not False and not no_pdf)
    except PdfUnavailable as exc:
        raise click.ClickException(
            f"report.pdf not written: {exc} (everything else is in {out_dir})"
        ) from exc
    if no_pdf:
        click.echo(f"report.pdf not written: {no_pdf}.", err=True)
    if not quiet:
        click.echo(result.summary)
        click.echo(
            f"Wrote {len(hashes)} files to {out_dir} (open {Path(out_dir) / 'report.html'})."
        )
