"""Progress of long phases on the terminal: tqdm bars with a rate and an ETA.

Bars are drawn only where stderr is a terminal and the command was not asked to be quiet: a
pipe or a log file gets nothing, so output meant for machines stays clean. ``MOETRACE_PROGRESS``
overrides the choice: ``bars``, ``lines`` (one plain line per step, for logs and tests that wait for
a step), ``off``, or ``auto`` (the default).
"""

from __future__ import annotations

import shutil
import sys

import click

def style(quiet: bool) -> str:
    """The progress style of this process: ``bars``, ``lines`` or ``off``."""
    from moetrace.settings import PROGRESS_STYLES, choice

    want = choice("MOETRACE_PROGRESS", PROGRESS_STYLES)
    if quiet:
        return "off"
    if want == "auto":
        return "bars" if sys.stderr.isatty() else "off"
    return want


class Steps:
    """One phase counted in steps (layers, tensors): a bar, plain lines, or nothing.

    Args:
        what: the phase, shown before the bar ("tracing", "quantizing").
        unit: what a step is ("layer", "tensor").
        verb: the past participle a plain line ends with ("layer 3/12 traced").
        quiet: the command's ``-q``.
    """

    def __init__(self, what: str, unit: str, verb: str, quiet: bool):
        self.what, self.unit, self.verb, self.style = what, unit, verb, style(quiet)
        self._bar = None

    def update(self, done: int, total: int | None, note: str = "") -> None:
        """``done`` of ``total`` steps finished; ``note`` names the last one."""
        if self.style == "lines":
            of = f"/{total}" if total else ""
            click.echo(f"  {self.unit} {done}{of} {self.verb}" + (f" ({note})" if note else ""), err=True)
        elif self.style == "bars":
            if self._bar is None:
                from tqdm import tqdm

                # A terminal that reports no size (a bare pty) would hide the bar (tqdm draws no bar past
                # the last row): fall back to 100 x 20.
                size = shutil.get_terminal_size((100, 20))
                self._bar = tqdm(total=total, desc=self.what, unit=self.unit, file=sys.stderr, leave=True,
                                 ncols=size.columns or 100, nrows=size.lines or 20)
            self._bar.update(done - self._bar.n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            if total is not None and done >= total:
                self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
