"""End-to-end: real subprocess runs of `moetrace decompose`, `moetrace routing` and `moetrace report`."""

from __future__ import annotations

import json

import numpy as np
import pytest

import moetrace as mt


from cli_runner import moetrace  # noqa: E402


@pytest.fixture(scope="module")
def stores(tiny_run):
    _, s = tiny_run
    return str(s["orig-fp32"]), str(s["orig-bf16"])


def test_routing_table_and_json(stores):
    from moetrace.tracer.analysis.routing import routing_diff

    ref, var = stores
    p = moetrace("routing", ref, var)
    assert "orig-bf16 vs orig-fp32 routing (free mode) on builtin:tiny" in p.stdout
    assert "set-flip rate by the reference's k/(k+1) logit margin" in p.stdout
    assert "flip xfloor" not in p.stdout  # the variant is the floor itself: no multiples of itself
    data = json.loads(moetrace("routing", ref, var, "--mode", "teacher", "--json").stdout)
    lib = routing_diff(mt.open_trace(ref), mt.open_trace(var), "teacher")
    assert data["mode"] == "teacher"
    np.testing.assert_allclose([row["any_flip"] for row in data["layers"]], lib.any_flip.values, rtol=1e-12)
    assert data["first_flip_layer"] == lib.first_flip_layer.values.tolist()


def test_decompose_table_and_json(stores):
    ref, var = stores
    p = moetrace("decompose", ref, var)
    assert "local vs propagated error" in p.stdout and "highest local error: layer" in p.stdout
    data = json.loads(moetrace("decompose", ref, var, "--json").stdout)
    assert [row["layer"] for row in data["layers"]] == [0, 1, 2, 3]
    assert data["layers"][0]["gain"] is None and data["layers"][1]["gain"] > 0


def test_report_writes_folder(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "rep"
    p = moetrace("report", str(run_dir), "--out", str(out), "--resamples", "100")
    assert "headline figures vs orig-fp32 on builtin:tiny" in p.stdout
    assert "as multiples of the noise floor" in p.stdout
    assert f"Report: {out / 'index.html'} (5 plots)" in p.stdout
    assert "Analysing" in p.stderr
    assert (out / "index.html").read_text().startswith("<!DOCTYPE html>")
    assert (out / "divergence.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads(moetrace("report", str(run_dir), "--out", str(out), "--resamples", "100", "--json").stdout)
    fig = data["variants"]["orig-bf16"]
    assert data["noise_floor"] == "orig-bf16" and fig["x_floor"]["kl_mean"] == pytest.approx(1.0)
    lo, hi = fig["ci"]["kl_mean"]
    assert lo <= fig["figures"]["kl_mean"] <= hi


def test_user_errors_are_one_line_and_exit_2(stores, tmp_path):
    ref, var = stores
    cases = [
        (("routing", ref, str(tmp_path / "missing.zarr")), "does not exist"),
        (("decompose", ref, ref), "no 'teacher' mode"),  # the reference records only free mode
        (("report", str(tmp_path)), "holds no trace stores"),
        (("report", str(tmp_path / "nope")), "does not exist"),
        (("report", str(tmp_path), "--resamples", "0"), "--resamples"),  # click's own usage error
    ]
    for args, msg in cases:
        p = moetrace(*args, check=False)
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        if msg.startswith("--"):
            assert msg in p.stderr
            continue
        assert len(lines) == 1 and lines[0].startswith("moetrace: error:") and msg in lines[0], (args, p.stderr)
    assert not (tmp_path / "nope").exists()  # a failed report writes nothing


def test_analysis_commands_never_load_torch(tiny_run, tmp_path):
    """diff, decompose, routing and report read stores only: they start without importing torch (seconds per
    command), which the command line would lose to one module-level import."""
    import subprocess
    import sys

    run_dir, s = tiny_run
    ref, var = str(s["orig-fp32"]), str(s["orig-bf16"])
    script = (
        "import sys\nfrom moetrace.cli.main import main\n"
        "for args in sys.argv[1:]:\n"
        "    try:\n        main(args.split('|'), standalone_mode=False)\n"
        "    except SystemExit as e:\n        assert not e.code, (args, e.code)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    cmds = [f"diff|{ref}|{var}", f"decompose|{ref}|{var}", f"routing|{ref}|{var}",
            f"report|{run_dir}|--out|{tmp_path / 'rep'}|--resamples|20|-q"]
    p = subprocess.run([sys.executable, "-c", script, *cmds], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "rep" / "index.html").is_file()
