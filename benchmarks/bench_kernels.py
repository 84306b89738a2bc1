"""Kernel throughput and the cost of a weight audit, in one run.

Run: ``.venv/bin/python benchmarks/bench_kernels.py [--repeat 3] [--layer-repeat 3] [--experts 128]
[--types Q4_K,Q6_K,Q8_0] [--skip-layer]``.

Prints, each figure the median of ``--repeat`` runs:

1. quantize throughput per type (M params/s) on a (768, 2048) Student-t matrix, and its ratio to
   ggml's single-thread reference rates. Those rates (Q4_K 21, Q6_K 41, Q8_0 360 M params/s) are
   constants copied from NUMERICS.md ("measured on this kind of machine"), NOT measured here;
2. dequantize throughput against gguf-py's numpy dequantization of the same bytes, both
   measured in this run (the ratio is the figure to read);
3. the time to audit one decoder layer at Qwen3-30B-A3B's widths (128 experts x gate/up
   768x2048 and down 2048x768, plus attention and router), as ``moetrace audit`` does it for
   layer 7 of 48 under q4_k_m (every expert tensor Q4_K there): cold (quantize, write the
   cache, dequantize, metrics) and warm (cache hit: dequantize and metrics). Weights are
   generated in memory as BF16, nothing is written but the temporary quantized-weight cache.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

# ggml's single-thread quantize rates on a 2-core machine of this kind, M params/s: constants
# from NUMERICS.md, not measured by this script.
GGML_QUANTIZE_REF = {"Q4_K": 21.0, "Q6_K": 41.0, "Q8_0": 360.0}
DEFAULT_TYPES = ("Q4_K", "Q6_K", "Q8_0", "Q5_K", "Q3_K", "Q2_K", "Q4_0")


def _median(fn, repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def _student_t(shape, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi = torch.randn((*shape[:-1], 5), generator=g).pow(2).mean(-1, keepdim=True)  # heavy tails per row group
    return (z / chi.sqrt() * scale).to(torch.bfloat16)


def bench_quantize(types, repeat):
    from moetrace.kernels import quantize

    x = _student_t((768, 2048), 1 / 45.0, 0).float()
    n = x.numel() / 1e6
    print(f"Quantize: a (768, 2048) matrix ({n:.2f} M params), median of {repeat}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"  {'type':5} {'M params/s':>11} {'ggml 1-thread*':>15} {'ratio':>7}")
    out = {}
    for t in types:
        quantize(x[:64], t)  # warm-up
        med, _ = _median(lambda: quantize(x, t), repeat)
        rate = n / med
        ref = GGML_QUANTIZE_REF.get(t)
        out[t] = rate
        print(f"  {t:5} {rate:11.2f} {'' if ref is None else f'{ref:.0f}':>15} "
              f"{'' if ref is None else f'{rate / ref:.2f}x':>7}")
    print("  * ggml's single-thread reference rates are constants from NUMERICS.md, not measured in this run.")
    return out


def bench_dequantize(types, repeat):
    import gguf

    from moetrace.kernels import dequantize, quantize

    x = _student_t((768, 2048), 1 / 45.0, 1).float()
    reps = 4  # 6.3 M params per call
    print(f"\nDequantize: {reps * x.numel() / 1e6:.2f} M params, median of {repeat}; gguf-py numpy measured "
          f"in this run on the same bytes")
    print(f"  {'type':5} {'moetrace M/s':>13} {'gguf-py M/s':>12} {'ratio':>7}")
    out = {}
    for t in types:
        q = quantize(x, t).repeat(reps, 1)  # (rows, bytes)
        qn = q.numpy()
        n = reps * x.numel() / 1e6
        dequantize(q[:64], t, 2048)
        ours, _ = _median(lambda: dequantize(q, t, 2048), repeat)
        theirs, _ = _median(lambda: gguf.quants.dequantize(qn, gguf.GGMLQuantizationType[t]), repeat)
        assert np.array_equal(dequantize(q, t, 2048).numpy(), gguf.quants.dequantize(qn, gguf.GGMLQuantizationType[t]))
        out[t] = (n / ours, n / theirs)
        print(f"  {t:5} {n / ours:13.1f} {n / theirs:12.1f} {theirs / ours:6.2f}x")
    return out


def bench_audit_layer(repeat, experts):
    from types import SimpleNamespace

    from moetrace.tracer import audit as A
    from moetrace.tracer import builtin, qcache
    from moetrace.tracer import weights as W

    L = 7
    shape = builtin.PRESETS["qwen3-30b-a3b"]
    cfg = dict(builtin.hf_config_dict(shape), num_hidden_layers=48, num_experts=experts)
    src = SimpleNamespace(config=SimpleNamespace(**cfg), model_hash=f"bench-{experts}", model_id="bench")
    types = W.file_type_types(src, "q4_k_m", context=None)
    h, f, e = shape.hidden, shape.expert_width, experts
    qd, kvd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    b = f"blk.{L}."
    tensors = {
        b + "ffn_gate_exps.weight": _student_t((e, f, h), h ** -0.5, 10),
        b + "ffn_up_exps.weight": _student_t((e, f, h), h ** -0.5, 11),
        b + "ffn_down_exps.weight": _student_t((e, h, f), f ** -0.5, 12),
        b + "attn_q.weight": _student_t((qd, h), h ** -0.5, 13),
        b + "attn_k.weight": _student_t((kvd, h), h ** -0.5, 14),
        b + "attn_v.weight": _student_t((kvd, h), h ** -0.5, 15),
        b + "attn_output.weight": _student_t((h, qd), qd ** -0.5, 16),
        b + "ffn_gate_inp.weight": _student_t((e, h), h ** -0.5, 17),
    }
    n = sum(t.numel() for t in tensors.values()) / 1e6
    used = sorted({types[k] for k in tensors})
    print(f"\nAudit of one layer at Qwen3-30B-A3B's widths: layer {L} of 48 under q4_k_m ({e} experts x gate/up "
          f"{f}x{h}, down {h}x{f}, attention and router; {n:.0f} M params; types {', '.join(used)})")
    dirs = []

    def cold():
        d = tempfile.mkdtemp(prefix="moetrace-kernbench-")
        for old in dirs:
            shutil.rmtree(old, ignore_errors=True)
        dirs[:] = [d]
        ctx = qcache.QuantContext(src.model_hash, qcache.QuantCache(d))
        A.audit_tensors(tensors, types, ctx)

    def warm():
        ctx = qcache.QuantContext(src.model_hash, qcache.QuantCache(dirs[0]))
        A.audit_tensors(tensors, types, ctx)
        assert ctx.cache.misses == 0

    try:
        med, times = _median(cold, repeat)
        print(f"  cold (quantize, cache write, dequantize, metrics): median {med:.1f} s of "
              f"{', '.join(f'{t:.1f}' for t in times)} ({n / med:.1f} M params/s)")
        wmed, wtimes = _median(warm, repeat)
        print(f"  warm (cache hit: dequantize, metrics):           median {wmed:.2f} s of "
              f"{', '.join(f'{t:.2f}' for t in wtimes)}")
        ref = tensors[b + "ffn_gate_exps.weight"]
        deq = ref.float()
        deq.add_(1e-3)
        mmed, _ = _median(lambda: A.matrix_metrics(ref, deq), repeat)
        print(f"  metrics alone, one {e}-expert projection (batched over experts): median {mmed:.2f} s")
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="runs per kernel figure (the median is printed)")
    ap.add_argument("--layer-repeat", type=int, default=3, help="runs of the one-layer audit")
    ap.add_argument("--experts", type=int, default=128, help="experts in the audited layer")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES))
    ap.add_argument("--skip-layer", action="store_true", help="skip the one-layer audit (minutes at full width)")
    args = ap.parse_args()
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    print(f"moetrace kernel benchmark: torch {torch.__version__}, CPU, {torch.get_num_threads()} threads\n")
    bench_quantize(types, args.repeat)
    bench_dequantize(types, args.repeat)
    if not args.skip_layer:
        bench_audit_layer(args.layer_repeat, args.experts)


if __name__ == "__main__":
    main()
