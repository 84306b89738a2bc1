"""Throughput of the Q3_K/Q6_K, legacy, Q8_K/Q8_1 and float formats against gguf-py's numpy code.

Run: ``python benchmarks/bench_formats_q3_q6_legacy.py [--elems 16777216] [--types Q6_K,Q8_0] [--device cpu]``.
Prints M params/s (median of ``--repeat`` runs) for moetrace's quantize and dequantize and, where gguf-py
implements them, gguf-py's quantize and dequantize on the same input.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

TYPES = ["Q3_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q8_K", "F16", "BF16"]
GGUF_QUANTIZES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"}
GGUF_DEQUANTIZES = {"Q3_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"}


def _median_time(fn, repeat: int, sync) -> float:
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--elems", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--row", type=int, default=4096)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--imatrix", action="store_true", help="time the importance-matrix quantize paths")
    ap.add_argument("--no-gguf", action="store_true", help="skip gguf-py")
    args = ap.parse_args()

    import gguf

    from moetrace.kernels import get_format

    def quantize(x, t, imatrix):
        # The formats' own entry: Q8_1's row size in the shared table is stale and the legacy
        # imatrix paths take the row length, which kernels.quantize does not pass yet.
        fmt = get_format(t)
        rows, n = x.shape
        qw = None if imatrix is None else imatrix.reshape(1, n).expand(rows, n).reshape(-1, fmt.block_size)
        kw = {"n_per_row": n} if qw is not None and getattr(fmt, "needs_row_length", False) else {}
        return fmt.quantize_blocks(x.reshape(-1, fmt.block_size), qw, **kw)

    def dequantize(q, t, n):
        return get_format(t).dequantize_blocks(q)

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = args.elems // args.row
    x = torch.randn(rows, args.row, generator=torch.Generator().manual_seed(0)) * 0.02
    imatrix = torch.rand(args.row, generator=torch.Generator().manual_seed(1)) + 0.1 if args.imatrix else None
    xd = x.to(dev)
    imd = None if imatrix is None else imatrix.to(dev)
    n = x.numel() / 1e6
    print(f"{rows} x {args.row} = {x.numel()} elements on {dev}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeat}; M params/s")
    print(f"{'type':6} {'quantize':>10} {'dequantize':>11} {'gguf q':>9} {'gguf dq':>9} {'dq ratio':>9}")
    for t in args.types.split(","):
        q = quantize(xd, t, imd)
        tq = _median_time(lambda: quantize(xd, t, imd), args.repeat, sync)
        tdq = _median_time(lambda: dequantize(q, t, args.row), args.repeat, sync)
        gq = gdq = float("nan")
        if not args.no_gguf:
            qt = gguf.GGMLQuantizationType[t]
            xn = x.numpy()
            qn = q.cpu().numpy().reshape(rows, -1)
            if t in GGUF_QUANTIZES and imatrix is None:
                gq = n / _median_time(lambda: gguf.quants.quantize(xn, qt), args.repeat, lambda: None)
            if t in GGUF_DEQUANTIZES:
                gdq = n / _median_time(lambda: gguf.quants.dequantize(qn, qt), args.repeat, lambda: None)
        print(f"{t:6} {n / tq:10.1f} {n / tdq:11.1f} {gq:9.1f} {gdq:9.1f} {(n / tdq) / gdq:9.1f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
