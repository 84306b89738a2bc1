"""Run the real `moetrace` command in a subprocess, as a user's shell would."""

from __future__ import annotations

import os
import subprocess
import sys


def moetrace(*args, check=True, env=None, timeout=600):
    """``python -m moetrace ARGS``; raises with the command's stderr when ``check`` and it fails."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "moetrace", *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"moetrace {' '.join(args)} exited {p.returncode}:\n{p.stderr}")
    return p


def kill_run_after(args, progress_line: str, limit_s: float = 240) -> None:
    """Start ``moetrace ARGS``, SIGKILL it as soon as stderr shows ``progress_line``."""
    import signal
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MOETRACE_PROGRESS": "lines"}  # a line per layer to wait for
    proc = subprocess.Popen([sys.executable, "-m", "moetrace", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=env, text=True)
    deadline = time.time() + limit_s
    try:
        for line in proc.stderr:
            if progress_line in line:
                proc.send_signal(signal.SIGKILL)
                return
            assert time.time() < deadline, f"the run never printed {progress_line!r}"
        raise AssertionError(f"the run ended before printing {progress_line!r}")
    finally:
        proc.kill()
        proc.wait()
