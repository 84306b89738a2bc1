"""Seconds to write a built-in model's checkpoint: the streaming writer against the GENERATOR_VERSION 4 one.

Both write the same model (bit-identical tensors; tests/tracer/test_builtin_speed.py checks it)
into a scratch folder, alternating, ``--repeat`` times each; prints the median seconds per layer
of each and their ratio, and each one's peak RSS growth (ru_maxrss is per process, so each write
runs in its own subprocess).

    python benchmarks/bench_generate.py [--model builtin:qwen3-30b-a3b:layers=1] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from moetrace.tracer.sources.builtin import parse_builtin
if sys.argv[1] == "v4":
    import builtin_v4_reference as mod
else:
    from moetrace.tracer.sources import builtin as mod
model = parse_builtin(sys.argv[2])
folder = Path(sys.argv[4]); folder.mkdir()
t = time.perf_counter()
mod._write_checkpoint(model, folder)
print(json.dumps({"s": time.perf_counter() - t, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_once(which: str, model: str, scratch: Path) -> dict:
    tests = Path(__file__).resolve().parent.parent / "tests" / "tracer"
    folder = scratch / which
    out = subprocess.run([sys.executable, "-c", CHILD, which, model, str(tests), str(folder)],
                         check=True, capture_output=True, text=True).stdout
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:qwen3-30b-a3b:layers=1")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    from moetrace.tracer.sources.builtin import parse_builtin

    layers = parse_builtin(args.model).shape.layers
    runs = {"v4": [], "new": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        for _ in range(args.repeat):
            for which in runs:
                r = write_once(which, args.model, Path(scratch))
                runs[which].append(r)
                print(f"  {which}: {r['s']:.1f} s, peak RSS {r['maxrss'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    med = {k: statistics.median(r["s"] for r in v) / layers for k, v in runs.items()}
    rss = {k: statistics.median(r["maxrss"] for r in v) for k, v in runs.items()}
    print(f"{args.model}: seconds per layer (median of {args.repeat}), peak RSS of the writing process")
    for k, label in (("v4", "GENERATOR_VERSION 4 writer"), ("new", "streaming writer")):
        print(f"  {label:28s} {med[k]:8.1f} s/layer  {rss[k] / 2**30:6.2f} GiB")
    print(f"  speedup {med['v4'] / med['new']:.2f}x, peak RSS {rss['new'] / rss['v4']:.2f}x of the baseline")


if __name__ == "__main__":
    main()
