"""Per-expert and per-component views of a variant's local error, and the tokens routed to one expert.

The per-expert table is recorded in teacher mode (moetrace.tracer.store.schema, "The per-expert
table"); these functions read it. The component view splits each layer's teacher-forced (local)
error into what its attention, its MoE block as a whole, the routed experts' weights alone, its
shared expert and its dense MLP add, each as a relative L2 error against the reference's layer
output (token means), beside the router's set-flip rate; so "layer 0's MoE output carries 0.33 and
its attention 0.13" is one table instead of an xarray session.
"""

from __future__ import annotations

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.tracer.render.table import Column, Table


def parse_expert(text: str) -> tuple[int, int]:
    """``L:E`` -> (layer, expert)."""
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise MoetraceError(f"--expert {text!r}: give LAYER:EXPERT, e.g. 5:3") from None


def _require_table(var) -> None:
    if "expert_error" not in var:
        raise MoetraceError(f"{var.attrs.get('variant')}: the store has no per-expert table; trace the variant with "
                            f"--mode teacher (stores of this moetrace version record it there)")


def expert_rows(var, layer: int | None = None) -> list[dict]:
    """Every (layer, expert) of the teacher-mode table that tokens reached, worst impact first.

    ``impact`` is the expert's share of its layer's routed-expert error energy (``expert_sq``
    over the layer's sum), so an expert few tokens reach but which ruins them still ranks high.
    """
    _require_table(var)
    t = var.sel(mode="teacher")
    err, tok = t["expert_error"].values, t["expert_tokens"].values  # (moe_layer, expert)
    w, sq = t["expert_weight"].values, t["expert_sq"].values.astype(np.float64)
    layers = [int(x) for x in var["moe_layer"].values]
    rows = []
    for li, L in enumerate(layers):
        if layer is not None and L != layer:
            continue
        total = np.nansum(sq[li])
        for e in range(err.shape[1]):
            if tok[li, e] > 0:
                rows.append({"layer": L, "expert": e, "rel_error": float(err[li, e]), "tokens": int(tok[li, e]),
                             "weight": float(w[li, e]), "impact": float(sq[li, e] / total) if total > 0 else 0.0,
                             "z": None})
    for L in set(r["layer"] for r in rows):  # how far each expert's error sits above its layer's typical one
        mine = [r for r in rows if r["layer"] == L]
        med = float(np.median([r["rel_error"] for r in mine]))
        for r in mine:
            r["x_median"] = r["rel_error"] / med if med > 0 else float("nan")
    rows.sort(key=lambda r: -r["x_median"])
    return rows


EXPERT_COLUMNS = [
    Column("layer", "layer", "{:d}"),
    Column("expert", "expert", "{:d}"),
    Column("rel_error", "relL2", "{:.3e}", "the expert's output error on its tokens, variant against reference "
           "weights on the same input"),
    Column("x_median", "x median", "{:.1f}x", "its error over the median expert's of its layer"),
    Column("tokens", "tokens", "{:d}", "tokens routed to it"),
    Column("weight", "weight", "{:.2f}", "the routing weight those tokens give it (sum)"),
    Column("impact", "impact", "{:.0%}", "its share of the layer's routed-expert error energy"),
]


def expert_table(var, top: int = 10) -> Table:
    return _table(EXPERT_COLUMNS, expert_rows(var)[:top],
                  "Worst expert matrices (teacher mode: each expert's own weight error on its tokens)")


def component_rows(ref, var) -> list[dict]:
    """Per layer (teacher mode): local error and each component's, relative to the reference's layer output."""
    from moetrace.tracer.analysis.common import modes_of

    if "teacher" not in modes_of(var):
        raise MoetraceError(f"{var.attrs.get('variant')}: the component view needs a teacher mode; trace with "
                            f"--mode teacher")
    r = ref["resid"].sel(mode="free").values.astype(np.float64)  # (layer, token, H)
    rn = np.maximum(np.linalg.norm(r, axis=-1), 1e-30)  # (layer, token)
    t = var.sel(mode="teacher")
    rows = [{"layer": int(L), "local": float(np.mean(np.linalg.norm(
        t["resid"].values[i].astype(np.float64) - r[i], axis=-1) / rn[i]))} for i, L in enumerate(var["layer"].values)]
    for site, key, dim in (("attn_out", "attention", "layer"), ("moe_out", "moe", "moe_layer"),
                           ("shared_out", "shared", "moe_layer"), ("mlp_out", "mlp", "dense_layer")):
        if site not in var or site not in ref:
            continue
        rv = ref[site].sel(mode="free").values.astype(np.float64)
        vv = t[site].values.astype(np.float64)
        for i, L in enumerate(var[dim].values if dim != "layer" else var["layer"].values):
            rows[int(L)][key] = float(np.mean(np.linalg.norm(vv[i] - rv[i], axis=-1) / rn[int(L)]))
    if "experts_part" in var:
        part = t["experts_part"].values.astype(np.float64)  # (moe_layer, token)
        for i, L in enumerate(var["moe_layer"].values):
            rows[int(L)]["experts"] = float(np.mean(part[i] / rn[int(L)]))
    if "topk_idx" in var and "topk_idx" in ref:
        ri, vi = ref["topk_idx"].sel(mode="free").values, t["topk_idx"].values  # (moe_layer, token, k)
        for i, L in enumerate(var["moe_layer"].values):
            flips = [set(a.tolist()) != set(b.tolist()) for a, b in zip(ri[i], vi[i])]
            rows[int(L)]["router_flips"] = float(np.mean(flips))
    for row in rows:
        parts = {k: row.get(k) for k in ("attention", "moe", "mlp") if row.get(k) is not None}
        row["largest"] = max(parts, key=parts.get) if parts else None
    return rows


