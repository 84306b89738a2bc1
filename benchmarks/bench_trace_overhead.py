"""What recording costs: a traced reference run with every site against the plain forward.

Three timings on the same model and tokens, medians of --repeats runs each, measured in one
process so the ratios compare like with like:

- plain: transformers' Qwen3MoeForCausalLM forward (weights already in memory, fp32), the baseline;
- traced: moetrace's executor for the reference with all sites recorded and written to Zarr
  (weights read layer by layer from the safetensors checkpoint, as a real run does);
- traced, prefetching: the same with layer L+1's weights read and converted in a background
  thread while layer L runs (by default only where a core is left over from torch's threads);
- traced, no sites: the same executor recording nothing, which separates the cost of the
  hooks and the store from the cost of layer-by-layer execution;
- load + plain forward: ``from_pretrained`` and the forward, the end-to-end cost a user of
  plain transformers pays (the traced runs read their weights inside the timing).

The traced timings cover ``run_trace`` itself; deleting its output afterwards is not timed.

    python benchmarks/bench_trace_overhead.py [--model builtin:] [--tokens 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from moetrace.hooks.sites import ALL_SITES
    from moetrace.tracer.executor import RunConfig, run_trace
    from moetrace.tracer.prompts import DEMO_TEXT, tokenize
    from moetrace.tracer.source import open_source

    src = open_source(args.model)
    text = (DEMO_TEXT + " ") * (args.tokens // len(DEMO_TEXT) + 1)
    tokens = tokenize([text[: args.tokens]] * args.sequences, src.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32).eval()

    def plain():
        with torch.inference_mode():
            for ids in tokens.sequences():
                model(torch.from_numpy(ids).unsqueeze(0))

    def load_and_plain():
        m = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32).eval()
        with torch.inference_mode():
            for ids in tokens.sequences():
                m(torch.from_numpy(ids).unsqueeze(0))

    def traced(sites, prefetch=None):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            run_trace(src, RunConfig(model=args.model, variants=[], sites=list(sites)), tokens, d, prefetch=prefetch)
            return time.perf_counter() - t  # deleting the output afterwards is not part of the run

    cases = {
        "plain forward": plain,
        "traced, all sites": lambda: traced(ALL_SITES),
        "traced, prefetching": lambda: traced(ALL_SITES, prefetch=True),
        "traced, no sites": lambda: traced([]),
        "load + plain forward": load_and_plain,
    }
    for fn in cases.values():  # warm-up: caches, allocator, lazy imports
        fn()
    times = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():  # interleaved, so drift hits every case alike
            t = time.perf_counter()
            inner = fn()
            times[k].append(inner if inner is not None else time.perf_counter() - t)
    base = statistics.median(times["plain forward"])
    print(f"{src.model_id}: {src.num_layers} layers, {tokens.n} tokens, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:<21} {m:8.3f} s   {m / base:5.2f}x plain forward   (min {min(v):.3f} s, max {max(v):.3f} s)")
    all_sites = statistics.median(times["traced, all sites"])
    no_sites = statistics.median(times["traced, no sites"])
    print(f"  recording itself (all sites / no sites): {all_sites / no_sites:.2f}x")
    # What storing the trace's bytes costs by itself on this machine: the same number of bytes
    # written to fresh files (new page-cache pages), in chunks of one layer's resid.
    with tempfile.TemporaryDirectory() as d:
        run_trace(src, RunConfig(model=args.model, variants=[], sites=list(ALL_SITES)), tokens, d)
        nbytes = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file() and f.name.startswith("c"))
    chunk = np.ones(tokens.n * src.config.hidden_size, dtype=np.float32)
    floor = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            for i in range(max(1, nbytes // chunk.nbytes)):
                with open(Path(d) / str(i), "wb") as fh:
                    fh.write(chunk.data)
            floor.append(time.perf_counter() - t)
    fl = statistics.median(floor)
    print(f"  the trace's {nbytes / 2**20:.0f} MiB written to fresh files alone: {fl:.3f} s "
          f"({fl / base:.2f}x plain forward; traced all sites - no sites = {all_sites - no_sites:.3f} s)")
    e2e = statistics.median(times["load + plain forward"])
    print(f"  end to end (traced, all sites / load + plain forward): {all_sites / e2e:.2f}x")


if __name__ == "__main__":
    main()
