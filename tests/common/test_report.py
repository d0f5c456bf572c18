"""Report tables: numbers as a reader wants them (issue 20)."""

import math

import numpy as np
import pandas as pd
import pytest

from common.report import Report, format_number, markdown_table


@pytest.mark.parametrize(("value", "shown"), [
    (2174.0, "2174"),            # a token count stored as float: no decimals
    (16.0, "16"),                # TopK's L0
    (32768.0, "32768"),          # integer-valued and large: still all digits, not 3.277e+04
    (np.float64(-3.0), "-3"),
    (-0.0, "0"),
    (np.int64(7), "7"),
    (12, "12"),
    (0.123456, "0.1235"),        # 4 significant figures
    (-0.98, "-0.98"),
    (15.99, "15.99"),
    (7.69543, "7.695"),
    (np.float32(0.5), "0.5"),
    (12345.67, "12346"),         # large: every integer digit, no exponent
    (3.2e-7, "3.2e-07"),         # a p-value, never 0.0000
    (1.23456e-5, "1.235e-05"),
    (0.00123456, "0.001235"),
    (1e20, "1e+20"),
    (math.inf, "inf"),
    (-math.inf, "-inf"),
    (math.nan, "n/a"),           # missing: not measured or not computable
    (np.float64("nan"), "n/a"),
    (None, "n/a"),
    (pd.NA, "n/a"),
    (True, "True"),
    (np.True_, "True"),
    ("layer_0_vs_1", "layer_0_vs_1"),
])
def test_format_number(value, shown):
    assert format_number(value) == shown


def test_markdown_table_formats_each_cell_and_aligns_numbers_right():
    frame = pd.DataFrame({"block": ["layer_0", "layer_1"], "tokens": [2174.0, 32768.0], "l0": [16.0, 15.99],
                          "p": [3.2e-7, np.nan], "causal": [True, False]})
    lines = markdown_table(frame).splitlines()
    assert [cell.strip() for cell in lines[2].strip("|").split("|")] == ["layer_0", "2174", "16", "3.2e-07", "True"]
    assert [cell.strip() for cell in lines[3].strip("|").split("|")] == ["layer_1", "32768", "15.99", "n/a", "False"]
    # colons mark the alignment: text and booleans left, numbers right
    assert [cell.startswith(":") for cell in lines[1].strip("|").split("|")] == [True, False, False, False, True]
    assert [cell.endswith(":") for cell in lines[1].strip("|").split("|")] == [False, True, True, True, False]


def test_numbers_stored_as_objects_are_formatted_and_right_aligned():
    frame = pd.DataFrame({"n": pd.Series([3.0, 0.25], dtype=object)})
    lines = markdown_table(frame).splitlines()
    assert lines[1].strip("|").endswith(":")
    assert [line.strip("| ") for line in lines[2:]] == ["3", "0.25"]


def test_report_table_writes_the_formatted_table_and_the_full_csv(tmp_path):
    report = Report(tmp_path, "t")
    frame = pd.DataFrame({"tokens": [2174.0] * 50, "p": [3.2e-7] * 50})
    report.table(frame, "numbers")
    text = report.write().read_text()
    assert "0.0000" not in text and "2174.0" not in text
    assert text.count("|     2174 | 3.2e-07 |") == 40  # the first 40 rows shown
    assert "(full table, 50 rows: [numbers.csv](numbers.csv))" in text
    assert pd.read_csv(tmp_path / "numbers.csv")["p"].tolist() == [3.2e-7] * 50  # the CSV keeps full precision
