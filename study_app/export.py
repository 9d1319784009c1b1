"""Responses export (contract 2): one row per answered trial, CSV and Parquet, streamed.

Rows come from a server-side cursor in batches (``BATCH_ROWS``), so memory stays flat
for millions of votes; only per-participant exclusion statistics (a few numbers per
participant, aggregated in SQL) are held in memory. Preview participants and practice
trials are never exported.

``read_responses(database_url, study)`` gives the same rows as a pandas DataFrame.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, and_, case, create_engine, func, select
from sqlalchemy.orm import aliased

from study_app.extensions import configure_engine
from study_app.models import Image, Participant, StimulusSet, Study, Trial, Vote
from study_app.scheduling import CHOICES, JND_ANSWERS, SEQUENCE_FIELDS
from study_app.scheduling import TIMING_FIELDS as TIMING_COLUMNS
from study_app.studies import ExclusionRules, parse_config

if TYPE_CHECKING:
    import pandas as pd

BATCH_ROWS = 10_000
COLUMNS = (
    "study", "participant", "trial_index", "trial_kind", "image_id", "condition_left",
    "condition_right", "choice", "chosen_condition", "expected_condition", "rt_ms",
    "presented_at", "answered_at", "reference_shown", "viewport_w", "viewport_h",
    "device_pixel_ratio", "participant_status", "participant_excluded", "exclusion_reasons",
    "prolific_pid",  # for approving/rejecting submissions on Prolific; empty otherwise
    "info_gain",  # active design: the pair's expected information gain (bits) when chosen
    # frame-timed limited exposure (empty/null for votes without one)
    *TIMING_COLUMNS, "exposure_measured_ms", "exposure_ok",
    # the task ("2afc" | "jnd") and a JND answer ("same" | "different"; empty for 2afc);
    # a jnd row has no choice (no side) and its chosen_condition is the answer
    "task", "jnd_answer",
    # sequential presentation: the exposure columns above time the first image, these the
    # interval and the second image (empty/null for side-by-side trials)
    *SEQUENCE_FIELDS, "isi_measured_ms", "second_measured_ms",
    # the participant's display check (study_app.calibration), repeated on each of their
    # rows; empty/null for participants without one
    "display_status", "display_px_per_mm", "display_px_per_deg", "display_viewing_distance_mm",
    "display_dpr", "display_unscaled",
)
INT_TIMING_COLUMNS = ("exposure_frames_requested", "exposure_frames_measured",
                      "second_frames_requested", "second_frames_measured")
FLOAT_TIMING_COLUMNS = tuple(
    c for c in (*TIMING_COLUMNS, "exposure_measured_ms", *SEQUENCE_FIELDS, "isi_measured_ms",
                "second_measured_ms") if c not in INT_TIMING_COLUMNS)
# export column -> participant column
DISPLAY_COLUMNS = {
    "display_status": "display_status", "display_px_per_mm": "px_per_mm",
    "display_px_per_deg": "px_per_deg", "display_viewing_distance_mm": "viewing_distance_mm",
    "display_dpr": "display_dpr", "display_unscaled": "display_scaling_ok",
}
N_VOTE_TIMING = len(TIMING_COLUMNS) + len(SEQUENCE_FIELDS)  # vote timing columns selected
FLOAT_DISPLAY_COLUMNS = ("display_px_per_mm", "display_px_per_deg",
                         "display_viewing_distance_mm", "display_dpr")
# Timestamps are coarsened by browsers (to 0.1 ms or 5 µs) and rounded to 1 µs by the
# page; a miss of exactly one frame must not be flagged for that.
EXPOSURE_TOLERANCE_MS = 0.5
EXCLUSION_RULE_NAMES = ("catch_accuracy", "fast_responses", "side_bias", "repeat_consistency",
                        "returned")


class ExportError(ValueError):
    """The study to export does not exist (message says how to list studies)."""


@dataclass(frozen=True)
class ParticipantStats:
    """Per-participant counts behind the exclusion rules (non-preview votes only)."""

    n: int = 0
    n_main: int = 0
    n_main_left: int = 0
    n_fast: int = 0
    n_catch: int = 0
    n_catch_correct: int = 0
    n_repeat: int = 0
    n_repeat_consistent: int = 0
    status: str = "started"


def exclusion_reasons(stats: ParticipantStats, rules: ExclusionRules) -> list[str]:
    """The names of the rules a participant breaks (pure; order of EXCLUSION_RULE_NAMES).
    ``analysis.qc.apply_exclusions`` with ``qc_options_from_study`` applies the same
    definitions to an export (a test holds the two together)."""
    reasons = []
    if rules.min_catch_accuracy is not None and stats.n_catch > 0:
        if stats.n_catch_correct / stats.n_catch < rules.min_catch_accuracy:
            reasons.append("catch_accuracy")
    if rules.min_rt_ms is not None and rules.max_fast_fraction is not None and stats.n > 0:
        if stats.n_fast / stats.n > rules.max_fast_fraction:
            reasons.append("fast_responses")
    if rules.max_side_bias is not None and stats.n_main >= rules.min_trials_for_bias:
        left = stats.n_main_left
        if max(left, stats.n_main - left) / stats.n_main > rules.max_side_bias:
            reasons.append("side_bias")
    if rules.min_repeat_consistency is not None and stats.n_repeat > 0:
        if stats.n_repeat_consistent / stats.n_repeat < rules.min_repeat_consistency:
            reasons.append("repeat_consistency")
    if stats.status == "returned" and not rules.count_returned:
        reasons.append("returned")
    return reasons


def resolve_study(connection: Connection, key: str | int) -> Row:
    """A study row by slug or numeric id (ExportError if there is none)."""
    key = str(key)
    condition = Study.slug == key
    if key.isdigit():
        condition = condition | (Study.id == int(key))
    row = connection.execute(select(Study.__table__).where(condition)).first()
    if row is None:
        slugs = connection.execute(select(Study.slug).order_by(Study.id)).scalars().all()
        raise ExportError(f"no study {key!r} in this database; studies: {slugs or 'none'}")
    return row


def participant_stats(connection: Connection, study_id: int,
                      rules: ExclusionRules) -> dict[int, ParticipantStats]:
    """Exclusion statistics per participant id, aggregated in SQL."""
    fast = Vote.rt_ms < (rules.min_rt_ms if rules.min_rt_ms is not None else -1.0)
    rows = connection.execute(
        select(
            Vote.participant_id, func.count(Vote.id),
            # side bias: 2afc answers only (a jnd answer has no side)
            func.sum(case((and_(Trial.kind == "main", Vote.choice.in_(CHOICES)), 1), else_=0)),
            func.sum(case((and_(Trial.kind == "main", Vote.choice == "left"), 1), else_=0)),
            func.sum(case((fast, 1), else_=0)),
            func.sum(case((Trial.kind == "catch", 1), else_=0)),
            func.sum(case((and_(Trial.kind == "catch",
                                Vote.chosen_condition == Trial.expected_condition), 1), else_=0)),
        ).join(Trial, Vote.trial_id == Trial.id)
        .where(Vote.study_id == study_id, Trial.preview.is_(False))
        .group_by(Vote.participant_id)
    ).all()
    first_trial, first_vote = aliased(Trial), aliased(Vote)
    repeats = dict((r[0], (r[1], r[2])) for r in connection.execute(
        select(
            Vote.participant_id, func.count(Vote.id),
            func.sum(case((Vote.chosen_condition == first_vote.chosen_condition, 1), else_=0)),
        ).join(Trial, Vote.trial_id == Trial.id)
        .join(first_trial, Trial.repeat_of_id == first_trial.id)
        .join(first_vote, first_vote.trial_id == first_trial.id)
        .where(Vote.study_id == study_id, Trial.kind == "repeat", Trial.preview.is_(False))
        .group_by(Vote.participant_id)
    ).all())
    statuses = dict(connection.execute(
        select(Participant.id, Participant.status).where(Participant.study_id == study_id)
    ).all())
    return {
        r[0]: ParticipantStats(
            n=int(r[1]), n_main=int(r[2] or 0), n_main_left=int(r[3] or 0),
            n_fast=int(r[4] or 0), n_catch=int(r[5] or 0), n_catch_correct=int(r[6] or 0),
            n_repeat=int(repeats.get(r[0], (0, 0))[0]),
            n_repeat_consistent=int(repeats.get(r[0], (0, 0))[1] or 0),
            status=statuses[r[0]],
        )
        for r in rows
    }


def exposure_ok(requested_ms: float | None, frame_period_ms: float | None,
                measured_ms: float | None) -> bool | None:
    """Whether a measured exposure is within one frame of the request:
    ``|measured - requested| <= frame period (+ EXPOSURE_TOLERANCE_MS)``, all in
    milliseconds; ``None`` when the trial has no frame timing."""
    if requested_ms is None or frame_period_ms is None or measured_ms is None:
        return None
    return abs(measured_ms - requested_ms) <= frame_period_ms + EXPOSURE_TOLERANCE_MS


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


def _timing_fields(values: tuple) -> dict[str, Any]:
    """The export's timing columns from the twelve stored ``vote`` timing columns (the
    first image / the only exposure, then a sequential trial's interval and second image).
    ``exposure_ok`` of a sequential trial: the first image, the interval and the second
    image each within one frame of the request."""
    row = dict(zip((*TIMING_COLUMNS, *SEQUENCE_FIELDS), values, strict=True))
    period = row["frame_period_ms"]
    row["exposure_measured_ms"] = _between(row["exposure_onset_ms"], row["exposure_offset_ms"])
    row["isi_measured_ms"] = _between(row["exposure_offset_ms"], row["second_onset_ms"])
    row["second_measured_ms"] = _between(row["second_onset_ms"], row["second_offset_ms"])
    checks = [exposure_ok(row["exposure_requested_ms"], period, row["exposure_measured_ms"])]
    if row["second_requested_ms"] is not None:
        checks += [exposure_ok(row["isi_requested_ms"], period, row["isi_measured_ms"]),
                   exposure_ok(row["second_requested_ms"], period, row["second_measured_ms"])]
    row["exposure_ok"] = None if checks[0] is None else all(checks)
    return row


def _display_fields(values: tuple) -> dict[str, Any]:
    """The export's display columns from the participant's stored display check."""
    row = dict(zip(DISPLAY_COLUMNS, values, strict=True))
    for column in FLOAT_DISPLAY_COLUMNS:
        row[column] = None if row[column] is None else float(row[column])
    if row["display_unscaled"] is not None:
        row["display_unscaled"] = bool(row["display_unscaled"])
    return row


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iter_responses(connection: Connection, study_key: str | int,
                   batch_rows: int = BATCH_ROWS) -> Iterator[list[dict[str, Any]]]:
    """Batches of contract-2 rows (dicts with COLUMNS), ordered by participant and answer."""
    study = resolve_study(connection, study_key)
    rules = parse_config(study.config).exclusion
    excluded = {
        pid: ";".join(exclusion_reasons(stats, rules))
        for pid, stats in participant_stats(connection, study.id, rules).items()
    }
    query = (
        select(
            Participant.id, Participant.public_id, Participant.status, Vote.trial_index,
            Trial.kind, Image.key, Trial.condition_left, Trial.condition_right, Vote.choice,
            Vote.chosen_condition, Trial.expected_condition, Vote.rt_ms, Vote.presented_at,
            Vote.answered_at, Vote.reference_shown, Vote.viewport_w, Vote.viewport_h,
            Vote.device_pixel_ratio, Participant.prolific_pid, Trial.info_gain,
            *(getattr(Vote, name) for name in (*TIMING_COLUMNS, *SEQUENCE_FIELDS)),
            *(getattr(Participant, name) for name in DISPLAY_COLUMNS.values()),
        )
        .join(Trial, Vote.trial_id == Trial.id)
        .join(Participant, Vote.participant_id == Participant.id)
        .join(Image, Trial.image_id == Image.id)
        .where(Vote.study_id == study.id, Trial.preview.is_(False))
        .order_by(Participant.id, Vote.trial_index)
    )
    result = connection.execution_options(stream_results=True, yield_per=batch_rows).execute(
        query
    )
    for partition in result.partitions(batch_rows):
        batch = []
        for r in partition:
            reasons = excluded.get(r[0], "")
            jnd = r[8] in JND_ANSWERS
            batch.append({
                "study": study.slug, "participant": r[1], "trial_index": r[3],
                "trial_kind": r[4], "image_id": r[5], "condition_left": r[6],
                "condition_right": r[7], "choice": None if jnd else r[8],
                "chosen_condition": r[9],  # jnd: the answer (catch/repeat checks)
                "expected_condition": r[10], "rt_ms": float(r[11]),
                "presented_at": _iso(r[12]), "answered_at": _iso(r[13]),
                "reference_shown": bool(r[14]), "viewport_w": int(r[15]),
                "viewport_h": int(r[16]), "device_pixel_ratio": float(r[17]),
                "participant_status": r[2], "participant_excluded": bool(reasons),
                "exclusion_reasons": reasons, "prolific_pid": r[18],
                "info_gain": None if r[19] is None else float(r[19]),
                "task": "jnd" if jnd else "2afc", "jnd_answer": r[8] if jnd else None,
                **_timing_fields(tuple(r[20:20 + N_VOTE_TIMING])),
                **_display_fields(tuple(r[20 + N_VOTE_TIMING:])),
            })
        yield batch


def provenance(connection: Connection, study_key: str | int) -> dict[str, Any]:
    """What produced an export: the study config + hash, the stimulus manifest hash."""
    study = resolve_study(connection, study_key)
    manifest_sha = connection.execute(
        select(StimulusSet.manifest_sha256).where(StimulusSet.id == study.stimulus_set_id)
    ).scalar_one()
    return {
        "format": "pstudy-responses", "format_version": 1, "study": study.slug,
        "exclusion_rules": asdict(parse_config(study.config).exclusion),
        "study_config": study.config, "study_config_sha256": study.config_sha256,
        "stimulus_manifest_sha256": manifest_sha,
        "exported_at": _iso(datetime.now(UTC)), "columns": list(COLUMNS),
    }


def write_csv(connection: Connection, study_key: str | int, out: IO[str],
              batch_rows: int = BATCH_ROWS) -> int:
    """Write the CSV (header + rows) to a text stream; returns the number of rows."""
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    n = 0
    for batch in iter_responses(connection, study_key, batch_rows):
        writer.writerows(_csv_row(row) for row in batch)
        n += len(batch)
    return n


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the CSV writes it: booleans as true/false, missing values empty."""
    row = {key: ("" if value is None else value) for key, value in row.items()}
    for column in ("reference_shown", "participant_excluded", "exposure_ok", "display_unscaled"):
        if row[column] != "":
            row[column] = "true" if row[column] else "false"
    return row


