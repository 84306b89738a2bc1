"""One table, three outputs: the terminal (rich), the HTML report (pandas) and ``--json`` records.

A table is a list of :class:`Column` specs and a list of rows (dicts of raw values: numbers,
strings, None). Each column says once how its values read (``fmt``), under which header and, where
it helps, what it means; the terminal and the HTML page show the same formatted cells, and
:meth:`Table.records` gives the raw values under the column keys, which are the JSON keys scripts
parse. A new analysis table is a list of columns and a loop that fills rows::

    t = Table([Column("layer", "layer", "{:d}"), Column("local", "local", "{:.3e}", "teacher-forced error")],
              title="where the error is injected")
    t.add({"layer": 0, "local": 1.2e-3})
    print(t.to_text()); html = t.to_html(); rows = t.records()

rich and pandas are imported inside the methods, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from io import StringIO
from typing import Any, Callable

from moetrace.tracer.analysis.common import json_number

# Wide enough that rich never wraps or shrinks a column: tables are read in full or piped.
_TEXT_WIDTH = 1000


@dataclass(frozen=True)
class Column:
    """How one column reads.

    Attributes:
        key: the row key and the JSON key of the value.
        header: the column header in the terminal and HTML tables.
        fmt: a format string (``"{:.3e}"``) or a callable from the value to its text.
        description: what the column means (the legend of the HTML table).
        table: shown in the terminal and HTML tables (False: JSON only).
        json: given in :meth:`Table.records` (False: a display column such as a rank).
        missing: the text of a missing value (None or NaN).
        align: ``"right"`` (numbers) or ``"left"`` (names).
    """

    key: str
    header: str
    fmt: str | Callable[[Any], str] = "{}"
    description: str = ""
    table: bool = True
    json: bool = True
    missing: str = "-"
    align: str = "right"

    def cell(self, value) -> str:
        """The formatted text of ``value``."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return self.missing
        return self.fmt(value) if callable(self.fmt) else self.fmt.format(value)


@dataclass
class Table:
    """Columns, rows of raw values, and an optional title line above the terminal table."""

    columns: list[Column]
    rows: list[dict] = field(default_factory=list)
    title: str = ""

    def add(self, row: dict) -> None:
        """Append one row (a dict from column keys to raw values; missing keys read as missing)."""
        self.rows.append(row)

    def shown(self) -> list[Column]:
        """The columns of the terminal and HTML tables."""
        return [c for c in self.columns if c.table]

    def cells(self) -> list[list[str]]:
        """(row, shown column) formatted texts, the same for the terminal and the HTML table."""
        cols = self.shown()
        return [[c.cell(_plain(row.get(c.key))) for c in cols] for row in self.rows]

    def to_text(self) -> str:
        """The terminal table: the title, a header line, one line per row; no colour, no borders."""
        from rich.console import Console
        from rich.table import Table as RichTable
        from rich.text import Text

        cols = self.shown()
        t = RichTable(box=None, show_edge=False, pad_edge=False, padding=(0, 1), show_header=True)
        for c in cols:
            t.add_column(Text(c.header), justify=c.align, no_wrap=True)
        for row in self.cells():
            t.add_row(*(Text(s) for s in row))  # Text: a "[lo, hi)" cell is not rich markup
        buf = StringIO()
        Console(file=buf, width=_TEXT_WIDTH, color_system=None, no_color=True, highlight=False,
                emoji=False, force_terminal=False).print(t)
        lines = [line.rstrip() for line in buf.getvalue().splitlines()]
        return "\n".join(([self.title] if self.title else []) + lines)

    def to_html(self, legend: bool = True) -> str:
        """An HTML ``<table>`` of the same cells (escaped), with a legend of the described columns."""
        import pandas as pd

        cols = self.shown()
        frame = pd.DataFrame(self.cells(), columns=[c.header for c in cols])
        out = frame.to_html(index=False, escape=True, border=0, classes="moetrace")
        described = [c for c in cols if c.description]
        if legend and described:
            import html

            items = "".join(f"<li><b>{html.escape(c.header)}</b>: {html.escape(c.description)}</li>"
                            for c in described)
            out += f'<ul class="legend">{items}</ul>'
        return out

    def records(self) -> list[dict]:
        """JSON-ready rows: the raw value of every JSON column (NaN and infinities as None)."""
        cols = [c for c in self.columns if c.json]
        return [{c.key: _json(row.get(c.key)) for c in cols} for row in self.rows]


def layer_table(ds, columns, title: str = "", extra: dict | None = None) -> Table:
    """A :class:`Table` with one row per layer of ``ds``.

    Args:
        ds: a Dataset with a ``layer`` dimension; each column reads the variable of its key.
        columns: the :class:`Column` specs; those whose key is neither
            ``layer`` nor a (layer,) variable of ``ds`` nor in ``extra`` are left out.
        title: the line above the terminal table.
        extra: key -> (layer,) array of values computed beside ``ds`` (multiples of a floor, ...).
    """
    extra = extra or {}
    data = {**{v: ds[v].values for v in ds.data_vars if ds[v].dims == ("layer",)}, **extra}
    cols = [c for c in columns if c.key == "layer" or c.key in data]
    table = Table(cols, title=title)
    for i, L in enumerate(ds["layer"].values):
        table.add({"layer": int(L), **{c.key: data[c.key][i] for c in cols if c.key != "layer"}})
    return table


def _plain(x):
    """numpy scalars as Python ones, so format specs and the missing test see plain values."""
    return x.item() if hasattr(x, "item") and getattr(x, "ndim", 1) == 0 else x


def _json(x):
    x = _plain(x)
    return x if isinstance(x, (str, list, dict)) else json_number(x)
