"""Print formatting of the report (analysis.formatting): APA p-values, 3 significant
digits, numerical noise as 0, human-readable headers with units. Property-based where the
rule is general; independent references are Python's own ``%g`` rounding and Decimal."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis.formatting import (
    MISSING,
    column_decimals,
    column_label,
    display_table,
    format_column,
    format_interval,
    format_number,
    format_p,
    round_sig,
)


def _value(text: str) -> float:
    return float(text.replace(",", "").replace("−", "-"))


@pytest.mark.parametrize(
    ("p", "text"),
    [
        (0.0, "< .001"),
        (0.000999, "< .001"),
        (0.001, ".001"),
        (0.0234, ".023"),
        (0.05, ".050"),
        (0.5, ".500"),
        (0.9994, ".999"),
        (0.9995, "> .999"),
        (1.0, "> .999"),
        (float("nan"), MISSING),
        (None, MISSING),
    ],
)
def test_p_values_are_apa_style(p, text):
    assert format_p(p) == text


def test_a_p_value_outside_zero_one_is_an_error():
    with pytest.raises(ValueError, match="must lie in"):
        format_p(1.2)


@given(st.floats(0.001, 0.9994, allow_nan=False))
def test_p_values_keep_three_decimals_and_drop_the_leading_zero(p):
    text = format_p(p)
    assert text.startswith(".") and len(text) == 4
    assert abs(float("0" + text) - p) <= 0.0005 + 1e-12


@given(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12).filter(
        lambda x: x == 0 or abs(x) > 1e-12
    )
)
def test_numbers_show_three_significant_digits_without_exponents(x):
    text = format_number(x)
    assert "e" not in text.lower()
    assert _value(text) == pytest.approx(float(f"{x:.2e}"), rel=1e-9, abs=0)
    digits = text.replace(",", "").replace("−", "").replace(".", "").lstrip("0")
    if abs(x) < 100:  # below 100 the 3 significant digits are all printed (1.50, 0.0300)
        assert len(digits) == 3 or _value(text) == 0


def test_numbers_in_print_style():
    assert format_number(0.68006) == "0.680"
    assert format_number(-1.0707) == "−1.07"
    assert format_number(812.5) == "812"
    assert format_number(12345.6) == "12,300"
    assert format_number(9.996) == "10.0"
    assert format_number(-0.0) == "0"
    assert format_number(np.int64(1234567)) == "1,234,567"
    assert format_number(np.bool_(True)) == "yes" and format_number(False) == "no"
    assert format_number(float("nan")) == MISSING and format_number(None) == MISSING
    assert format_number("l1") == "l1"


def test_numerical_noise_prints_as_zero_beside_its_column():
    column = format_column([0.68, -5.004e-17, -1.0707, 0.003])
    assert column == ["0.680", "0", "−1.07", "0.00300"]
    assert format_column([0.0, 0.0]) == ["0", "0"]
    assert format_column([0.01, None, float("nan")]) == ["0.0100", MISSING, MISSING]
    assert format_column([0.2, 0.0004], p_values=True) == [".200", "< .001"]


@given(
    st.lists(
        st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
        min_size=1,
        max_size=8,
    )
)
def test_a_formatted_column_is_within_half_a_unit_of_its_printed_precision(values):
    cap = column_decimals(values)
    for value, text in zip(values, format_column(values), strict=True):
        if value == 0:
            assert text == "0"
            continue
        sig_unit = 10.0 ** (math.floor(math.log10(abs(value))) - 2)  # 3 significant digits
        unit = max(sig_unit, 10.0**-cap)  # or the column's decimal cap, when coarser
        assert abs(_value(text) - value) <= unit / 2 * (1 + 1e-9) + 1e-12


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9))
def test_round_sig_matches_decimal_rounding(x):
    exact = Decimal(x)  # the binary value, exactly
    if exact == 0:
        assert round_sig(x) == 0
        return
    quantum = Decimal(1).scaleb(exact.adjusted() - 2)
    rounded = exact.quantize(quantum, rounding=ROUND_HALF_EVEN)
    assert round_sig(x) == pytest.approx(float(rounded), rel=1e-12)


def test_intervals_and_headers():
    assert format_interval(0.30064, 0.95441) == "[0.301, 0.954]"
    assert format_interval(0.1, float("nan")) == MISSING
    assert column_label("median_rt_ms") == "Median RT (ms)"
    assert column_label("p_holm") == "p (Holm)"
    assert column_label("estimate", "JOD") == "Scale (JOD)"
    assert column_label("se") == "SE"
    assert column_label("statistic") == "Statistic"  # agreement's name column, not a t
    assert column_label("some_new_column") == "Some new column"


def test_display_table_merges_intervals_and_moves_the_unit_into_headers():
    scale = pd.DataFrame(
        {
            "condition": ["a", "b"],
            "estimate": [0.6800624764073336, -5.004e-17],
            "unit": ["JOD", "JOD"],
            "ci_low": [0.21, -0.4],
            "ci_high": [1.2, 0.4],
            "p_value": [0.0004, 0.7],
            "n": np.array([1200, 30]),
        }
    )
    shown = display_table(scale, level=0.95)
    assert list(shown.columns) == ["Condition", "Scale (JOD)", "95 % CI (JOD)", "p", "Votes (n)"]
    assert shown["Scale (JOD)"].tolist() == ["0.680", "0"]
    assert shown["95 % CI (JOD)"].tolist() == ["[0.210, 1.20]", "[−0.400, 0.400]"]
    assert shown["p"].tolist() == ["< .001", ".700"]
    assert shown["Votes (n)"].tolist() == ["1,200", "30"]
    planning = display_table(pd.DataFrame({"alpha": [0.05], "power": [0.8], "n": [210]}))
    assert planning.iloc[0].tolist() == ["0.05", "0.8", "210"]
    only = display_table(scale, columns=("estimate", "condition", "missing"))
    assert list(only.columns) == ["Scale (JOD)", "Condition"]


def test_display_table_prints_listed_keys_as_words_and_leaves_the_rest():
    table = pd.DataFrame(
        {
            "statistic": ["fleiss_kappa", "kendall_u", "other_key", None],
            "value": [0.0453680, 0.2215843, 1.0, np.nan],
        }
    )
    labels = {"statistic": {"fleiss_kappa": "Fleiss' κ", "kendall_u": "Kendall's u"}}
    shown = display_table(table, value_labels=labels)
    assert shown["Statistic"].tolist() == ["Fleiss' κ", "Kendall's u", "other_key", "–"]
    assert shown["Value"].tolist() == ["0.0454", "0.222", "1.00", "–"]
    assert table["statistic"].tolist()[:2] == ["fleiss_kappa", "kendall_u"]  # not changed
    assert display_table(table)["Statistic"].tolist()[0] == "fleiss_kappa"
