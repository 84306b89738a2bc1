"""What a user sees after a run: the next commands, decompose's columns, noise-floor multiples in words."""

from __future__ import annotations

import json
import math
import shlex

import xarray as xr

from moetrace.tracer.analysis.common import FLOOR_EXACT, FLOOR_ZERO, floor_fmt, floor_multiple, floor_multiples
from tests.cli_runner import moetrace


def test_floor_multiple_rule():
    assert floor_multiple(3.0, 1.5) == 2.0
    assert floor_multiple(0.0, 0.0) == FLOOR_EXACT == "exact"
    assert floor_multiple(0.2, 0.0) == FLOOR_ZERO == "floor 0"
    assert math.isnan(floor_multiple(float("nan"), 0.0)) and math.isnan(floor_multiple(1.0, None))
    fmt = floor_fmt()
    assert [fmt(floor_multiple(a, b)) for a, b in ((3.0, 1.5), (0.0, 0.0), (0.2, 0.0))] == ["2.0x", "exact", "floor 0"]
    ds = xr.Dataset({"f": ("layer", [0.0, 0.5, 1.0])}, coords={"layer": [0, 1, 2]})
    fl = xr.Dataset({"f": ("layer", [0.0, 0.0, 0.5])}, coords={"layer": [0, 1, 2]})
    assert floor_multiples(ds, fl, "f") == {"f_x_floor": ["exact", "floor 0", 2.0]}


def test_run_names_next_commands_and_they_work(tmp_path):
    args = ["run", "--model", "builtin:tiny", "--variant", "q4_k_m-bf16", "--variant", "orig-bf16", "--mode", "free",
            "--mode", "teacher", "--max-tokens", "6", "--out", str(tmp_path), "--run", "r", "-q"]
    text = moetrace(*args).stdout
    block = text[text.index("Next:"):].splitlines()[1:]
    cmds = [line.strip() for line in block if line.startswith("  moetrace ")]
    assert [c.split()[1] for c in cmds] == ["decompose", "routing", "report", "audit"]
    assert cmds[3].endswith(f"--run {tmp_path / 'r'}") and "--variant q4_k_m-bf16" in cmds[3]
    out = json.loads(moetrace(*args, "--json").stdout)  # stdout is JSON alone: the block is a field there
    assert out["next"] == cmds

    dec = moetrace(*shlex.split(cmds[0])[1:]).stdout
    rout = moetrace(*shlex.split(cmds[1])[1:]).stdout
    for t in (dec, rout):
        assert "nanx" not in t and "infx" not in t and "xfloor" in t
    # every multiple is a finite number or a word, in the table and in JSON alike
    r = json.loads(moetrace(*shlex.split(cmds[1])[1:], "--json").stdout)
    xs = [row[k] for row in r["layers"] for k in ("any_flip_x_floor", "mass_moved_x_floor")]
    assert xs and all(x in ("exact", "floor 0") or (isinstance(x, float) and math.isfinite(x)) for x in xs)
    words = [x for x in xs if isinstance(x, str)]
    assert all(w in rout for w in words)
    d = json.loads(moetrace(*shlex.split(cmds[0])[1:], "--json").stdout)
    amp = [row["amplified"] for row in d["layers"]]
    assert amp[0] is None and all(a >= 0 for a in amp[1:])
    help_text = moetrace("decompose", "--help").stdout
    from moetrace.tracer.analysis.decompose import COLUMNS

    for c in COLUMNS:
        if c.description:
            assert " ".join(c.description.split()[:4]) in " ".join(help_text.split())
    audit = json.loads(moetrace(*shlex.split(cmds[3])[1:], "--json", "--out", str(tmp_path / "a.zarr"), "-q").stdout)
    assert audit["run_tokens"] == 6 and sum(r["tokens"] for r in audit["top"]) > 0
