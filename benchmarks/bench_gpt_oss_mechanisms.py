"""Which GPT-OSS mechanism injects the most local error under a variant (default q4_k_m-bf16)?

Teacher-forced, one decoder layer at a time: every layer is fed the reference's own input, so what
is measured is the error that layer injects by itself (moetrace's ``teacher`` mode). For each layer:

- ``full variant``: the layer as the variant computes it (its weights, its compute dtype);
- ``compute alone``: orig-<compute>: the reference's weights in the variant's compute dtype;
- one row per mechanism: the reference layer in fp32 with only that mechanism's parameters taking the
  variant's values (dequantized and rounded as the variant stores them): attention sinks, router bias,
  router weight, experts (matrices and their biases), attention projections, norms;
- the sliding window has no parameters: its row splits the full variant's attention error (the
  ``attn_out`` site) into the layers with a sliding window and those with full attention.

A BF16 checkpoint's sinks and router bias are stored exactly in BF16 and kept F32 by llama.cpp's
recipes, so their weight rows are zero: what they do to the error they do through the arithmetic.
The second table removes one mechanism from both the reference and the variant (sinks at -inf, so
no head puts weight on them; router bias zero; full attention on every layer) or gives the variant
the reference's experts, and reports the full variant's local error then: the mechanism's share is
how far that moves from the full variant's.

Error: relative L2 of the layer's output against the reference layer's output, over all tokens
(``attn_out`` for the window rows). The baseline for the ratios is the full variant in the same run.

    python benchmarks/bench_gpt_oss_mechanisms.py [--model builtin:tiny-gpt-oss] [--variant q4_k_m-bf16]
                                                  [--tokens 256]
"""

from __future__ import annotations

import argparse

import torch

# Mechanism -> the keys inside a GPT-OSS layer that make it (transformers' names).
MECHANISMS = {
    "attention sinks": ("self_attn.sinks",),
    "router bias": ("mlp.router.bias",),
    "router weight": ("mlp.router.weight",),
    "experts": ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj",
                "mlp.experts.down_proj_bias"),
    "attention projections": tuple(f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")),
    "norms": ("input_layernorm.weight", "post_attention_layernorm.weight"),
}


def _no_sinks(state: dict) -> dict:
    state["self_attn.sinks"] = torch.full_like(state["self_attn.sinks"], float("-inf"))  # exp(-inf) = 0: no sink
    return state


def _no_router_bias(state: dict) -> dict:
    state["mlp.router.bias"] = torch.zeros_like(state["mlp.router.bias"])
    return state


