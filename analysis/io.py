"""Reading and validating responses: contract-2 CSV/Parquet, pwcmp long format, database.

Everything is normalised to contract-2 columns (``RESPONSE_COLUMNS``). A bad file raises
``ResponsesFormatError`` whose message names the row and the column and says how to fix
it; callers turn it into a clean command-line error.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# Frame-timed limited exposure (milliseconds, whole frames; ``exposure_ok``: measured
# within one frame of the request, missing without frame timing). Optional columns.
TIMING_COLUMNS = [
    "exposure_requested_ms",
    "frame_period_ms",
    "exposure_frames_requested",
    "exposure_onset_ms",
    "exposure_offset_ms",
    "exposure_frames_measured",
    "exposure_measured_ms",
    "exposure_ok",
]
# Sequential presentation (the exposure columns above then time the first image): the
# interval and the second image. Optional, like the timing columns.
SEQUENCE_COLUMNS = [
    "isi_requested_ms",
    "second_requested_ms",
    "second_frames_requested",
    "second_onset_ms",
    "second_offset_ms",
    "second_frames_measured",
    "isi_measured_ms",
    "second_measured_ms",
]
# The participant's display check (study_app.calibration; repeated on each of their rows,
# missing without one). Optional columns, like the timing.
DISPLAY_COLUMNS = [
    "display_status",
    "display_px_per_mm",
    "display_px_per_deg",
    "display_viewing_distance_mm",
    "display_dpr",
    "display_unscaled",
]
RESPONSE_COLUMNS = [
    "study",
    "participant",
    "trial_index",
    "trial_kind",
    "image_id",
    "condition_left",
    "condition_right",
    "choice",
    "chosen_condition",
    "expected_condition",
    "rt_ms",
    "presented_at",
    "answered_at",
    "reference_shown",
    "viewport_w",
    "viewport_h",
    "device_pixel_ratio",
    "participant_status",
    "participant_excluded",
    "exclusion_reasons",
    *TIMING_COLUMNS,
    "task",  # "2afc" (filled in when missing) or "jnd"
    "jnd_answer",  # jnd: "same" | "different"; empty for 2afc
    *SEQUENCE_COLUMNS,
    *DISPLAY_COLUMNS,
]
# Without these a file cannot be analysed; the others are filled with "unknown" values.
CORE_COLUMNS = [
    "participant",
    "trial_kind",
    "image_id",
    "condition_left",
    "condition_right",
    "choice",
    "chosen_condition",
]
PWCMP_COLUMNS = ["observer", "scene", "condition_A", "condition_B", "is_A_selected"]
TRIAL_KINDS = ("main", "catch", "repeat")
CHOICES = ("left", "right")
TASKS = ("2afc", "jnd")
JND_ANSWERS = ("same", "different")
STATUSES = ("started", "completed", "returned")
MAX_REPORTED = 5  # offending rows named in one error message


class ResponsesFormatError(ValueError):
    """The input is not valid contract-2 or pwcmp data; the message says where and why."""


@dataclass
class LoadedResponses:
    """Validated responses in contract-2 columns plus where they came from.

    ``sides_recorded`` is False for pwcmp data (left/right unknown: no position bias).
    ``input_sha256`` is the file's hash (or, for a database, the hash of the canonical
    CSV of the rows read). ``export_provenance`` is what the study platform's export says
    about the data (study config, its exclusion rules, hashes): the Parquet metadata, a
    CSV's ``<file>.provenance.json`` sidecar, or the database; ``None`` for other files.
    """

    frame: pd.DataFrame
    source: str
    input_format: str
    input_sha256: str
    sides_recorded: bool = True
    filled_columns: list[str] = field(default_factory=list)
    export_provenance: dict | None = None

    @property
    def study_exclusion_rules(self) -> dict | None:
        """The study's own exclusion rules, when the export carries them."""
        return (self.export_provenance or {}).get("exclusion_rules")