def iter_csv_chunks(connection: Connection, study_key: str | int,
                    batch_rows: int = BATCH_ROWS) -> Iterator[str]:
    """The CSV as text chunks (one per batch): for streamed HTTP downloads."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for batch in iter_responses(connection, study_key, batch_rows):
        writer.writerows(_csv_row(row) for row in batch)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()


def arrow_schema():
    """The Parquet schema of contract 2."""
    import pyarrow as pa

    types = {
        "trial_index": pa.int64(), "rt_ms": pa.float64(), "reference_shown": pa.bool_(),
        "viewport_w": pa.int64(), "viewport_h": pa.int64(),
        "device_pixel_ratio": pa.float64(), "participant_excluded": pa.bool_(),
        "info_gain": pa.float64(),
        "exposure_ok": pa.bool_(),  # null without frame timing
        **{c: pa.int64() for c in INT_TIMING_COLUMNS},
        **{c: pa.float64() for c in FLOAT_TIMING_COLUMNS},
        **{c: pa.float64() for c in FLOAT_DISPLAY_COLUMNS},
        "display_unscaled": pa.bool_(),  # null without a display check
    }
    return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])


def write_parquet(connection: Connection, study_key: str | int, path: str | Path,
                  batch_rows: int = BATCH_ROWS) -> int:
    """Write a Parquet file batch by batch (provenance in the schema metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = provenance(connection, study_key)
    schema = arrow_schema().with_metadata({"pstudy": json.dumps(meta, sort_keys=True)})
    n = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        for batch in iter_responses(connection, study_key, batch_rows):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            n += len(batch)
        if n == 0:
            writer.write_table(schema.empty_table())
    return n


def read_responses(database_url: str, study: str | int) -> pd.DataFrame:
    """The study's responses (contract 2 columns) from a database URL, as a DataFrame."""
    import pandas as pd

    engine = create_engine(database_url)
    configure_engine(engine)
    try:
        with engine.connect() as connection:
            frames = [pd.DataFrame(batch, columns=list(COLUMNS))
                      for batch in iter_responses(connection, study)]
    finally:
        engine.dispose()
    schema = arrow_schema()
    if not frames:
        return schema.empty_table().to_pandas()
    frame = pd.concat(frames, ignore_index=True)
    return frame.astype({
        "trial_index": "int64", "rt_ms": "float64", "reference_shown": "bool",
        "viewport_w": "int64", "viewport_h": "int64", "device_pixel_ratio": "float64",
        "participant_excluded": "bool", "prolific_pid": "str",  # None -> missing, as Parquet
        "jnd_answer": "str",
        "info_gain": "float64",  # None -> NaN, as Parquet
        # timing: nullable, as pyarrow gives them (whole frames as float64 with NaN)
        **{c: "float64" for c in (*INT_TIMING_COLUMNS, *FLOAT_TIMING_COLUMNS)},
        "exposure_ok": "object",
        "display_status": "str",  # None -> missing, as Parquet
        **{c: "float64" for c in FLOAT_DISPLAY_COLUMNS},
        "display_unscaled": "object",
    })