COMPONENT_COLUMNS = [
    Column("layer", "layer", "{:d}"),
    Column("local", "local", "{:.3e}", "the layer's teacher-forced error (relative L2 of its output)"),
    Column("attention", "attention", "{:.3e}", "error of its attention output, over the norm of the layer's output"),
    Column("moe", "moe", "{:.3e}", "error of its MoE block output (routing, inputs and weights together)"),
    Column("experts", "experts", "{:.3e}", "of which the routed experts' weights alone (same input, same routing)"),
    Column("shared", "shared", "{:.3e}", "error of the shared expert's output"),
    Column("mlp", "mlp", "{:.3e}", "error of a dense layer's MLP output"),
    Column("router_flips", "router flips", "{:.3f}", "share of tokens whose chosen expert set changed"),
    Column("largest", "largest", "{}", "the component with the largest error", align="left"),
]


def component_table(ref, var) -> Table:
    return _table(COMPONENT_COLUMNS, component_rows(ref, var),
                  "Where each layer's local error comes from (teacher mode; relative to the layer's output)")


def _table(columns, rows, title) -> Table:
    keys = {k for r in rows for k, v in r.items() if v is not None}
    t = Table([c for c in columns if c.key in keys], title=title)
    for r in rows:
        t.add(r)
    return t


def tokens_of_expert(ref, var, layer: int, expert: int, mode: str = "free") -> Table:
    """The tokens the reference or the variant (``mode``) routes to ``expert`` at ``layer``, with both weights."""
    from moetrace.tracer.analysis.common import require_moe_layers

    require_moe_layers(ref, "--expert")
    moe = [int(x) for x in ref["moe_layer"].values] if "moe_layer" in ref.coords else list(range(ref.sizes["layer"]))
    if layer not in moe:
        raise MoetraceError(f"--expert {layer}:{expert}: layer {layer} has no router; MoE layers: {moe}")
    n_exp = ref.sizes["expert"]
    if not 0 <= expert < n_exp:
        raise MoetraceError(f"--expert {layer}:{expert}: experts are 0..{n_exp - 1}")
    sel = {"moe_layer": layer} if "moe_layer" in ref["topk_idx"].dims else {"layer": layer}
    ri = ref["topk_idx"].sel(mode="free", **sel).values  # (token, k)
    rw = ref["topk_weight"].sel(mode="free", **sel).values
    vi = var["topk_idx"].sel(mode=mode, **sel).values
    vw = var["topk_weight"].sel(mode=mode, **sel).values
    text = ref["token_text"].values if "token_text" in ref.coords else [""] * ri.shape[0]
    rref = ref["resid"].sel(mode="free", layer=layer).values.astype(np.float64)
    rvar = var["resid"].sel(mode=mode, layer=layer).values.astype(np.float64)
    err = np.linalg.norm(rvar - rref, axis=-1) / np.maximum(np.linalg.norm(rref, axis=-1), 1e-30)
    t = Table([Column("token", "token", "{:d}"), Column("seq", "seq", "{:d}"), Column("pos", "pos", "{:d}"),
               Column("text", "text", "{!r}", align="left"),
               Column("ref_weight", "ref weight", "{:.3f}", "the reference's routing weight (- : not routed)"),
               Column("var_weight", f"{mode} weight", "{:.3f}", "the variant's routing weight (- : not routed)"),
               Column("rel_error", "relL2", "{:.3e}", "the variant's residual error at this layer on the token")],
              title=f"Tokens routed to expert {expert} at layer {layer} (reference, or variant in {mode} mode)")
    seq, pos = ref["seq"].values, ref["pos"].values
    for i in range(ri.shape[0]):
        a, b = ri[i] == expert, vi[i] == expert
        if a.any() or b.any():
            t.add({"token": i, "seq": int(seq[i]), "pos": int(pos[i]), "text": str(text[i]),
                   "ref_weight": float(rw[i][a][0]) if a.any() else None,
                   "var_weight": float(vw[i][b][0]) if b.any() else None, "rel_error": float(err[i])})
    return t