def read_export_provenance(path: Path) -> dict | None:
    """The study platform's provenance of an exported file: Parquet schema metadata
    (key ``pstudy``) or the CSV's ``<file>.provenance.json`` sidecar; ``None`` if absent."""
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            metadata = pq.read_schema(path).metadata or {}
            raw = metadata.get(b"pstudy")
            return json.loads(raw) if raw else None
        sidecar = path.with_name(path.name + ".provenance.json")
        return json.loads(sidecar.read_text()) if sidecar.is_file() else None
    except (OSError, ValueError) as exc:
        raise ResponsesFormatError(f"cannot read the export's provenance of {path}: {exc}") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_frame(frame: pd.DataFrame) -> str:
    """Hex SHA-256 of a frame's canonical CSV (column order as given, no index)."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return hashlib.sha256(buffer.getvalue().encode()).hexdigest()


def _row_label(position: int, csv: bool) -> str:
    return f"row {position + 1} (file line {position + 2})" if csv else f"row {position + 1}"


def _fail(positions: np.ndarray, column: str, problem: str, fix: str, values, csv: bool):
    shown = []
    for pos in positions[:MAX_REPORTED]:
        value = values[pos]
        shown.append(f"{_row_label(int(pos), csv)}: {value!r}")
    more = (
        f" (and {len(positions) - MAX_REPORTED} more rows)" if len(positions) > MAX_REPORTED else ""
    )
    raise ResponsesFormatError(
        f"column '{column}' {problem} at " + "; ".join(shown) + more + f". Fix: {fix}"
    )


def _text(series: pd.Series) -> pd.Series:
    """Strings with missing values as empty strings."""
    return series.astype(object).where(series.notna(), "").astype(str).str.strip()


def _parse_bool(series: pd.Series, column: str, csv: bool) -> pd.Series:
    if series.dtype == bool:
        return series
    mapping = {
        "true": True,
        "false": False,
        "1": True,
        "0": False,
        "t": True,
        "f": False,
        "yes": True,
        "no": False,
        "": False,
        "1.0": True,
        "0.0": False,
    }
    text = _text(series).str.lower()
    parsed = text.map(mapping)
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if bad.size:
        _fail(bad, column, "is not a boolean", "use true/false (or 1/0)", series.to_numpy(), csv)
    return parsed.astype(bool)


def _parse_number(
    series: pd.Series, column: str, csv: bool, *, integer: bool, minimum=None, required: bool
) -> pd.Series:
    numbers = pd.to_numeric(series, errors="coerce")
    raw_missing = series.isna() | (_text(series) == "")
    bad = np.flatnonzero((numbers.isna() & ~raw_missing).to_numpy())
    if bad.size:
        _fail(
            bad,
            column,
            "is not a number",
            "write plain numbers (e.g. 1532.5)",
            series.to_numpy(),
            csv,
        )
    if required:
        bad = np.flatnonzero(raw_missing.to_numpy())
        if bad.size:
            _fail(bad, column, "is empty", "every row needs a value", series.to_numpy(), csv)
    if integer:
        frac = numbers.notna() & (numbers != np.round(numbers))
        bad = np.flatnonzero(frac.to_numpy())
        if bad.size:
            _fail(bad, column, "is not a whole number", "use integers", series.to_numpy(), csv)
    if minimum is not None:
        bad = np.flatnonzero((numbers < minimum).to_numpy())
        if bad.size:
            _fail(
                bad,
                column,
                f"is below {minimum}",
                f"values must be >= {minimum}",
                series.to_numpy(),
                csv,
            )
    if integer and required:
        return numbers.astype(np.int64)
    return numbers.astype(float)


def _check_choice_set(values: pd.Series, column: str, allowed: tuple[str, ...], csv: bool):
    bad = np.flatnonzero(~values.isin(allowed).to_numpy())
    if bad.size:
        _fail(
            bad,
            column,
            f"is not one of {', '.join(allowed)}",
            f"use exactly one of {', '.join(allowed)} (lower case)",
            values.to_numpy(),
            csv,
        )


def validate_responses(raw: pd.DataFrame, *, csv: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """Check a contract-2 frame and return (normalised copy, names of filled-in columns).

    Raises ``ResponsesFormatError`` naming the first offending rows and the column.
    """
    missing = [c for c in CORE_COLUMNS if c not in raw.columns]
    if missing:
        raise ResponsesFormatError(
            f"missing column(s) {', '.join(missing)}; a responses file (contract 2) needs at "
            f"least {', '.join(CORE_COLUMNS)} (pwcmp files need {', '.join(PWCMP_COLUMNS)})"
        )
    if raw.empty:
        raise ResponsesFormatError("the responses file has no rows; export a study with votes")
    out = pd.DataFrame(index=pd.RangeIndex(len(raw)))
    # frame timing is optional (only limited-exposure studies have it): not "filled"
    optional = {*TIMING_COLUMNS, *SEQUENCE_COLUMNS, "jnd_answer", *DISPLAY_COLUMNS}
    filled = [c for c in RESPONSE_COLUMNS if c not in raw.columns and c not in optional]
    raw = raw.reset_index(drop=True)
    for column in [
        "participant",
        "image_id",
        "condition_left",
        "condition_right",
        "chosen_condition",
    ]:
        values = _text(raw[column])
        bad = np.flatnonzero((values == "").to_numpy())
        if bad.size:
            _fail(
                bad,
                column,
                "is empty",
                "every answered trial needs a value",
                values.to_numpy(),
                csv,
            )
        out[column] = values.astype(object)
    kind = _text(raw["trial_kind"]).str.lower()
    _check_choice_set(kind, "trial_kind", TRIAL_KINDS, csv)
    out["trial_kind"] = kind.astype(object)
    task = _text(raw["task"]).str.lower() if "task" in raw else pd.Series("", index=out.index)
    task = task.where(task != "", "2afc")
    _check_choice_set(task, "task", TASKS, csv)
    out["task"] = task.astype(object)
    jnd = (task == "jnd").to_numpy()
    answer = (
        _text(raw["jnd_answer"]).str.lower()
        if "jnd_answer" in raw
        else pd.Series("", index=out.index)
    )
    _check_choice_set(answer.where(jnd, "same"), "jnd_answer", JND_ANSWERS, csv)
    bad = np.flatnonzero(jnd & (out["chosen_condition"] != answer).to_numpy())
    if bad.size:
        _fail(
            bad,
            "chosen_condition",
            "disagrees with jnd_answer",
            "in a jnd row chosen_condition is the answer (same or different)",
            out["chosen_condition"].to_numpy(),
            csv,
        )
    out["jnd_answer"] = answer.where(jnd, None).astype(object)
    choice = _text(raw["choice"]).str.lower()
    _check_choice_set(choice.where(~jnd, "left"), "choice", CHOICES, csv)
    out["choice"] = choice.astype(object)
    identical_ok = jnd & (out["condition_left"] == "reference").to_numpy()  # a jnd catch
    same = np.flatnonzero(
        (out["condition_left"] == out["condition_right"]).to_numpy() & ~identical_ok
    )
    if same.size:
        _fail(
            same,
            "condition_right",
            "equals condition_left",
            "a 2AFC trial shows two different conditions",
            out["condition_right"].to_numpy(),
            csv,
        )
    shown = np.where(out["choice"] == "left", out["condition_left"], out["condition_right"])
    bad = np.flatnonzero((out["chosen_condition"].to_numpy() != shown) & ~jnd)
    if bad.size:
        _fail(
            bad,
            "chosen_condition",
            "disagrees with choice and condition_left/right",
            "chosen_condition must be condition_left when choice is left, else condition_right",
            out["chosen_condition"].to_numpy(),
            csv,
        )
    out["study"] = _text(raw["study"]).astype(object) if "study" in raw else ""
    if "trial_index" in raw:
        out["trial_index"] = _parse_number(
            raw["trial_index"], "trial_index", csv, integer=True, minimum=0, required=True
        )
    else:
        out["trial_index"] = out.groupby("participant").cumcount().astype(np.int64)
    expected = (
        _text(raw["expected_condition"])
        if "expected_condition" in raw
        else pd.Series("", index=out.index)
    )
    is_catch = (out["trial_kind"] == "catch").to_numpy()
    bad = np.flatnonzero(is_catch & (expected == "").to_numpy())
    if bad.size:
        _fail(
            bad,
            "expected_condition",
            "is empty on a catch trial",
            "catch trials must name the correct condition",
            expected.to_numpy(),
            csv,
        )
    bad = np.flatnonzero(
        is_catch
        & ~jnd
        & (expected != out["condition_left"]).to_numpy()
        & (expected != out["condition_right"]).to_numpy()
    )
    if bad.size:
        _fail(
            bad,
            "expected_condition",
            "is neither condition_left nor condition_right",
            "name one of the two conditions shown",
            expected.to_numpy(),
            csv,
        )
    out["expected_condition"] = expected.where(expected != "", None).astype(object)
    out["rt_ms"] = (
        _parse_number(raw["rt_ms"], "rt_ms", csv, integer=False, minimum=0, required=False)
        if "rt_ms" in raw
        else np.nan
    )
    for column in ["presented_at", "answered_at"]:
        if column in raw:
            text = _text(raw[column])
            parsed = pd.to_datetime(
                text.where(text != "", None), utc=True, errors="coerce", format="ISO8601"
            )
            bad = np.flatnonzero((parsed.isna() & (text != "")).to_numpy())
            if bad.size:
                _fail(
                    bad,
                    column,
                    "is not an ISO 8601 time",
                    "write e.g. 2026-01-31T12:00:00Z",
                    text.to_numpy(),
                    csv,
                )
            out[column] = text.astype(object)
        else:
            out[column] = ""
    out["reference_shown"] = (
        _parse_bool(raw["reference_shown"], "reference_shown", csv)
        if "reference_shown" in raw
        else False
    )
    for column in [
        "viewport_w",
        "viewport_h",
        "device_pixel_ratio",
    ]:
        out[column] = (
            _parse_number(raw[column], column, csv, integer=False, minimum=0, required=False)
            if column in raw
            else np.nan
        )
    if "participant_status" in raw:
        status = _text(raw["participant_status"]).str.lower()
        status = status.where(status != "", "completed")
        _check_choice_set(status, "participant_status", STATUSES, csv)
        out["participant_status"] = status.astype(object)
    else:
        out["participant_status"] = "completed"
    out["participant_excluded"] = (
        _parse_bool(raw["participant_excluded"], "participant_excluded", csv)
        if "participant_excluded" in raw
        else False
    )
    out["exclusion_reasons"] = (
        _text(raw["exclusion_reasons"]).astype(object) if "exclusion_reasons" in raw else ""
    )
    _optional_columns(raw, out, TIMING_COLUMNS[:-1] + SEQUENCE_COLUMNS, "exposure_ok", csv)
    out["display_status"] = (
        _text(raw["display_status"]).astype(object) if "display_status" in raw else ""
    )
    _optional_columns(raw, out, DISPLAY_COLUMNS[1:-1], "display_unscaled", csv)
    return out[RESPONSE_COLUMNS], filled


def _optional_columns(
    raw: pd.DataFrame, out: pd.DataFrame, numbers: list[str], flag: str, csv: bool
) -> None:
    """Optional columns into ``out``: ``numbers`` (>= 0; NaN where absent or empty) and
    the true/false ``flag`` (missing where absent or empty)."""
    for column in numbers:
        out[column] = (
            _parse_number(raw[column], column, csv, integer=False, minimum=0, required=False)
            if column in raw
            else np.nan
        )
    out[flag] = (
        _parse_optional_bool(raw[flag], flag, csv)
        if flag in raw
        else pd.Series(pd.NA, index=out.index, dtype="boolean")
    )


def _parse_optional_bool(series: pd.Series, column: str, csv: bool) -> pd.Series:
    """Like ``_parse_bool`` but empty/missing stays missing (pandas ``boolean``)."""
    missing = series.isna() | (_text(series) == "")
    parsed = pd.Series(pd.NA, index=series.index, dtype="boolean")
    if (~missing).any():
        parsed[~missing] = _parse_bool(series[~missing], column, csv).to_numpy()
    return parsed


def from_pwcmp(raw: pd.DataFrame, *, study: str = "pwcmp", csv: bool = True) -> pd.DataFrame:
    """Convert pwcmp's long format (observer, scene, condition_A, condition_B,
    is_A_selected) to contract-2 columns. Sides were not recorded: condition_A is put on
    the left, so position-bias results are meaningless and are skipped for such data."""
    missing = [c for c in PWCMP_COLUMNS if c not in raw.columns]
    if missing:
        raise ResponsesFormatError(f"pwcmp file lacks column(s) {', '.join(missing)}")
    raw = raw.reset_index(drop=True)
    selected = pd.to_numeric(raw["is_A_selected"], errors="coerce")
    bad = np.flatnonzero(~selected.isin([0, 1]).to_numpy())
    if bad.size:
        _fail(
            bad,
            "is_A_selected",
            "is not 0 or 1",
            "1 when condition_A was chosen, else 0",
            raw["is_A_selected"].to_numpy(),
            csv,
        )
    frame = pd.DataFrame(
        {
            "study": study,
            "participant": _text(raw["observer"]),
            "trial_kind": "main",
            "image_id": _text(raw["scene"]),
            "condition_left": _text(raw["condition_A"]),
            "condition_right": _text(raw["condition_B"]),
            "choice": np.where(selected.to_numpy() == 1, "left", "right"),
        }
    )
    frame["chosen_condition"] = np.where(
        frame["choice"] == "left", frame["condition_left"], frame["condition_right"]
    )
    frame["trial_index"] = frame.groupby("participant").cumcount()
    normalised, _ = validate_responses(frame, csv=csv)
    normalised["study"] = study
    return normalised


def _read_table(path: Path) -> tuple[pd.DataFrame, bool]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path), False
        if suffix in (".csv", ".txt", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False), True
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ResponsesFormatError(f"cannot read {path}: {exc}") from exc
    raise ResponsesFormatError(
        f"{path}: unknown file type {suffix!r}; give a .csv or .parquet responses file"
    )


def load_responses(source: str | Path, study: str | None = None) -> LoadedResponses:
    """Load and validate responses from a CSV/Parquet file (contract 2 or pwcmp) or from a
    database URL (``study`` required; read via ``study_app.export.read_responses``)."""
    text = str(source)
    if "://" in text:
        if not study:
            raise ResponsesFormatError(
                "a database URL needs --study SLUG (the study whose responses to analyse)"
            )
        try:
            from study_app.export import read_responses
        except ImportError as exc:
            raise ResponsesFormatError(
                f"reading from a database needs study_app.export.read_responses ({exc})"
            ) from exc
        raw = read_responses(text, study)
        frame, filled = validate_responses(raw, csv=False)
        safe = text.split("@")[-1] if "@" in text else text  # never record passwords
        return LoadedResponses(
            frame, f"{safe} study={study}", "database", sha256_frame(frame), True, filled,
            _database_provenance(text, study),
        )
    path = Path(text)
    if not path.is_file():
        raise ResponsesFormatError(f"{path}: no such file; give a responses CSV/Parquet file")
    raw, csv = _read_table(path)
    if set(PWCMP_COLUMNS) <= set(raw.columns) and "condition_left" not in raw.columns:
        frame = from_pwcmp(raw, study=study or path.stem, csv=csv)
        return LoadedResponses(frame, str(path), "pwcmp", sha256_file(path), False, [])
    frame, filled = validate_responses(raw, csv=csv)
    if study:
        keep = frame["study"] == study
        if not keep.any():
            found = ", ".join(sorted(frame["study"].unique())[:10])
            raise ResponsesFormatError(f"{path}: no rows for study {study!r} (studies: {found})")
        frame = frame[keep].reset_index(drop=True)
    return LoadedResponses(frame, str(path), "contract2", sha256_file(path), True, filled,
                           read_export_provenance(path))


def _database_provenance(database_url: str, study: str) -> dict:
    from sqlalchemy import create_engine

    from study_app.export import provenance

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return provenance(connection, study)
    finally:
        engine.dispose()
