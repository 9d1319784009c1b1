"""The words a researcher reads in summary.txt and report.html: tables called by what they
hold ("the mixed-model test per pair"), each table's file named once in parentheses,
"Holm-adjusted p" instead of column names; the machine-readable names stay in the CSVs.
A small simulated study (3 conditions, 12 participants, 6 images), analysed for real."""

from __future__ import annotations

import re
from html import escape
from pathlib import Path

import pandas as pd
import pytest

from analysis.formatting import format_number, format_p
from analysis.report import AnalysisOptions, run_analysis, write_outputs
from tests.glmm_support import small_report_study

RAW_NAMES = ("pair_tests_glmm", "pairs_everyone", "p_Holm", "p_holm", "(table pairs)")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return small_report_study(tmp_path_factory.mktemp("study"))


def _written(loaded, out: Path, mixed: bool) -> Path:
    result = run_analysis(loaded, AnalysisOptions(n_boot=30, mixed=mixed))
    write_outputs(result, out, pdf=False)
    return out


@pytest.fixture(scope="module")
def primary(loaded, tmp_path_factory) -> Path:
    return _written(loaded, tmp_path_factory.mktemp("primary"), mixed=True)


@pytest.fixture(scope="module")
def fallback(loaded, tmp_path_factory) -> Path:
    return _written(loaded, tmp_path_factory.mktemp("no-mixed"), mixed=False)


def _holm(p: float) -> str:
    text = format_p(p)
    return f"Holm-adjusted p {text}" if text[0] in "<>" else f"Holm-adjusted p = {text}"


def _verdict_lines(summary: str) -> dict[frozenset, str]:
    return {
        frozenset(m.group(1, 2)): line
        for line in summary.splitlines()
        if (m := re.match(r"(\w+) over (\w+): ", line))
    }


def test_the_summary_names_the_tests_in_words_and_each_file_once(primary):
    summary = (primary / "summary.txt").read_text()
    assert (
        "Verdicts below come from the mixed-model test per pair (table "
        "pair_tests_glmm.csv), the primary test: a logistic mixed model with participants "
        "and images as crossed random effects"
    ) in summary
    assert "its p-values Holm-adjusted over all pairs" in summary
    assert "the share of all votes (table pairs.csv) with its two-way interval" in summary
    for file in ("pair_tests_glmm.csv", "pairs.csv"):
        assert summary.count(file) == 1 and (primary / "tables" / file).is_file()
    for raw in RAW_NAMES:
        assert raw not in summary.replace("(table pair_tests_glmm.csv)", ""), raw
    # every verdict quotes the primary test's Holm-adjusted p and the share's, in words
    tests = pd.read_csv(primary / "tables" / "pair_tests_glmm.csv")
    shares = pd.read_csv(primary / "tables" / "pairs.csv")
    lines = _verdict_lines(summary)
    assert len(lines) == len(tests) == 3
    for test, share in zip(tests.itertuples(), shares.itertuples(), strict=True):
        line = lines[frozenset((test.condition_a, test.condition_b))]
        assert ": mixed-model test with participants and images random, " in line
        assert f"%, {_holm(test.p_holm)}): " in line
        assert line.endswith(f"two-way test {_holm(share.p_holm)}.)")
    assert re.search(r"main trials \(p (= \.\d{3}|< \.001|> \.999)\)\.", summary)


def test_the_report_and_its_notes_use_the_same_words(primary):
    html = (primary / "report.html").read_text()
    summary = (primary / "summary.txt").read_text()
    shown = html[html.index("id='sec-summary'") : html.index("id='sec-methods'")]
    for line in summary.split("\nProvenance: ")[0].strip().splitlines():
        assert f"<p>{escape(line)}</p>" in shown
    assert "p_Holm" not in html
    notes = html[html.index("Notes and limits") :]
    assert "The share of votes per pair (table pairs.csv): the share of all votes" in notes
    assert "The primary test, the mixed-model test per pair (table pair_tests_glmm.csv): " in notes
    assert (
        "see the exclusion rules and the exclusion log, tables exclusion_rules.csv and "
        "exclusion_log.csv)"
    ) in notes
    assert "*: the mixed-model test&#x27;s Holm-adjusted p &lt; .05" in html


def test_without_the_mixed_model_the_summary_names_the_share_of_votes(fallback):
    summary = (fallback / "summary.txt").read_text()
    assert (
        "The mixed model was not fitted (--no-mixed): verdicts below come from the share of "
        "votes per pair (table pairs.csv) with its two-way cluster-robust interval and t test"
    ) in summary
    assert summary.count("pairs.csv") == 1 and "pair_tests_glmm" not in summary
    shares = pd.read_csv(fallback / "tables" / "pairs.csv")
    lines = _verdict_lines(summary)
    assert len(lines) == len(shares) == 3
    for share in shares.itertuples():
        line = lines[frozenset((share.condition_a, share.condition_b))]
        assert ": share of votes, two-way test with participants and images random, " in line
        assert f"%, {_holm(share.p_holm)}): " in line
    html = (fallback / "report.html").read_text()
    assert (
        "The mixed-model test per pair was not fitted (--no-mixed); verdicts use the two-way "
        "test of the share of votes per pair."
    ) in html


def test_the_agreement_table_prints_its_statistics_by_name_and_the_csv_keeps_the_keys(
    primary,
):
    """The report's agreement table and the summary say Fleiss' κ and Kendall's u; the
    CSV, Parquet and JSON tables keep the keys fleiss_kappa and kendall_u."""
    keys = ["fleiss_kappa", "kendall_u"]
    csv = pd.read_csv(primary / "tables" / "agreement.csv")
    assert csv["statistic"].tolist() == keys
    assert pd.read_parquet(primary / "tables" / "agreement.parquet")["statistic"].tolist() == keys
    value = dict(zip(csv["statistic"], csv["value"], strict=True))
    html = (primary / "report.html").read_text()
    start = html.index("id='table-agreement'")
    block = html[start : html.index("</table>", start)]
    for key, label in (("fleiss_kappa", "Fleiss' κ"), ("kendall_u", "Kendall's u")):
        assert re.search(
            rf"<td>{label}</td>\s*<td>{re.escape(format_number(value[key]))}</td>", block
        ), label
        assert key not in html
    summary = (primary / "summary.txt").read_text()
    assert (
        "Agreement between participants (1 = all agree on every item): "
        f"Fleiss' κ = {format_number(value['fleiss_kappa'])}, "
        f"Kendall's u = {format_number(value['kendall_u'])}."
    ) in summary
    assert "fleiss_kappa" not in summary and "kendall_u" not in summary
