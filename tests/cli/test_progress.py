"""Progress of long phases: tqdm bars with an ETA on a terminal, nothing in a pipe, lines on request."""

from __future__ import annotations

import os
import subprocess
import sys

ARGS = ["run", "--model", "builtin:tiny:layers=3", "--variant", "orig-bf16", "--max-tokens", "16", "--run", "p"]


def _run(tmp_path, env_extra, stderr):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "moetrace", *ARGS, "--out", str(tmp_path)], stdout=subprocess.PIPE,
                          stderr=stderr, env=env, timeout=600)


def test_a_pipe_gets_no_progress(tmp_path):
    p = _run(tmp_path, {"MOETRACE_PROGRESS": "auto"}, subprocess.PIPE)
    assert p.returncode == 0, p.stderr
    assert b"traced" not in p.stderr and b"\r" not in p.stderr


def test_lines_on_request(tmp_path):
    p = _run(tmp_path, {"MOETRACE_PROGRESS": "lines"}, subprocess.PIPE)
    lines = [ln for ln in p.stderr.decode().splitlines() if "traced" in ln]
    assert [ln.split("(")[0].strip() for ln in lines] == ["layer 1/3 traced", "layer 2/3 traced", "layer 3/3 traced"]


def test_a_terminal_gets_a_bar_with_an_eta(tmp_path):
    import pty

    master, slave = pty.openpty()
    try:
        p = _run(tmp_path, {"MOETRACE_PROGRESS": "auto"}, slave)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal's other end is closed: all is read
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    assert p.returncode == 0
    text = out.decode(errors="replace")
    assert "tracing" in text and "3/3" in text and "<" in text, text  # tqdm's "[elapsed<remaining, rate]"


def test_quiet_silences_the_bar(tmp_path):
    p = _run(tmp_path, {"MOETRACE_PROGRESS": "lines"}, subprocess.PIPE)
    q = subprocess.run([sys.executable, "-m", "moetrace", *ARGS, "--out", str(tmp_path), "--run", "q", "-q"],
                       capture_output=True, env={**os.environ, "MOETRACE_PROGRESS": "lines"}, timeout=600)
    assert b"traced" in p.stderr and b"traced" not in q.stderr


def test_run_shows_progress_while_generating_a_builtin_model(tmp_path):
    import os

    from cli_runner import moetrace

    env = {**os.environ, "MOETRACE_PROGRESS": "lines", "MOETRACE_CACHE": str(tmp_path / "cache")}
    p = moetrace("run", "--model", "builtin:tiny", "--plant", "1:2:down", "--variant", "orig-bf16",
                 "--text", "abc", "--out", str(tmp_path / "traces"), env=env)
    written = [ln for ln in p.stderr.splitlines() if "written (model.layers" in ln or "written (lm_head" in ln]
    assert any("tensor 1/2 written (model.layers.1.mlp.experts" in ln for ln in written)  # the planted overlay's
    from moetrace.tracer.sources import builtin

    n = len(list(builtin.checkpoint_plan(builtin.PRESETS["tiny"])))
    assert any(ln.strip() == f"tensor {n}/{n} written (lm_head.weight)" for ln in written)  # the base model's
