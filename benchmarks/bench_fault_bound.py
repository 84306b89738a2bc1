"""How loud can one quantized matrix's error get? The error of a matrix's ordinary weights when dead input
channels (columns whose input is exactly zero, so the reference never feels them) hold outliers of +-A.

A planted fault matters at the output only as much as the planted expert's output error does. This
measures whether a quantizer's error on the weights that carry the function can be pushed past the
weights' own magnitude (a "loud" fault in a quiet expert): two dead columns per 32-wide sub-block hold +A
and -A, the rest are N(0, sigma); every row is quantized with moetrace's ggml-exact quantizers and the
error is read on the live columns only, as rms / sigma and as relative L2 of the live part.

    python benchmarks/bench_fault_bound.py [--rows 512] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from moetrace.kernels.base import dequantize, quantize

    n, sigma = 256, 0.03
    dead = sorted(sb * 32 + c for sb in range(n // 32) for c in (3, 17))
    live = [i for i in range(n) if i not in dead]
    print("| outliers A / sigma | q4_k | q5_k | q6_k | q8_0 |  (relative L2 error of the live weights)")
    print("|---|---|---|---|---|")
    for ratio in (0, 10, 30, 100, 1000):
        g = torch.Generator().manual_seed(args.seed)
        w = torch.randn(args.rows, n, generator=g) * sigma
        if ratio:
            w[:, dead[0::2]] = ratio * sigma
            w[:, dead[1::2]] = -ratio * sigma
        cells = []
        for t in ("q4_k", "q5_k", "q6_k", "q8_0"):
            d = dequantize(quantize(w, t), t, n)
            e = (d - w)[:, live]
            cells.append(f"{e.norm().item() / w[:, live].norm().item():.3f}")
        print(f"| {ratio} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