# Mechanism -> how the layer's weights change without it (the window: by the mask the layer gets).
REMOVALS = {"attention sinks": _no_sinks, "router bias": _no_router_bias, "sliding window": lambda s: s,
            "experts": lambda s: s}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``."""
    return float(torch.linalg.vector_norm((a.float() - b.float())) / torch.linalg.vector_norm(b.float()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-gpt-oss")
    ap.add_argument("--variant", default="q4_k_m-bf16")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()

    from moetrace.hooks.sites import capture
    from moetrace.tracer.execution.executor import _Model
    from moetrace.tracer.sources.checkpoint import open_source
    from moetrace.tracer.sources.prompts import DEMO_TEXT, tokenize
    from moetrace.tracer.variants import Variant
    from moetrace.tracer.weights.derive import tensor_types, variant_global, variant_layer_state

    src = open_source(args.model)
    text = ((DEMO_TEXT + " ") * (args.tokens // len(DEMO_TEXT) + 2))[:args.tokens]
    toks = tokenize([text], src.tokenizer)
    ids = torch.from_numpy(toks.sequences()[0])
    pos = torch.arange(len(ids))
    var = Variant.parse(args.variant)
    alone = Variant.parse(f"orig-{var.compute}")
    model = _Model(src)
    types = tensor_types(src, var, context=None)
    emb = variant_global(src, Variant.parse("orig-fp32"), {}, context=None)["model.embed_tokens.weight"]
    h = torch.nn.functional.embedding(ids, emb.float()).unsqueeze(0)  # (1, T, H) the reference stream
    ctx = {torch.float32: model.context(h, pos), var.dtype: model.context(h.to(var.dtype), pos)}
    kinds = model.layer_types
    rows: dict[str, list[float]] = {"full variant": [], "compute alone": [], **{m: [] for m in MECHANISMS}}
    removed: dict[str, list[float]] = {m: [] for m in REMOVALS}
    attn = {"sliding_attention": [], "full_attention": []}

    def forward(L, state, dtype, x, kind=None):
        layer = model.layer(L, state, dtype)
        masks, pe = ctx[dtype]
        with torch.inference_mode(), capture(layer, model.adapter, ("attn_out",)) as rec:
            out = layer(x.to(dtype), attention_mask=masks[kind or kinds[L]], position_embeddings=pe)
        model.release(layer)
        return out, rec["attn_out"]

    with torch.inference_mode():
        for L in range(src.num_layers):
            ref_state = {k: v.float() for k, v in src.layer_state(L).items()}
            ref_out, ref_attn = forward(L, ref_state, torch.float32, h)
            v_state = variant_layer_state(ref_state, L, var, types, cast=True, family=model.family)
            v_out, v_attn = forward(L, v_state, var.dtype, h)
            rows["full variant"].append(rel(v_out, ref_out))
            attn[kinds[L]].append(rel(v_attn, ref_attn))
            a_state = variant_layer_state(ref_state, L, alone, {}, cast=True, family=model.family)
            rows["compute alone"].append(rel(forward(L, a_state, alone.dtype, h)[0], ref_out))
            for mech, keys in MECHANISMS.items():
                mixed = {k: (v_state[k].float() if k in keys else w) for k, w in ref_state.items()}
                rows[mech].append(rel(forward(L, mixed, torch.float32, h)[0], ref_out))
            for mech, change in REMOVALS.items():
                r_st, v_st = change(dict(ref_state)), change(dict(v_state))
                kind = "full_attention" if mech == "sliding window" else None
                r_out = forward(L, r_st, torch.float32, h, kind)[0]
                if mech == "experts":
                    v_st = {k: (ref_state[k] if k in MECHANISMS["experts"] else w) for k, w in v_state.items()}
                removed[mech].append(rel(forward(L, v_st, var.dtype, h, kind)[0], r_out))
            h = ref_out  # the next layer's reference input

    n = src.num_layers
    print(f"{args.model}: {n} layers ({', '.join(k[:4] for k in kinds)}), {len(ids)} tokens, variant {args.variant}; "
          f"local (teacher-forced) relative L2 error of each layer's output")
    base = sum(rows["full variant"]) / n
    print(f"{'what takes the variant':<24} {'mean':>9} {'x full':>7}  per layer")
    for name, vals in rows.items():
        mean = sum(vals) / n
        print(f"{name:<24} {mean:>9.2e} {mean / base:>7.3f}  " + " ".join(f"{x:.2e}" for x in vals))
    print(f"\nthe full variant's local error with one mechanism removed from reference and variant alike "
          f"(experts: the variant keeps the reference's)")
    print(f"{'without':<24} {'mean':>9} {'x full':>7} {'share':>7}  per layer")
    for name, vals in removed.items():
        mean = sum(vals) / n
        print(f"{name:<24} {mean:>9.2e} {mean / base:>7.3f} {1 - mean / base:>7.3f}  "
              + " ".join(f"{x:.2e}" for x in vals))
    print("attn_out local error of the full variant by attention kind (the sliding window's share):")
    for kind, vals in attn.items():
        if vals:
            print(f"  {kind:<20} mean {sum(vals) / len(vals):.2e} over layers "
                  + ", ".join(str(i) for i, k in enumerate(kinds) if k == kind))


if __name__ == "__main__":
    main()
