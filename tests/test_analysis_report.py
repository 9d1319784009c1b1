"""The paper-ready report end to end (#22 item 4): a real study on SQLite answered through
the HTTP API by synthetic observers, ``pstudy analyze`` on its database, then report.html
in Chromium at 1,280 and 390 px and report.pdf read back with pypdf.

Chromium is required here (no skip): the PDF is printed by the same /usr/bin/chromium.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import unicodedata
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from pypdf import PdfReader

from analysis.report_pdf import CHROMIUM_ARGS, CHROMIUM_PATH, pdf_unavailable_reason
from analysis.simulation import simulate_responses
from study_app.cli import main
from tests.study_support import make_study, write_stimulus_set
from tests.test_pages_support import save_screenshot

SECTIONS = [
    "1 Summary",
    "2 Methods",
    "3 Participants and quality control",
    "4 Pairwise results",
    "5 Scales",
    "6 Metric agreement",
    "7 Provenance",
]
VOTES_PER_ITEM, TRIALS, EXPOSURE_MS = 6, 12, 1500


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A study (3 conditions, 5 images, K = 6, M = 12, 1.5 s exposure) answered by one
    left-clicking and eight metric observers, analysed with the study's own rules."""
    from werkzeug.serving import make_server

    from study_app import create_app
    from study_app.extensions import db
    from study_app.simulate import run_simulation

    reason = pdf_unavailable_reason()
    if reason:  # the PDF is part of what is tested: a missing Chromium fails, never skips
        pytest.fail(f"report.pdf cannot be printed: {reason}", pytrace=False)
    root = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{root / 'study.sqlite3'}"
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url, "SECRET_KEY": "t"})
    with app.app_context():
        db.create_all()
    stimuli = write_stimulus_set(root / "set", n_images=5, conditions=("l1", "l2", "ssim"), size=16)
    make_study(
        app,
        stimuli,
        slug="paper",
        title="Report study",
        votes_per_item=VOTES_PER_ITEM,
        trials_per_participant=TRIALS,
        exposure_ms=EXPOSURE_MS,
    )
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        for observer, n, seed in (("one-side", 1, 1), ("metric", 8, 2)):
            run_simulation(
                base,
                "paper",
                participants=n,
                concurrency=2,
                observer=observer,
                seed=seed,
                progress=False,
                pid_prefix=f"{observer}{seed}",
            )
    finally:
        server.shutdown()
        thread.join(timeout=10)
        with app.app_context():
            db.engine.dispose()
    out = root / "out"
    result = CliRunner().invoke(
        main, ["analyze", url, "--study", "paper", "--out", str(out), "--n-boot", "60", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    return out


def _normalized(text: str) -> str:
    return unicodedata.normalize("NFKC", text)  # Chromium's ligatures (ﬁ, ﬀ) as letters


def _pdf_text(path: Path) -> str:
    return _normalized("\n".join(page.extract_text() for page in PdfReader(path).pages))


@pytest.mark.browser
def test_report_fits_a_desktop_and_a_phone_without_sideways_scrolling(browser, report):
    for name, width, height in (("report-desktop", 1280, 800), ("report-phone", 390, 844)):
        context = browser.new_context(viewport={"width": width, "height": height})
        try:
            page = context.new_page()
            page.goto((report / "report.html").resolve().as_uri())
            scroll, client = page.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            assert scroll <= client == width, (name, scroll, client)
            # wide tables scroll inside their own box, which stays inside the page
            boxes = page.eval_on_selector_all(
                ".table-wrap, figure img", "els => els.map(e => e.getBoundingClientRect().right)"
            )
            assert boxes and max(boxes) <= width, (name, max(boxes))
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
            assert headings == SECTIONS
            captions = page.eval_on_selector_all(
                "figcaption strong", "els => els.map(e => e.textContent)"
            )
            assert captions == [f"Figure {i}." for i in range(1, len(captions) + 1)]
            assert len(captions) == 4
            save_screenshot(page, name, docs_full_page=False)
        finally:
            context.close()
    # printed (A4 less the margins is about 680 CSS px): no contents list, a page break
    # before each section but the first, figures and tables never split, nothing cut off
    context = browser.new_context(viewport={"width": 680, "height": 960})
    try:
        page = context.new_page()
        page.emulate_media(media="print")
        page.goto((report / "report.html").resolve().as_uri())
        assert page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
        style = (
            "([sel, prop]) => [...document.querySelectorAll(sel)]"
            ".map(e => getComputedStyle(e)[prop])"
        )
        assert page.evaluate(style, ["nav", "display"]) == ["none"]
        breaks = page.evaluate(style, ["section.section", "breakBefore"])
        assert breaks == ["auto"] + ["page"] * (len(SECTIONS) - 1)
        assert set(page.evaluate(style, ["figure, .table-block", "breakInside"])) == {"avoid"}
    finally:
        context.close()


@pytest.mark.browser
def test_report_pdf_exists_and_has_every_section(report):
    pdf = report / "report.pdf"
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    text = _pdf_text(pdf)
    for heading in SECTIONS:
        assert heading in text, heading
    assert "Figure 4." in text and "Table 1." in text
    # print CSS: every section after the summary starts a page
    starts = [_normalized(page.extract_text()) for page in PdfReader(pdf).pages]
    for heading in SECTIONS[1:]:
        assert any(page.startswith(heading) for page in starts), heading
    outputs = json.loads((report / "provenance.json").read_text())["outputs"]
    assert outputs["report.pdf"] == hashlib.sha256(data).hexdigest()
    assert os.path.exists(CHROMIUM_PATH) and "--no-sandbox" in CHROMIUM_ARGS


@pytest.mark.browser
def test_report_reads_like_a_paper(report):
    html = (report / "report.html").read_text()
    parts = pd.read_csv(report / "tables" / "participants.csv")
    rules = pd.read_csv(report / "tables" / "exclusion_rules.csv").set_index("rule")
    pairs = pd.read_csv(report / "tables" / "pairs.csv")
    # the methods paragraph: the study's settings, the counts and each rule's exclusions
    methods = html[html.index("2 Methods") : html.index("3 Participants")]
    assert f"K = {VOTES_PER_ITEM} votes per item" in methods
    assert f"M = {TRIALS} main" in methods and f"{EXPOSURE_MS:,} ms" in methods
    assert "3 conditions (l1, l2, ssim) on 5 images" in methods
    kept = int((~parts["excluded"]).sum())
    assert f"{len(parts)} participants answered at least one trial" in methods
    assert f"{kept} participants were included ({len(parts) - kept} excluded)" in methods
    assert f"contributing {int(pairs['n'].sum()):,} main-trial votes" in methods
    by_reason = parts["reasons"].fillna("").str.split(";").explode().value_counts()
    assert rules.loc["side_bias", "n_excluded"] >= 1  # the left-clicker
    for rule, sentence in (
        ("catch_accuracy", "catch-trial accuracy below 0.75"),
        ("side_bias", "more than 0.9 of main-trial answers on one side"),
    ):
        assert f"{sentence}" in methods
        n = int(by_reason.get(rule, 0))
        assert n == rules.loc[rule, "n_excluded"]
        assert re.search(re.escape(sentence) + r"[^;]*\(" + str(n) + " excluded\\)", methods)
    assert "Baayen, Davidson &amp; Bates, 2008" in methods and "Holm" in methods
    # tables: numbered captions, human headers with units, print-formatted numbers
    assert re.findall(r"<strong>Table (\d+)\.</strong>", html) == [
        str(i) for i in range(1, html.count("<strong>Table ") + 1)
    ]
    headers = re.findall(r"<th>([^<]*)</th>", html)
    assert "Median RT (ms)" in headers and "95 % CI" in headers and "p (Holm)" in headers
    assert "Wilson 95 % CI" not in headers  # no interval that treats votes as independent
    assert not {"wilson_low", "p_holm", "median_rt_ms", "rate_a"} & set(headers)
    cells = re.findall(r"<td>([^<]*)</td>", html)
    assert not [c for c in cells if re.fullmatch(r"[-−]?\d\.\d+e[-+]\d+", c)]  # no 1.2e-17
    decimals = [c for c in cells if re.fullmatch(r"[-−]?[\d,]+\.\d+", c)]
    assert decimals and all(len(re.sub(r"\D", "", c).lstrip("0")) <= 3 for c in decimals), (
        decimals
    )  # 3 significant digits
    p_holm = pairs["p_holm"].iloc[0]
    apa = "< .001" if p_holm < 0.001 else ("> .999" if p_holm >= 0.9995 else f"{p_holm:.3f}"[1:])
    assert html.count(f"<td>{apa.replace('<', '&lt;').replace('>', '&gt;')}</td>") >= 1
    # the primary test first, the sensitivity table in a labelled supplement; outputs that
    # miss their level in the calibration are not in the report
    supplement = html.index("<h3>4.1 Supplementary: sensitivity to the exclusions")
    assert html.index("id='table-pair_tests_glmm'") < html.index("id='table-pairs'") < supplement
    assert html.index("id='table-pairs_everyone'") > supplement
    for secondary in ("cluster_glm", "per_participant_tests", "cluster_bootstrap"):
        assert f"id='table-{secondary}'" not in html


def test_missing_chromium_is_a_clear_message(tmp_path, monkeypatch):
    votes = tmp_path / "votes.csv"
    simulate_responses({"a": 0.0, "b": 1.0}, 6, 3, 8, seed=0).to_csv(votes, index=False)
    monkeypatch.setenv("PSTUDY_CHROMIUM", str(tmp_path / "no-chromium"))
    args = ["analyze", str(votes), "--no-mixed", "--n-boot", "10", "--quiet"]
    asked = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--pdf"])
    assert asked.exit_code == 2 and "Traceback" not in asked.output
    assert f"cannot print report.pdf: no Chromium at {tmp_path / 'no-chromium'}" in asked.output
    assert "--no-pdf" in asked.output and not (tmp_path / "a").exists()
    default = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b")])
    assert default.exit_code == 0 and "report.pdf not written: no Chromium" in default.output
    assert (tmp_path / "b" / "report.html").is_file()
    assert not (tmp_path / "b" / "report.pdf").exists()
