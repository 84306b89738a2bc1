"""Cost of the llamacpp_cpu engine path: a traced run with q4_k_m-llamacpp_cpu against one with q4_k_m-bf16.

Both runs trace the same tokens on the same model (the reference orig-fp32 included in each), in
alternation so a loaded machine slows both alike; the first run of each warms the quantization
cache and is not timed. Prints each run's median and the ratio of the medians (target: <= 3).

    MOETRACE_CACHE=... .venv/bin/python benchmarks/bench_engine.py --model builtin:mini --repeats 5
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:mini")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", default="q4_k_m-bf16")
    ap.add_argument("--variant", default="q4_k_m-llamacpp_cpu")
    args = ap.parse_args()

    from moetrace.tracer.execution.executor import RunConfig, run_trace
    from moetrace.tracer.sources.checkpoint import open_source
    from moetrace.tracer.sources.prompts import DEMO_TEXT, tokenize

    src = open_source(args.model)
    text = (DEMO_TEXT + " ") * (args.tokens // len(DEMO_TEXT) + 1)
    tokens = tokenize([text[: args.tokens]], src.tokenizer)
    root = Path(tempfile.mkdtemp(prefix="moetrace-bench-engine-", dir="."))
    count = itertools.count()

    def run(variant: str) -> float:
        d = root / f"run{next(count)}"
        t = time.perf_counter()
        run_trace(src, RunConfig(model=args.model, variants=[variant]), tokens, d)
        took = time.perf_counter() - t
        shutil.rmtree(d, ignore_errors=True)
        return took

    try:
        for v in (args.baseline, args.variant):
            run(v)  # warm-up: quantization cache, imports
        times = {args.baseline: [], args.variant: []}
        for _ in range(args.repeats):
            for v in times:
                times[v].append(run(v))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    for v, ts in times.items():
        print(f"{v:28s} median {med[v]:.2f} s   runs {' '.join(f'{t:.2f}' for t in ts)}")
    print(f"ratio {args.variant} / {args.baseline}: {med[args.variant] / med[args.baseline]:.2f} "
          f"({args.model}, {args.tokens} tokens, {args.repeats} repeats)")


if __name__ == "__main__":
    main()
