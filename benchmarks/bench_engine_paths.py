"""Cost of each engine path's matmuls at Qwen3-30B-A3B's widths, against a bf16 linear, in the same run.

One layer's worth of matmuls without the model around them, each path through its own code: the
attention projections (q 4096 x 2048, k and v 512 x 2048, o 2048 x 4096) on ``--tokens`` tokens,
and the paths' experts forward over ``--experts`` experts (gate and up 768 x 2048, down 2048 x
768, top-8 routing, 16 tokens per expert as 256 tokens top-8 of 128 give); the per-layer
estimate scales the experts' time to 128. ``--preset mini`` (any built-in preset) takes that
preset's widths, experts and top-k instead. Weights are Q4_K blocks. Each path is timed in
alternation with the baseline (bf16 torch on the dequantized weights, what ``q4_k_m-bf16`` runs:
transformers' eager experts) and the ratio of the medians is printed. ktransformers_decode's
figure includes re-quantizing the attention weights to Marlin (once per layer in a run). Small
enough to run without the heavy lock (under 1 GiB).

    .venv/bin/python benchmarks/bench_engine_paths.py --tokens 256 --experts 16 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16, help="experts timed (the estimate scales to all of the preset's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="qwen3-30b-a3b", help="the built-in shape whose widths are timed")
    ap.add_argument("--paths", default="", help="comma-separated paths to time (default: all); the baseline always runs")
    args = ap.parse_args(argv)

    import types

    import numpy as np
    import torch

    from moetrace.kernels import dequantize, matmul, quantize
    from moetrace.kernels.compute import BlockWeight
    from moetrace.kernels.compute import ktransformers_prefill as ktp
    from moetrace.kernels.compute import llamacpp_cpu as cpu
    from moetrace.kernels.compute import llamacpp_cuda_f16 as f16
    from moetrace.kernels.compute import llamacpp_cuda_mmq as mmq
    from moetrace.kernels.engine import cuda_q8_1, marlin
    from moetrace.kernels.engine.hgemm import hgemm

    from moetrace.tracer.sources.builtin import PRESETS

    g = torch.Generator().manual_seed(0)
    p = PRESETS[args.preset]
    t, hid, inter, top_k = args.tokens, p.hidden, p.expert_width, p.top_k
    n_exp = min(args.experts, p.experts)
    per_expert = max(1, t * top_k // p.experts)  # tokens each expert gets on average
    q_rows, kv_rows = p.heads * p.head_dim, p.kv_heads * p.head_dim
    attn = []
    for r, c in [(q_rows, hid), (kv_rows, hid), (kv_rows, hid), (hid, q_rows)]:
        q = quantize(torch.randn(r, c, generator=g) * 0.02, "Q4_K")
        attn.append((q, dequantize(q, "Q4_K", c), torch.randn(t, c, generator=g), c))

    def blocks(shape):  # (E, rows, cols) Q4_K, and its dequantized float32 weights
        qs = [quantize(torch.randn(*shape[1:], generator=g) * 0.02, "Q4_K") for _ in range(shape[0])]
        return (BlockWeight(np.stack([q.numpy() for q in qs]), "Q4_K", shape),
                torch.stack([dequantize(q, "Q4_K", shape[-1]) for q in qs]))

    (bg, wg), (bu, wu), (bd, wd) = blocks((n_exp, inter, hid)), blocks((n_exp, inter, hid)), blocks((n_exp, hid, inter))
    t_exp = max(1, n_exp * per_expert // top_k)  # tokens so that each timed expert gets per_expert
    x_exp = torch.randn(t_exp, hid, generator=g)
    idx = torch.stack([torch.randperm(n_exp, generator=g)[:top_k] for _ in range(t_exp)])
    wts = torch.rand(t_exp, top_k, generator=g)
    act = torch.nn.functional.silu
    m_blocks = types.SimpleNamespace(_moetrace_blocks={"gate_up_proj": (bg, bu), "down_proj": bd}, act_fn=act)
    m_bf16 = types.SimpleNamespace(gate_up_proj=torch.cat([wg, wu], 1).bfloat16(), down_proj=wd.bfloat16(), act_fn=act)
    m_f16 = types.SimpleNamespace(gate_up_proj=torch.cat([wg, wu], 1).half().float(), down_proj=wd.half().float(),
                                  act_fn=act)

    def attention(lin):
        return lambda: [lin(q, w, x, c) for q, w, x, c in attn]

    paths = {  # name -> (attention linears, experts forward)
        "bf16 (baseline)": (attention(lambda q, w, x, c: torch.nn.functional.linear(x.bfloat16(), w.bfloat16())),
                            lambda: ktp._experts_torch(m_bf16, x_exp.bfloat16(), idx, wts)),
        "llamacpp_cpu": (attention(lambda q, w, x, c: matmul(x, q, "Q4_K", c)),
                         lambda: cpu._experts_forward(m_blocks, "llamacpp_cpu", x_exp, idx, wts)),
        "llamacpp_cuda_mmq": (attention(lambda q, w, x, c: cuda_q8_1.matmul(x, q, "Q4_K", c, "mmq")),
                              lambda: mmq._experts_forward(m_blocks, x_exp, idx, wts)),
        "llamacpp_cuda_f16": (attention(lambda q, w, x, c: hgemm(x, w)),
                              lambda: f16._experts_forward(m_f16, x_exp, idx, wts)),
        "ktransformers_decode": (attention(lambda q, w, x, c: torch.nn.functional.linear(x.bfloat16(),
                                                                                         marlin.roundtrip(w))),
                                 lambda: cpu._experts_forward(m_blocks, "llamacpp_cpu", x_exp.bfloat16(), idx, wts)),
    }

    if args.paths:
        keep = set(args.paths.split(","))
        paths = {k: v for k, v in paths.items() if k == "bf16 (baseline)" or k in keep}

    def timed(pair):
        t0 = time.perf_counter()
        pair[0]()
        t1 = time.perf_counter()
        pair[1]()
        return t1 - t0, time.perf_counter() - t1

    with torch.inference_mode():
        for pair in paths.values():
            timed(pair)  # warm-up
        res = {k: [] for k in paths}
        for _ in range(args.repeats):
            for k, pair in paths.items():
                res[k].append(timed(pair))
    scale = p.experts / n_exp
    layer = {k: statistics.median(a + e * scale for a, e in v) for k, v in res.items()}
    base = layer["bf16 (baseline)"]
    print(f"{args.preset} widths, Q4_K weights: attention on {t} tokens, {n_exp} experts timed on {per_expert} tokens "
          f"each (scaled to {p.experts}), {args.repeats} repeats, medians")
    for k, s in layer.items():
        print(f"{k:24s} {s:8.3f} s/layer   ratio {s / base:6.1f}")
    return layer


if __name__ == "__main__":
    main()
