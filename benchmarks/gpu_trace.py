"""Traced runs on a CUDA device at Qwen3-30B-A3B's widths: wall time per run and per layer, and peak GPU memory.

Traces ``builtin:qwen3-30b-a3b:layers=8`` (hidden 2048, 128 experts top-8) with the reference
``orig-fp32`` and the variants ``orig-bf16`` and ``q4_k_m-bf16`` (add engine paths with
``--variant``), each variant in a run of its own, on ``--device`` (default ``cuda``). The first
run warms the caches (built-in model, quantization cache, CUDA context) and is not timed. Prints
each variant's median seconds, seconds per layer, peak GPU memory, and its ratio to the first
variant, plus the same run on the CPU when ``--cpu-baseline`` is given (one repeat: it is slow).

    MOETRACE_CACHE=... python benchmarks/gpu_trace.py                  # on a GPU machine
    python benchmarks/gpu_trace.py --dry-run                           # CPU, builtin:tiny: the script itself works
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = "builtin:qwen3-30b-a3b:layers=8"
DEFAULT_VARIANTS = ("orig-bf16", "q4_k_m-bf16")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--variant", dest="variants", action="append", default=None,
                    help=f"a variant to time (repeat; default: {', '.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (default cuda)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-baseline", action="store_true", help="also time one CPU run of each variant")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the script without a GPU: builtin:tiny, 32 tokens, one repeat, no warm-up, on the CPU")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.model, args.device, args.tokens, args.repeats = "builtin:tiny", "cpu", 32, 1
    args.variants = args.variants or list(DEFAULT_VARIANTS)
    return args


def _peak_gib(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def time_run(src, tokens, model: str, variant: str, device: str, root: Path) -> tuple[float, float | None]:
    """Seconds of one traced run of ``variant`` (reference included) and the peak GPU memory in GiB."""
    import torch

    from moetrace.tracer.execution.device import resolve
    from moetrace.tracer.execution.executor import RunConfig, run_trace

    dev = resolve(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    out = Path(tempfile.mkdtemp(prefix="run", dir=root))
    t = time.perf_counter()
    run_trace(src, RunConfig(model=model, variants=[variant], device=device), tokens, out)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    took = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return took, _peak_gib(dev)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from moetrace.tracer.execution.device import resolve
    from moetrace.tracer.sources.checkpoint import open_source
    from moetrace.tracer.sources.prompts import DEMO_TEXT, tokenize

    resolve(args.device)  # no CUDA: one line, before the model is built
    src = open_source(args.model)
    text = (DEMO_TEXT + " ") * (args.tokens // len(DEMO_TEXT) + 1)
    tokens = tokenize([text[: args.tokens]], src.tokenizer)
    root = Path(tempfile.mkdtemp(prefix="moetrace-gpu-trace-", dir="."))
    results = {}
    try:
        if not args.dry_run:
            time_run(src, tokens, args.model, args.variants[0], args.device, root)  # warm-up, not timed
        for v in args.variants:
            runs = [time_run(src, tokens, args.model, v, args.device, root) for _ in range(args.repeats)]
            cpu = time_run(src, tokens, args.model, v, "cpu", root)[0] if args.cpu_baseline else None
            results[v] = {"median_s": statistics.median(r[0] for r in runs), "runs_s": [r[0] for r in runs],
                          "peak_gib": max((r[1] or 0.0) for r in runs), "cpu_s": cpu}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = results[args.variants[0]]["median_s"]
    layers = src.num_layers
    print(f"{args.model} on {args.device}, {len(tokens.ids)} tokens, {args.repeats} repeats (reference orig-fp32 "
          f"traced in every run)")
    for v, r in results.items():
        cpu = f"   cpu {r['cpu_s']:.2f} s ({r['cpu_s'] / r['median_s']:.1f}x)" if r["cpu_s"] else ""
        print(f"{v:24s} median {r['median_s']:.2f} s  {r['median_s'] / layers:.3f} s/layer  peak {r['peak_gib']:.2f} GiB"
              f"  ratio {r['median_s'] / base:.2f}{cpu}")
    return results


if __name__ == "__main__":
    main()
