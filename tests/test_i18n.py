"""Participant pages in the study's language: every participant-facing string is in the
gettext catalogue and translated (German shipped complete), the compiled catalogue
matches its source, and a German study shows no English text."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.mofile import read_mo
from babel.messages.pofile import read_po

from study_app.i18n import LANGUAGES, participant_texts, study_language
from tests.study_support import make_study, write_stimulus_set

REPO = Path(__file__).resolve().parent.parent
TRANSLATIONS = REPO / "study_app" / "translations"
PLACEHOLDER = re.compile(r"%\((\w+)\)[sd]")


def source_messages() -> set:
    """Every gettext message in the source, extracted now (as `pybabel extract` does)."""
    method_map = [("**.py", "python"), ("**/templates/participant/**.html", "jinja2")]
    keywords = {"_": None, "gettext": None, "ngettext": (1, 2), "lazy_gettext": None}
    found = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
            str(REPO / "study_app"), method_map, keywords=keywords):
        found.add(message if isinstance(message, str) else tuple(message))
    return found


def _key(value):
    return value if isinstance(value, str) else tuple(value)


def catalogue(language: str):
    with open(TRANSLATIONS / language / "LC_MESSAGES" / "messages.po", "rb") as handle:
        return read_po(handle)


@pytest.mark.parametrize("language", sorted(set(LANGUAGES) - {"en"}))
def test_every_participant_string_is_translated(language):
    catalog = catalogue(language)
    translated = {}
    for message in catalog:
        if not message.id:
            continue
        key = message.id if isinstance(message.id, str) else tuple(message.id)
        strings = [message.string] if isinstance(message.string, str) else message.string
        assert all(s.strip() for s in strings), f"untranslated in {language}: {key!r}"
        assert not message.fuzzy, f"fuzzy translation in {language}: {key!r}"
        ids = [key] if isinstance(key, str) else list(key)
        for text in strings:  # every placeholder kept, none invented
            assert set(PLACEHOLDER.findall(text)) <= set().union(
                *(PLACEHOLDER.findall(i) for i in ids)), (key, text)
        translated[key] = strings
    missing = source_messages() - set(translated)
    assert not missing, (f"strings with no {language} translation (run pybabel extract/update, "
                         f"see docs/participant_pages.md): {sorted(map(str, missing))}")
    stale = set(translated) - source_messages()
    assert not stale, f"translations of strings no longer in the source: {sorted(map(str, stale))}"


@pytest.mark.parametrize("language", sorted(set(LANGUAGES) - {"en"}))
def test_the_compiled_catalogue_is_the_source_catalogue(language):
    def entries(catalog) -> dict:
        return {_key(m.id): _key(m.string) for m in catalog if m.id}

    with open(TRANSLATIONS / language / "LC_MESSAGES" / "messages.mo", "rb") as handle:
        compiled = entries(read_mo(handle))
    source = entries(catalogue(language))
    assert compiled == source, "run: pybabel compile -d study_app/translations"


def test_the_participant_script_has_no_text_of_its_own():
    """participant.js shows only texts from the catalogue (study_app.i18n), so none can
    be left untranslated: a string literal that reads like a sentence is an error. The
    same holds for the display step's script (calibration.js)."""
    for name in ("participant.js", "calibration.js"):
        script = (REPO / "study_app" / "static" / "js" / name).read_text()
        code = re.sub(r"^\s*(//|/?\*).*$", "", script, flags=re.M)  # comments
        sentences = re.findall(r'"([A-Z][a-z]+ [^"]*)"', code)
        assert [s for s in sentences if not s.startswith("Bearer")] == [], name
        used = set(re.findall(r'\bt\("(\w+)"', code))
        assert used and used <= set(participant_texts()), (name, used - set(participant_texts()))


class _Text(HTMLParser):
    """The visible text of a page: text nodes and aria-labels, scripts left out."""

    def __init__(self):
        super().__init__()
        self.chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")
        self.chunks += [value for name, value in attrs if name == "aria-label" and value]

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.chunks.append(" ".join(data.split()))


def english_phrases() -> set[str]:
    """The English source texts of more than one word (placeholders cut out)."""
    phrases = set()
    for message in source_messages():
        for text in [message] if isinstance(message, str) else message:
            for part in PLACEHOLDER.split(text)[::2]:
                if len(part.split()) > 1:
                    phrases.add(part.strip(" .:;,()"))
    return {p for p in phrases if len(p.split()) > 1}


def test_a_german_study_page_and_api_show_no_english(app, client, tmp_path):
    slug = make_study(app, write_stimulus_set(tmp_path / "set"), slug="de-study",
                      title="Bildstudie", language="de", exposure_ms=500, break_every=3)
    page = client.get(f"/s/{slug}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert '<html lang="de">' in html
    parser = _Text()
    parser.feed(html)
    with app.app_context(), app.test_request_context(), study_language("de"):
        texts = participant_texts()
    german = {" ".join(m.string.split()) for m in catalogue("de") if isinstance(m.string, str)}
    allowed = german | {"Bildstudie", "F", "J", "/", "←", "→", "F / ←", "J / →"}
    unknown = [chunk for chunk in parser.chunks
               if chunk not in allowed and not any(chunk in g for g in german)]
    assert unknown == [], f"text on the German page that is not from the catalogue: {unknown}"
    study = client.get(f"/api/v1/studies/{slug}").get_json()["study"]
    shown = [study["question"], study["instructions"], study["consent"], *texts.values(),
             *parser.chunks]
    leaks = sorted({phrase for phrase in english_phrases() for text in shown if phrase in text})
    assert leaks == [], f"English on the German page: {leaks}"
    assert study["language"] == "de" and study["question"] == "Welches Bild ist der Referenz ähnlicher?"
    assert "0.5 s" in study["instructions"] and "Nach jeweils 3" in study["instructions"]
    english = client.get(f"/api/v1/studies/{make_study(app, tmp_path / 'set', slug='en-study')}")
    assert english.get_json()["study"]["question"] == "Which image is closer to the reference?"
