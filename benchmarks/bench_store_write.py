"""The trace writer alone: what storing builtin:mini's sites costs, without the model, against another revision's writer.

Writes a store of builtin:mini's shapes (16 layers, 1024 tokens, hidden 256, 32 experts top-4,
every site, one mode) through ``TraceWriter`` from fixed random tensors: create, every layer's
``write_layer`` and ``mark_layers_done``, the logits, ``finish``. The same with the
``tracer/store/writer.py`` of git revision ``--baseline`` (loaded from ``git show`` into a module of
its own), interleaved in one process; wall and CPU seconds (CPU: every thread of the process,
zarr's event loop and its I/O threads included), medians and the median of paired ratios.

A third case, "plain files", is the floor under zarr: the same chunk bytes and CRC-32C
(google_crc32c, as zarr's codec) written with one ``open``/``write`` per chunk into the same
folder layout, no zarr and no store metadata; not a store, only what writing the bytes costs.

On a machine with as many busy threads as cores (torch's), the writer's CPU time is what a
traced run pays for it; its wall time is what it would cost alone.

    python benchmarks/bench_store_write.py [--baseline REV] [--repeats 15] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

L, T, H, E, K, V = 16, 1024, 256, 32, 4, 256  # builtin:mini


def _writer_of(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:tracer/store/writer.py"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    path = Path(tempfile.mkdtemp(prefix="moetrace-writer-")) / "baseline_writer.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("moetrace_baseline_writer", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.TraceWriter


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="HEAD", help="git revision whose writer is the baseline")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=".", help="folder for the stores (a temporary folder inside; deleted)")
    args = ap.parse_args()

    from moetrace.tracer.store.schema import Tokens
    from moetrace.tracer.store.writer import TraceWriter

    sizes = {"layers": L, "hidden": H, "expert": E, "k": K, "vocab": V, "moe_layers": list(range(L)),
             "dense_layers": [], "shared": False}
    tokens = Tokens(np.arange(T) % V, np.zeros(T, int), np.arange(T), np.array(["a"] * T, dtype=object))
    g = torch.Generator().manual_seed(0)
    rec = {"resid": torch.randn(T, H, generator=g), "attn_out": torch.randn(T, H, generator=g),
           "moe_out": torch.randn(T, H, generator=g), "router_logits": torch.randn(T, E, generator=g),
           "topk_idx": torch.randint(0, E, (T, K), generator=g), "topk_weight": torch.rand(T, K, generator=g)}
    logits = torch.randn(T, V, generator=g)
    root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.out))
    count = itertools.count()

    def one(cls):
        t, c = time.perf_counter(), time.process_time()
        w = cls(root / f"s{next(count)}.zarr", sizes, tokens, ["free"], [*rec, "logits"], {"model": "bench"})
        for layer in range(L):
            w.write_layer("free", layer, rec)
            w.mark_layers_done(layer + 1)
        w.write_logits("free", logits)
        w.finish()
        return time.perf_counter() - t, time.process_time() - c

    def plain():
        import google_crc32c

        t, c = time.perf_counter(), time.process_time()
        folder = root / f"s{next(count)}"
        for name in [*rec, "logits"]:
            (folder / name).mkdir(parents=True)
        for layer in range(L):
            for name, x in rec.items():
                b = x.to(torch.int16 if name == "topk_idx" else torch.float32).numpy().tobytes()
                with open(folder / name / f"c.0.{layer}.0.0", "wb") as f:
                    f.write(b + np.uint32(google_crc32c.value(b)).tobytes())
        b = logits.numpy().tobytes()
        with open(folder / "logits" / "c.0.0.0", "wb") as f:
            f.write(b + np.uint32(google_crc32c.value(b)).tobytes())
        return time.perf_counter() - t, time.process_time() - c

    writers = {"this tree": TraceWriter, f"baseline ({args.baseline})": _writer_of(args.baseline), "plain files": None}
    try:
        for cls in writers.values():
            one(cls) if cls else plain()  # warm-up
        times = {k: [] for k in writers}
        for _ in range(args.repeats):
            for k, cls in writers.items():
                times[k].append(one(cls) if cls else plain())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"TraceWriter alone, builtin:mini shapes ({L} layers, {T} tokens, all sites), median of {args.repeats}")
    for k, v in times.items():
        print(f"  {k:<22} wall {statistics.median(x[0] for x in v) * 1e3:7.0f} ms   "
              f"cpu {statistics.median(x[1] for x in v) * 1e3:7.0f} ms")
    new, base = times["this tree"], times[f"baseline ({args.baseline})"]
    for i, what in ((0, "wall"), (1, "cpu")):
        paired = statistics.median(a[i] / b[i] for a, b in zip(new, base))
        medians = statistics.median(a[i] for a in new) / statistics.median(b[i] for b in base)
        print(f"  this tree / baseline, {what}: {medians:.2f}x of medians, {paired:.2f}x paired")
    for i, what in ((0, "wall"), (1, "cpu")):
        paired = statistics.median(a[i] / b[i] for a, b in zip(new, times["plain files"]))
        print(f"  this tree / plain files (the floor), {what}: {paired:.2f}x paired")


if __name__ == "__main__":
    main()
