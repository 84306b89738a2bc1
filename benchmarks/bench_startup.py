"""Time to a one-line error, `moetrace variants` and `moetrace --help`, each from a fresh process.

The baseline is the interpreter alone (`python -c pass`) measured in the same run, so the figure
says what moetrace adds; the issue's target is under 2 s for each command. Medians of --repeats.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "moetrace run --variant q9_k-bf16": [sys.executable, "-m", "moetrace", "run", "--variant", "q9_k-bf16"],
    "moetrace variants": [sys.executable, "-m", "moetrace", "variants"],
    "moetrace --help": [sys.executable, "-m", "moetrace", "--help"],
    "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    times = {name: [] for name in CASES}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits every case alike
        for name, cmd in CASES.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c pass (baseline)"])
    print(f"median of {args.repeats}, wall seconds; ratio to the bare interpreter")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<42} {med:6.3f} s  {med / base:5.1f}x  (min {min(ts):.3f}, max {max(ts):.3f})")


if __name__ == "__main__":
    main()
