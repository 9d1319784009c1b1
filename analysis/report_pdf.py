"""``report.pdf``: the HTML report printed by Debian's Chromium through Playwright.

The same browser and flags as the browser tests (``/usr/bin/chromium``, headless, off the
network); A4 with page numbers, the report's print CSS (no contents list, each section
on a new page, figures and table rows kept whole), a PDF outline and tags.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ENV = "PSTUDY_CHROMIUM"  # another Chromium binary to print with
# As root, and off the closed network (no background fetches, no component updates).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FOOTER = (
    "<div style='font:8px sans-serif;width:100%;text-align:center;color:#555'>"
    "<span class='pageNumber'></span> / <span class='totalPages'></span></div>"
)
INSTALL_HINT = "install it (Debian: apt-get install chromium) or pass --no-pdf"


class PdfUnavailable(RuntimeError):
    """The PDF cannot be printed here; the message names what is missing and the fix."""


def chromium_path() -> str:
    """The Chromium that prints: ``$PSTUDY_CHROMIUM``, else ``/usr/bin/chromium``."""
    return os.environ.get(CHROMIUM_ENV) or CHROMIUM_PATH


def pdf_unavailable_reason(chromium: str | None = None) -> str | None:
    """Why ``report.pdf`` cannot be printed on this machine, or None when it can."""
    chromium = chromium or chromium_path()
    if not (os.path.isfile(chromium) and os.access(chromium, os.X_OK)):
        return f"no Chromium at {chromium}; {INSTALL_HINT}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install -r requirements.txt)"
    return None


def _print(html_path: Path, pdf_path: Path, chromium: str, timeout_s: float) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.goto(html_path.resolve().as_uri(), wait_until="load", timeout=timeout_s * 1000)
            page.pdf(
                path=str(pdf_path),
                format="A4",
                print_background=True,
                prefer_css_page_size=True,
                display_header_footer=True,
                header_template="<span></span>",
                footer_template=FOOTER,
                outline=True,
                tagged=True,
            )
        finally:
            browser.close()


def render_pdf(
    html_path: str | Path,
    pdf_path: str | Path,
    chromium: str | None = None,
    timeout_s: float = 120.0,
) -> Path:
    """Print ``html_path`` (a self-contained page) to ``pdf_path`` with Chromium
    (``chromium``; None: :func:`chromium_path`).

    Raises :class:`PdfUnavailable` when Chromium or Playwright is missing, or Chromium
    fails (the message says what to do). Runs in its own thread, so it also works where
    an event loop or another Playwright session is already running in the caller's thread.
    """
    chromium = chromium or chromium_path()
    reason = pdf_unavailable_reason(chromium)
    if reason:
        raise PdfUnavailable(reason)
    html_path, pdf_path = Path(html_path), Path(pdf_path)
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pool.submit(_print, html_path, pdf_path, chromium, timeout_s).result()
        except Exception as exc:  # Playwright's errors: launch failures, timeouts
            raise PdfUnavailable(
                f"Chromium ({chromium}) could not print {html_path}: {exc}".strip()
            ) from exc
    return pdf_path
