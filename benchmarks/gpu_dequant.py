"""Dequantization throughput: Triton kernels vs moetrace's torch path vs gguf-py's numpy.

For each GGML type, a 64 M-element tensor (16384 rows of 4096) of valid block bytes is
dequantized by

* ``triton``: :func:`moetrace.kernels.triton_dequant.dequantize_triton` on the device,
* ``torch``: :func:`moetrace.kernels.dequantize` (the block-format classes) on the same device,
* ``numpy``: ``gguf.quants.dequantize`` on the CPU (the reference; its output is checked bit for
  bit against the Triton output, float32 only),

and the script prints milliseconds, GB/s (bytes read + bytes written) and M params/s per path,
and the Triton speed-ups. Without CUDA it runs on the CPU with the Triton interpreter; use a small
size there (``--small``: 64 K elements), since the interpreter is slow.

Usage::

    python benchmarks/gpu_dequant.py                      # CUDA, 64 M elements, bf16 output
    python benchmarks/gpu_dequant.py --dtype float32 --types Q4_K Q6_K
    python benchmarks/gpu_dequant.py --small              # anywhere, in seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of each type's fp16 fields (d, dmin, m): set to finite values so the data is realistic.
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def make_blocks(type_name: str, rows: int, n_per_row: int, seed: int = 0):
    """Random block bytes with finite scales: (rows, bytes_per_row) uint8 numpy."""
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 256, (rows * n_per_row // block, size), dtype=np.uint8)
    for off in FP16_FIELDS[type_name]:
        scale = (rng.random(q.shape[0], dtype=np.float32) * 0.01 + 1e-4).astype(np.float16)  # (n_blocks,)
        q[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return q.reshape(rows, -1)


def timeit(fn, sync, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call (which also compiles)."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=64 * 2**20, help="elements per tensor (default 64 M)")
    p.add_argument("--n-per-row", type=int, default=4096)
    p.add_argument("--small", action="store_true", help="64 K elements (for a CPU run in the interpreter)")
    p.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeat", type=int, default=None, help="timed calls per path (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--no-numpy", action="store_true", help="skip gguf-py (slow for 64 M elements on few cores)")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        # Must be set before the kernels are defined (triton.jit reads it then).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import gguf
    import numpy as np

    from moetrace.errors import MoetraceError
    from moetrace.kernels import dequantize
    from moetrace.kernels.triton_dequant import dequantize_triton

    numel = 2**16 if args.small else args.numel
    n = args.n_per_row
    rows = max(1, numel // n)
    numel = rows * n
    dtype = getattr(torch, args.dtype)
    device = "cuda" if cuda else "cpu"
    repeat = args.repeat or (10 if cuda else 2)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out_bytes = numel * torch.empty((), dtype=dtype).element_size()
    where = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"{where}; {rows} x {n} = {numel / 2**20:.2f} M elements -> {args.dtype}; median of {repeat}")
    print(f"{'type':5} {'path':7} {'ms':>10} {'GB/s':>9} {'Mparam/s':>10}")

    for t in args.types:
        q_np = make_blocks(t, rows, n)
        q = torch.from_numpy(q_np).to(device)
        moved = q_np.nbytes + out_bytes
        res = {}

        def report(path, sec):
            res[path] = sec
            print(f"{t:5} {path:7} {sec * 1e3:10.3f} {moved / sec / 1e9:9.2f} {numel / sec / 1e6:10.1f}")

        report("triton", timeit(lambda: dequantize_triton(q, t, n, dtype), sync, repeat))
        try:
            report("torch", timeit(lambda: dequantize(q, t, n, dtype), sync, repeat))
        except (MoetraceError, NotImplementedError) as e:
            print(f"{t:5} torch   n/a ({e})")
        if not args.no_numpy:
            qtype = gguf.GGMLQuantizationType[t]
            report("numpy", timeit(lambda: gguf.quants.dequantize(q_np, qtype), lambda: None, max(1, repeat // 5)))
            want = gguf.quants.dequantize(q_np, qtype)
            got = dequantize_triton(q, t, n, torch.float32).cpu().numpy()
            if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                print(f"{t:5} MISMATCH: Triton float32 output differs from gguf-py in "
                      f"{int((got.view(np.uint32) != want.view(np.uint32)).sum())} elements")
        ratios = ", ".join(f"{res[k] / res['triton']:.2f}x over {k}" for k in ("torch", "numpy") if k in res)
        if ratios:
            print(f"{t:5} triton speed-up: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
