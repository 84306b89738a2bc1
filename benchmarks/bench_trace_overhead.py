"""What recording costs: a traced reference run with every site against the plain forward.

Timings on the same model and tokens, medians of --repeats runs each, measured interleaved in one
process so the ratios compare like with like:

- plain: transformers' Qwen3MoeForCausalLM forward (weights already in memory, fp32), the baseline;
- traced: moetrace's executor for the reference with all sites recorded and written to Zarr
  (weights read layer by layer from the safetensors checkpoint, as a real run does);
- traced, old store (with ``--old-store REV``): the same with the store writer of git revision REV
  (default ddf4e83, the last hand-written one: its own shard files and O_DIRECT), loaded from
  ``git show REV:tracer/store/writer.py`` (``zarr_store.py`` before the writer had a module of its
  own) into a module of its own, so the cost of writing through zarr's API, or a change to the
  writer, is measured against it in the same process, interleaved;
- traced, no sites: the same executor recording nothing, which separates the cost of the
  hooks and the store from the cost of layer-by-layer execution;
- load + plain forward: ``from_pretrained`` and the forward, the end-to-end cost a user of
  plain transformers pays (the traced runs read their weights inside the timing);
- no sites + plain writes: the no-sites run, then the very bytes of an all-sites trace (every chunk
  file, as the store wrote it) written with plain ``open``/``write`` into a fresh folder: the floor
  that the file system under ``--out`` sets for any store of this trace, with no encoding, no
  checksum and no zarr at all.

The traced timings cover ``run_trace`` itself. Every run's output is kept, as a user keeps their
traces, until all timings are done (in ``--out``, default a temporary folder on the file system of
the current directory); deleting a run's output between runs would land the file system's deferred
work for the deletion in the next run's timing.

    python benchmarks/bench_trace_overhead.py [--model builtin:] [--tokens 1024] [--repeats 5] [--out DIR]
        [--old-store [REV]]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--old-store", nargs="?", const="ddf4e83", default=None, metavar="REV",
                    help="also time traced runs with the store writer of git revision REV (default ddf4e83)")
    ap.add_argument("--out", default=None, help="folder for the runs' outputs (a temporary folder under the "
                    "current directory by default; deleted at the end either way)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from moetrace.hooks.sites import ALL_SITES
    from moetrace.tracer.execution.executor import RunConfig, run_trace
    from moetrace.tracer.sources.prompts import DEMO_TEXT, tokenize
    from moetrace.tracer.sources.checkpoint import open_source

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

    out_root = Path(tempfile.mkdtemp(prefix="moetrace-bench-", dir=args.out or "."))
    count = itertools.count()

    from moetrace.tracer.execution import executor

    writers = {"new": executor.TraceWriter, "old": _old_writer(args.old_store) if args.old_store else None}

    def traced(sites, store="new"):
        d = out_root / f"run{next(count)}"
        executor.TraceWriter = writers[store]
        try:
            t = time.perf_counter()
            run_trace(src, RunConfig(model=args.model, variants=[], sites=list(sites)), tokens, d)
            return time.perf_counter() - t
        finally:
            executor.TraceWriter = writers["new"]

    payload = []  # (relative path, bytes) of an all-sites trace's files, read after the warm-up

    def no_sites_and_plain_writes():
        t = time.perf_counter()
        traced([])
        d = out_root / f"plain{next(count)}"
        for rel, data in payload:
            path = d / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        return time.perf_counter() - t

    cases = {
        "plain forward": plain,
        "traced, all sites": lambda: traced(ALL_SITES),
        "traced, old store": lambda: traced(ALL_SITES, store="old"),
        "traced, no sites": lambda: traced([]),
        "load + plain forward": load_and_plain,
        "no sites + plain writes": no_sites_and_plain_writes,
    }
    if not args.old_store:
        del cases["traced, old store"]
    try:
        for k, fn in cases.items():  # warm-up: caches, allocator, lazy imports
            if k == "no sites + plain writes":
                payload[:] = [(f.relative_to(out_root / "run0"), f.read_bytes())
                              for f in sorted((out_root / "run0").rglob("*")) if f.is_file()]
            fn()
        times = {k: [] for k in cases}
        for _ in range(args.repeats):
            for k, fn in cases.items():  # interleaved, so drift hits every case alike
                t = time.perf_counter()
                inner = fn()
                times[k].append(inner if inner is not None else time.perf_counter() - t)
        nbytes = sum(f.stat().st_size for f in (out_root / "run0").rglob("*") if f.is_file() and f.name.startswith("c"))
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    base = statistics.median(times["plain forward"])
    print(f"{src.model_id}: {src.num_layers} layers, {tokens.n} tokens, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}, {nbytes / 2**20:.0f} MiB of trace per run")
    print("  ratio: median over the plain forward's median; paired: median over repeats of the case's time over "
          "the plain forward's in the same repeat")
    print(f"  {'':<23} {'median':>8}    {'ratio':>6} {'paired':>7}")
    for k, v in times.items():
        m = statistics.median(v)
        paired = statistics.median(x / y for x, y in zip(v, times["plain forward"]))
        print(f"  {k:<23} {m:8.3f} s  {m / base:5.2f}x  {paired:5.2f}x   (min {min(v):.3f} s, max {max(v):.3f} s)")
    all_sites = statistics.median(times["traced, all sites"])
    no_sites = statistics.median(times["traced, no sites"])
    rec_paired = statistics.median(x / y for x, y in zip(times["traced, all sites"], times["traced, no sites"]))
    print(f"  recording itself (all sites / no sites): {all_sites / no_sites:.2f}x of medians, {rec_paired:.2f}x paired")
    floor = times["no sites + plain writes"]
    floor_paired = statistics.median(x / y for x, y in zip(floor, times["traced, no sites"]))
    print(f"  the file system's floor (no sites + plain writes of the trace's bytes / no sites): "
          f"{statistics.median(floor) / no_sites:.2f}x of medians, {floor_paired:.2f}x paired")
    store_paired = statistics.median(x / y for x, y in zip(times["traced, all sites"], floor))
    print(f"  the store against that floor (all sites / no sites + plain writes): "
          f"{all_sites / statistics.median(floor):.2f}x of medians, {store_paired:.2f}x paired")
    e2e = statistics.median(times["load + plain forward"])
    print(f"  end to end (traced, all sites / load + plain forward): {all_sites / e2e:.2f}x")
    if args.old_store:
        old = times["traced, old store"]
        paired = statistics.median(x / y for x, y in zip(times["traced, all sites"], old))
        print(f"  zarr's writer against the old store ({args.old_store}), all sites: "
              f"{all_sites / statistics.median(old):.2f}x of medians, {paired:.2f}x paired")


def _old_writer(rev: str):
    """The TraceWriter of git revision ``rev``'s tracer/store/zarr_store.py, as a module of its own."""
    import importlib.util
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    # The writer's own module where the revision has one (the store written through zarr), else the
    # hand-written store's single module.
    has_writer = subprocess.run(["git", "cat-file", "-e", f"{rev}:tracer/store/writer.py"], cwd=root).returncode == 0
    src = subprocess.run(["git", "show", f"{rev}:tracer/store/{'writer' if has_writer else 'zarr_store'}.py"],
                         capture_output=True, text=True, check=True, cwd=root).stdout
    path = Path(tempfile.mkdtemp(prefix="moetrace-old-store-")) / "old_zarr_store.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("moetrace_old_zarr_store", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)

    class OldWriter(mod.TraceWriter):
        """The old writer under today's calls: ``finish`` takes the run's findings, which the old store had no
        place for (a few attributes; dropping them leaves the timing of the store's writes as it was)."""

        def finish(self, attrs=None):
            super().finish()

    return OldWriter


if __name__ == "__main__":
    main()
