"""The one table renderer: the terminal, HTML and JSON outputs read the same column specs."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
import xarray as xr

from moetrace.tracer.render.table import Column, Table, layer_table

COLUMNS = [
    Column("layer", "layer", "{:d}"),
    Column("err", "rel err", "{:.2e}", "relative error"),
    Column("bin", "margin", str, align="left", json=False),
    Column("raw", "raw", "{}", table=False),
    Column("flag", "", lambda f: "FLAGGED" if f else ""),
]
ROWS = [
    {"layer": 0, "err": 1.234e-3, "bin": "[0, 0.01)", "raw": 7, "flag": True},
    {"layer": 12, "err": float("nan"), "bin": "<b>&", "raw": math.inf, "flag": False},
    {"layer": 3, "bin": "x", "raw": None},  # "err" and "flag" missing
]


def _table() -> Table:
    return Table(list(COLUMNS), [dict(r) for r in ROWS], title="a title")


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.in_cell, self.headers = [], False, []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        self.in_cell = tag in ("td", "th")
        if self.in_cell:
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        self.in_cell = False

    def handle_data(self, data):
        if self.in_cell:
            self.rows[-1][-1] += data


def test_text_and_html_show_the_same_cells():
    t = _table()
    expected = [["0", "1.23e-03", "[0, 0.01)", "FLAGGED"], ["12", "-", "<b>&", ""], ["3", "-", "x", "-"]]
    assert t.cells() == expected
    parser = _Cells()
    parser.feed(t.to_html())
    assert parser.rows[0] == ["layer", "rel err", "margin", ""]  # the raw column is JSON only
    assert parser.rows[1:] == expected  # the same text, escaped and parsed back
    lines = t.to_text().splitlines()
    assert lines[0] == "a title"
    assert lines[1].split() == ["layer", "rel", "err", "margin"]
    for line, cells in zip(lines[2:], expected):
        assert line.split() == " ".join(cells).split()


def test_text_is_plain_and_aligned(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # even when a caller forces colour, piped tables stay plain
    text = _table().to_text()
    assert "\x1b[" not in text
    assert "[0, 0.01)" in text  # a bracketed cell is text, not rich markup
    lines = text.splitlines()[1:]
    # Numbers right-aligned: every row's "rel err" cell ends in the column where its header ends.
    header_end = lines[0].index("rel err") + len("rel err")
    assert all(line[header_end - 1] != " " and line[header_end] == " " for line in lines[1:]), lines
    assert all(line == line.rstrip() for line in lines)


def test_records_keep_raw_values_under_json_keys():
    recs = _table().records()
    assert [list(r) for r in recs] == [["layer", "err", "raw", "flag"]] * 3  # "bin" is display only
    assert recs[0] == {"layer": 0, "err": 1.234e-3, "raw": 7, "flag": True}
    assert recs[1]["err"] is None and recs[1]["raw"] is None  # NaN and inf: null, strict JSON
    assert recs[2] == {"layer": 3, "err": None, "raw": None, "flag": None}
    json.dumps(recs, allow_nan=False)


def test_layer_table_reads_layer_variables_and_drops_absent_columns():
    ds = xr.Dataset({"err": ("layer", np.array([0.5, 0.25])), "other": ("token", np.arange(3.0))},
                    coords={"layer": [4, 5]})
    t = layer_table(ds, COLUMNS, "t", extra={"raw": [1, 2]})
    assert [c.key for c in t.columns] == ["layer", "err", "raw"]  # no "bin", no "flag" in ds or extra
    assert t.records() == [{"layer": 4, "err": 0.5, "raw": 1}, {"layer": 5, "err": 0.25, "raw": 2}]
    assert isinstance(t.records()[0]["err"], float)  # numpy scalars become Python numbers


def test_legend_lists_described_columns():
    html = _table().to_html()
    assert '<ul class="legend"><li><b>rel err</b>: relative error</li></ul>' in html
    assert "legend" not in _table().to_html(legend=False)
