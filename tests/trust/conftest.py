"""The property suite's real files (made once per session) and its case counts (printed at the end)."""

from __future__ import annotations

import json
import os

import pytest

from fuzz_files import COUNTS, make_files


@pytest.fixture(scope="session")
def trust_files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("trust"))


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    terminalreporter.write_line("property suite cases per file kind (cases / read fine / one-line MoetraceError):")
    for kind, c in sorted(COUNTS.items()):
        terminalreporter.write_line(f"  {kind}: {c['cases']} / {c['result']} / {c['error']}")
    out = os.environ.get("MOETRACE_FUZZ_REPORT")
    if out:
        with open(out, "w") as fh:
            json.dump({k: dict(v) for k, v in COUNTS.items()}, fh, indent=1)
