"""Cost of each engine path's matmuls at Qwen3-30B-A3B's widths, against a bf16 linear, in the same run.

One layer's worth of linears without the model around them: the attention projections (q 4096 x
2048, k and v 512 x 2048, o 2048 x 4096) on ``--tokens`` tokens, and ``--experts`` experts
(gate and up 768 x 2048, down 2048 x 768) on tokens x 8 / 128 tokens each (top-8 of 128 spread
evenly); the per-layer estimate scales the experts to 128. Weights are Q4_K blocks. Each path's
matmuls are timed in alternation with the baseline (``torch`` bf16 linear on the dequantized
weights, what ``q4_k_m-bf16`` runs) and the ratio of the medians is printed. Small enough to run
without the heavy lock (about 1 GiB, well under two CPU-minutes).

    .venv/bin/python benchmarks/bench_engine_paths.py --tokens 256 --experts 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8, help="experts timed (the estimate scales to 128)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from moetrace.kernels import dequantize, matmul, quantize
    from moetrace.kernels.engine import cuda_q8_1, marlin
    from moetrace.kernels.engine.hgemm import hgemm

    g = torch.Generator().manual_seed(0)
    t, per_expert = args.tokens, max(1, args.tokens * 8 // 128)
    attn = [(4096, 2048), (512, 2048), (512, 2048), (2048, 4096)]
    expert = [(768, 2048), (768, 2048), (2048, 768)]
    mats = [(r, c, t) for r, c in attn] + [(r, c, per_expert) for _ in range(args.experts) for r, c in expert]
    data = []
    for r, c, n_tok in mats:
        w = torch.randn(r, c, generator=g) * 0.02
        q = quantize(w, "Q4_K")
        data.append((q, dequantize(q, "Q4_K", c), torch.randn(n_tok, c, generator=g), c))
    paths = {
        "bf16 (baseline)": lambda q, w, x, c: torch.nn.functional.linear(x.bfloat16(), w.bfloat16()),
        "llamacpp_cpu": lambda q, w, x, c: matmul(x, q, "Q4_K", c),
        "llamacpp_cuda_mmq": lambda q, w, x, c: cuda_q8_1.matmul(x, q, "Q4_K", c, cuda_q8_1.kernel_for(x.shape[0])),
        "llamacpp_cuda_f16": lambda q, w, x, c: hgemm(x, w),
        "marlin re-quantize (load)": lambda q, w, x, c: marlin.roundtrip(w),
    }
    n_attn = len(attn)

    def timed(f):
        t0 = time.perf_counter()
        for i, (q, w, x, c) in enumerate(data):
            f(q, w, x, c)
            if i == n_attn - 1:
                t1 = time.perf_counter()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1  # attention, experts timed

    with torch.inference_mode():
        for f in paths.values():
            timed(f)  # warm-up
        res = {k: [] for k in paths}
        for _ in range(args.repeats):
            for k, f in paths.items():
                res[k].append(timed(f))
    scale = 128 / args.experts
    layer = {k: statistics.median(a + e * scale for a, e in v) for k, v in res.items()}
    base = layer["bf16 (baseline)"]
    print(f"Qwen3-30B-A3B widths, Q4_K weights, {t} tokens ({per_expert} per expert), {args.experts} experts timed, "
          f"{args.repeats} repeats; per-layer estimate with 128 experts")
    for k, s in layer.items():
        print(f"{k:28s} {s:8.3f} s/layer   ratio {s / base:7.1f}")
    return layer


if __name__ == "__main__":
    main()
