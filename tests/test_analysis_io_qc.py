"""Input validation (contract 2, pwcmp) and quality control / exclusions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.io import RESPONSE_COLUMNS, ResponsesFormatError, load_responses
from analysis.qc import QCOptions, apply_exclusions, outlier_scores
from analysis.simulation import add_catch_trials, simulate_responses

# A real pairwise-comparison dataset (pwcmp, MIT; licence beside it), kept in the repository
# so a clone anywhere runs the tests.
PWCMP = Path(__file__).resolve().parent / "data" / "pwcmp" / "ex3_tmo_cmp_data.csv"


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def test_contract2_csv_and_parquet_load_identically(tmp_path):
    votes = simulate_responses({"a": 0, "b": 1}, 3, 2, 5, seed=1)
    csv = load_responses(_write(votes, tmp_path / "r.csv"))
    votes.to_parquet(tmp_path / "r.parquet")
    parquet = load_responses(tmp_path / "r.parquet")
    assert list(csv.frame.columns) == RESPONSE_COLUMNS
    assert csv.input_format == parquet.input_format == "contract2" and csv.sides_recorded
    for column in ["participant", "condition_left", "chosen_condition", "choice", "trial_index"]:
        assert csv.frame[column].tolist() == parquet.frame[column].tolist()
    assert np.allclose(csv.frame["rt_ms"], parquet.frame["rt_ms"])
    assert len(csv.input_sha256) == 64 and csv.input_sha256 != parquet.input_sha256


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("choice", "up", "column 'choice' is not one of left, right at row 3 (file line 4)"),
        (
            "trial_kind",
            "practice",
            "column 'trial_kind' is not one of main, catch, repeat at row 3",
        ),
        ("chosen_condition", "zzz", "column 'chosen_condition' disagrees with choice"),
        ("rt_ms", "fast", "column 'rt_ms' is not a number at row 3"),
        ("rt_ms", "-5", "column 'rt_ms' is below 0 at row 3"),
        ("trial_index", "1.5", "column 'trial_index' is not a whole number at row 3"),
        ("participant", "", "column 'participant' is empty at row 3"),
        ("presented_at", "yesterday", "column 'presented_at' is not an ISO 8601 time at row 3"),
        (
            "participant_excluded",
            "maybe",
            "column 'participant_excluded' is not a boolean at row 3",
        ),
    ],
)
def test_bad_values_are_named_by_row_and_column(tmp_path, column, value, message):
    votes = simulate_responses({"a": 0, "b": 1}, 2, 2, 4, seed=1).astype({column: object})
    votes.loc[2, column] = value
    with pytest.raises(ResponsesFormatError) as info:
        load_responses(_write(votes, tmp_path / "bad.csv"))
    assert message in str(info.value) and "Fix:" in str(info.value)


def test_missing_columns_catch_rules_and_unknown_files(tmp_path):
    votes = simulate_responses({"a": 0, "b": 1}, 2, 2, 4, seed=1)
    with pytest.raises(ResponsesFormatError, match="missing column\\(s\\) chosen_condition"):
        load_responses(_write(votes.drop(columns="chosen_condition"), tmp_path / "m.csv"))
    catch = add_catch_trials(votes, 1)
    catch.loc[catch["trial_kind"] == "catch", "expected_condition"] = ""
    with pytest.raises(ResponsesFormatError, match="expected_condition' is empty on a catch trial"):
        load_responses(_write(catch, tmp_path / "c.csv"))
    (tmp_path / "x.xlsx").write_text("nope")
    with pytest.raises(ResponsesFormatError, match="unknown file type"):
        load_responses(tmp_path / "x.xlsx")
    with pytest.raises(ResponsesFormatError, match="no such file"):
        load_responses(tmp_path / "absent.csv")
    with pytest.raises(ResponsesFormatError, match="--study"):
        load_responses("sqlite:///nowhere.db")
    minimal = votes[
        [
            "participant",
            "trial_kind",
            "image_id",
            "condition_left",
            "condition_right",
            "choice",
            "chosen_condition",
        ]
    ]
    loaded = load_responses(_write(minimal, tmp_path / "min.csv"))
    assert "rt_ms" in loaded.filled_columns and loaded.frame["rt_ms"].isna().all()


def test_pwcmp_long_format_is_read_with_sides_unknown(tmp_path):
    loaded = load_responses(PWCMP)
    frame = loaded.frame
    raw = pd.read_csv(PWCMP)
    assert loaded.input_format == "pwcmp" and not loaded.sides_recorded
    assert len(frame) == len(raw) == 1213
    assert frame["participant"].nunique() == 18 and frame["image_id"].nunique() == 5
    chosen_a = frame["chosen_condition"] == raw["condition_A"]
    assert (chosen_a == (raw["is_A_selected"] == 1)).all()
    bad = raw.copy().astype({"is_A_selected": object})
    bad.loc[4, "is_A_selected"] = 2
    with pytest.raises(ResponsesFormatError, match="is_A_selected' is not 0 or 1 at row 5"):
        load_responses(_write(bad, tmp_path / "bad.csv"))


def test_exclusion_rules_log_values_and_keep_everyone_sensitivity():
    votes = simulate_responses({"a": 0, "b": 1, "c": 2}, 6, 4, 40, seed=3)
    votes = add_catch_trials(votes, 5, {"p0": 0.0}, seed=1)  # p0 fails every catch trial
    is_p1 = votes["participant"] == "p1"
    main_p1 = is_p1 & (votes["trial_kind"] == "main")
    votes.loc[main_p1, "choice"] = "left"  # p1 always clicks left
    votes.loc[main_p1, "chosen_condition"] = votes.loc[main_p1, "condition_left"]
    votes.loc[votes["participant"] == "p2", "rt_ms"] = 120.0  # p2 is too fast
    votes.loc[votes["participant"] == "p3", "participant_excluded"] = True
    votes.loc[votes["participant"] == "p3", "exclusion_reasons"] = "attention"
    result = apply_exclusions(votes, QCOptions())
    log = result.log.set_index("participant")
    assert log.loc["p0", "rule"] == "catch_accuracy" and float(log.loc["p0", "value"]) == 0.0
    assert log.loc["p1", "rule"] == "side_bias" and float(log.loc["p1", "value"]) == 1.0
    assert log.loc["p2", "rule"] == "fast_responses"
    assert log.loc["p3", "rule"] == "study_exclusion" and log.loc["p3", "value"] == "attention"
    assert set(result.kept["participant"]) == {"p4", "p5"}
    assert (result.kept["trial_kind"] == "main").all()
    assert set(result.everyone["participant"]) == {f"p{i}" for i in range(6)}
    assert len(result.everyone) == 6 * 40
    relaxed = apply_exclusions(
        votes,
        QCOptions(
            min_catch_accuracy=None,
            max_side_rate=None,
            max_fast_fraction=None,
            honour_study_exclusions=False,
        ),
    )
    assert relaxed.log.empty and len(relaxed.kept) == 6 * 40
    # the report's sentence names every rule that fired in words, with its key and count
    from analysis.qc import RULE_LABELS, RULE_SETTINGS, exclusion_note

    assert set(RULE_LABELS) == set(RULE_SETTINGS)
    note = exclusion_note(result, {}, None)
    assert "4 of 6 participants excluded" in note
    for rule in ("catch_accuracy", "side_bias", "fast_responses", "study_exclusion"):
        assert f"{RULE_LABELS[rule]} ({rule}) 1" in note
    assert "repeat_consistency" not in note
    assert "excluded (by rule: none;" in exclusion_note(relaxed, {}, None)



def test_side_bias_is_judged_only_with_enough_main_trials():
    votes = simulate_responses({"a": 0, "b": 1}, 2, 3, 40, seed=4)
    votes["choice"] = "left"  # both always click left ...
    votes["chosen_condition"] = votes["condition_left"]
    few = votes[(votes["participant"] == "p0") | (votes["trial_index"] < 3)]  # ... p1 3 times
    result = apply_exclusions(few, QCOptions(max_side_rate=0.9, min_side_trials=10))
    assert list(result.log["participant"]) == ["p0"]
    assert result.participants.set_index("participant").loc["p1", "side_rate"] == 1.0
    strict = apply_exclusions(few, QCOptions(max_side_rate=0.9, min_side_trials=3))
    assert set(strict.log["participant"]) == {"p0", "p1"}

def test_repeat_consistency_compares_with_the_first_answer():
    votes = simulate_responses({"a": 0, "b": 1}, 2, 3, 6, seed=0)
    repeats = votes.groupby("participant").head(2).copy()
    repeats["trial_kind"] = "repeat"
    repeats["trial_index"] += 100
    flip = repeats["participant"] == "p1"  # p1 answers the repeats the other way
    other = np.where(
        repeats["chosen_condition"] == repeats["condition_left"],
        repeats["condition_right"],
        repeats["condition_left"],
    )
    repeats.loc[flip, "chosen_condition"] = other[flip.to_numpy()]
    repeats.loc[flip, "choice"] = np.where(
        repeats.loc[flip, "chosen_condition"] == repeats.loc[flip, "condition_left"],
        "left",
        "right",
    )
    result = apply_exclusions(
        pd.concat([votes, repeats], ignore_index=True),
        QCOptions(min_repeat_consistency=0.5, max_side_rate=None),
    )
    table = result.participants.set_index("participant")
    assert table.loc["p0", "repeat_consistency"] == 1.0
    assert table.loc["p1", "repeat_consistency"] == 0.0
    assert list(result.log["participant"]) == ["p1"]


def test_outlier_score_flags_an_observer_who_answers_backwards():
    votes = simulate_responses({"a": 0, "b": 1, "c": 2, "d": 3}, 12, 4, 40, seed=4)
    odd = votes["participant"] == "p05"
    other = np.where(
        votes["chosen_condition"] == votes["condition_left"],
        votes["condition_right"],
        votes["condition_left"],
    )
    votes.loc[odd, "chosen_condition"] = other[odd.to_numpy()]
    scores = outlier_scores(votes).set_index("participant")["outlier_score"]
    assert scores["p05"] >= 1.5
    assert scores.drop("p05").max() < 1.5
    assert scores.idxmax() == "p05"


def test_mistimed_exposures_exclude_a_participant_only_when_the_rule_is_on(tmp_path):
    """Participant p0 has 4 of 10 frame-timed trials mistimed (0.4), p1 none (0.0), p2 no
    frame timing at all (not judged); the rule at 0.3 excludes p0 alone."""
    votes = simulate_responses({"a": 0, "b": 1}, 3, 2, 10, seed=4)
    ok = {"p0": ["false"] * 4 + ["true"] * 6, "p1": ["true"] * 10, "p2": [""] * 10}
    names = sorted(votes["participant"].unique())
    votes["exposure_ok"] = np.concatenate([ok[f"p{i}"] for i in range(3)])
    votes["participant"] = votes["participant"].map({n: f"p{i}" for i, n in enumerate(names)})
    loaded = load_responses(_write(votes, tmp_path / "r.csv"))
    assert "exposure_ok" not in loaded.filled_columns
    assert loaded.frame["exposure_ok"].isna().sum() == 10
    off = apply_exclusions(loaded.frame)
    assert not off.participants["excluded"].any()
    on = apply_exclusions(loaded.frame, QCOptions(max_exposure_miss_fraction=0.3))
    table = on.participants.set_index("participant")
    assert table["exposure_miss_fraction"].tolist()[:2] == [0.4, 0.0]
    assert np.isnan(table.loc["p2", "exposure_miss_fraction"])
    assert table["n_timed"].tolist() == [10, 10, 0]
    assert table.loc["p0", "reasons"] == "exposure_timing" and table["excluded"].sum() == 1
    votes.loc[2, "exposure_ok"] = "sometimes"
    with pytest.raises(ResponsesFormatError, match="column 'exposure_ok' is not a boolean"):
        load_responses(_write(votes, tmp_path / "bad.csv"))
