"""Which mechanism of an MoE layer injects the most local error: per-component figures of a teacher-forced trace.

Runs ``moetrace run --mode teacher`` (each variant layer fed the reference's exact input, so every
figure is what that layer injects by itself) and splits each layer's output error by the sites
the family records:

- attention (``attn_out``: the whole MLA block of DeepSeek, GQA of GLM),
- the dense MLP of the lead layers (``mlp_out``),
- the shared expert (``shared_out``),
- the routed experts (``moe_out - shared_out``),
- the router: the fraction of (token, slot) choices that differ from the reference's in teacher
  mode (``topk_idx``, as sets per token), and the share of the routed experts' error energy on
  the tokens whose choice flipped.

Each component's error is ``|var - ref|`` per token, divided by the reference's ``resid`` norm at
that layer (so the components are on one scale: how far each moves the residual stream), averaged
over tokens; also the component's own relative error ``|var - ref| / |ref|``.

    python benchmarks/bench_mechanisms.py --model builtin:moonlight-16b-a3b:layers=4 \\
        --variant q4_k_m-bf16 [--tokens 256] [--out DIR]
    python benchmarks/bench_mechanisms.py --run-dir traces/RUN --variant q4_k_m-bf16   # an existing run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _norm(x):
    return np.sqrt((x.astype(np.float64) ** 2).sum(-1))  # over hidden


def component_errors(ref, var) -> dict:
    """{component: (per-layer layers, to-resid means, own relative means)}, plus routing flips."""
    r_resid = ref.resid.sel(mode="free")
    out = {}

    def add(name, r, v, layer_dim):  # DataArrays (layer_dim, token, hidden)
        layers = [int(x) for x in r[layer_dim].values]
        base = _norm(r_resid.sel(layer=layers).values)  # (layer, token)
        r, v = r.values, v.values
        d = _norm(v - r)
        out[name] = (layers, (d / base).mean(-1), (d / np.maximum(_norm(r), 1e-30)).mean(-1))

    add("attention", ref.attn_out.sel(mode="free"), var.attn_out.sel(mode="teacher"), "layer")
    if "mlp_out" in ref:
        add("dense_mlp", ref.mlp_out.sel(mode="free"), var.mlp_out.sel(mode="teacher"), "dense_layer")
    if "moe_out" in ref:
        r_moe, v_moe = ref.moe_out.sel(mode="free"), var.moe_out.sel(mode="teacher")
        if "shared_out" in ref:
            r_sh, v_sh = ref.shared_out.sel(mode="free"), var.shared_out.sel(mode="teacher")
            add("shared_expert", r_sh, v_sh, "moe_layer")
            r_moe, v_moe = r_moe - r_sh, v_moe - v_sh
        add("routed_experts", r_moe, v_moe, "moe_layer")
        ri = np.sort(ref.topk_idx.sel(mode="free").values, -1)  # (moe_layer, token, k)
        vi = np.sort(var.topk_idx.sel(mode="teacher").values, -1)
        flipped_tok = (ri != vi).any(-1)  # (moe_layer, token)
        # chosen experts not among the reference's choice, per token (sets: the order of top-k is free)
        same = np.array([[len(set(a) & set(b)) for a, b in zip(ra, va)] for ra, va in zip(ri, vi)])
        flip_rate = 1.0 - same / ri.shape[-1]
        e2 = ((v_moe - r_moe).values.astype(np.float64) ** 2).sum(-1)  # routed error energy per token
        share = (e2 * flipped_tok).sum(-1) / e2.sum(-1)
        out["routing"] = ([int(x) for x in ref.moe_layer.values], flip_rate.mean(-1), share, flipped_tok.mean(-1))
    return out


def report(ref_path, var_path) -> str:
    import moetrace

    ref, var = moetrace.open_trace(ref_path), moetrace.open_trace(var_path)
    comps = component_errors(ref, var)
    lines = [f"local (teacher-forced) error per component, {Path(var_path).stem} against {Path(ref_path).stem}",
             f"{'component':<16} {'layers':<14} {'|d|/|resid| mean':>17} {'max':>9} {'|d|/|x| mean':>13}"]
    for name, (layers, to_resid, own, *_) in comps.items():
        if name == "routing":
            continue
        lines.append(f"{name:<16} {str(layers):<14} {to_resid.mean():>17.3e} {to_resid.max():>9.3e} {own.mean():>13.3e}")
    if "routing" in comps:
        layers, flips, share, tokens = comps["routing"]
        lines.append(f"routing: {flips.mean() * 100:.2f}% of chosen (token, slot) experts differ from the reference's "
                     f"(per layer {', '.join(f'{x * 100:.1f}' for x in flips)}); the {tokens.mean() * 100:.1f}% of "
                     f"tokens with a flip carry {share.mean() * 100:.1f}% of the routed experts' error energy")
    for name, (layers, to_resid, *_) in comps.items():
        if name != "routing":
            lines.append(f"per layer |d {name}|/|resid|: " + " ".join(f"{L}:{x:.2e}" for L, x in zip(layers, to_resid)))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model to trace (e.g. builtin:moonlight-16b-a3b:layers=4)")
    ap.add_argument("--run-dir", help="an existing run folder with the reference and a teacher-mode variant")
    ap.add_argument("--variant", default="q4_k_m-bf16")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default=None, help="traces folder (default: a temporary one)")
    args = ap.parse_args()
    if args.run_dir:
        run = Path(args.run_dir)
    else:
        from moetrace.tracer.sources.prompts import DEMO_TEXT

        text = ((DEMO_TEXT + " ") * (args.tokens // len(DEMO_TEXT) + 2))[:args.tokens]
        out = Path(args.out or tempfile.mkdtemp(prefix="bench-mechanisms-"))
        subprocess.run([sys.executable, "-m", "moetrace", "run", "--model", args.model, "--variant", args.variant,
                        "--mode", "free", "--mode", "teacher", "--text", text, "--max-tokens", str(args.tokens),
                        "--out", str(out), "--run", "mech", "-q"], check=True)
        run = out / "mech"
    print(f"model {args.model or run}, {args.variant}")
    print(report(run / "orig-fp32.zarr", run / f"{args.variant}.zarr"))


if __name__ == "__main__":
    main()
