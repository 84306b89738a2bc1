"""The activation-weighted audit: each expert matrix's weight error, weighted by the routing of a run.

A plain audit (:mod:`moetrace.tracer.weights.audit`) ranks matrices by cosine alone, so a badly
quantized expert that no token ever reaches ranks first, and a mildly worse expert that half the
tokens use ranks nowhere. Here each expert's use comes from a traced run: the reference store's
``topk_idx`` and ``topk_weight`` (its ``free`` mode), per layer and expert

- ``tokens``: how many tokens chose the expert (a token chooses an expert at most once);
- ``routing_mass``: the sum of their routing weights;
- ``mass_share``: ``routing_mass`` over the layer's total routing mass (sums to 1 over a layer's
  experts; NaN where the layer records no routing);

and the score of an expert matrix is

    impact = rel_error x mass_share

**Why this.** The MoE output of a token is ``sum_k w_k E_k(x)``. A matrix with relative error ``r``
changes its expert's output by about ``r |E_e(x)|`` (exactly so for the down projection when the
error is isotropic, to first order for gate and up), and that change enters the layer's output
scaled by the routing weight ``w_{t,e}``. Summed over the run's tokens, the error an expert matrix
puts into its layer is proportional to ``r`` times its routing mass; dividing by the layer's mass
makes layers comparable. So ``impact`` estimates the share of the layer's MoE output that the
matrix's quantization error displaces, on this run's tokens. It uses the relative error, not
1 - cosine, because output error grows linearly with ``r`` (1 - cosine grows as r^2 / 2, and misses
a pure scale error). An expert no token reaches scores 0, however bad its cosine. It assumes the
experts' outputs have comparable norms and that the reference's routing stands for the variant's
(a quantized router's flips are the routing diff's subject, ``moetrace routing``).

Only the expert matrices are weighted: attention, embedding and output matrices act on every
token (share 1), and the plain audit lists them.
"""

from __future__ import annotations

import math

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.tracer.render.table import Column, Table

LOAD_VARIABLES = ("tokens", "routing_mass", "mass_share")


def routing_load(ref_ds, n_experts: int):
    """Tokens and routing-weight mass per (layer, expert) of a reference trace.

    Args:
        ref_ds: a reference trace Dataset (``topk_idx`` and ``topk_weight``, (mode, layer, token, k)).
        n_experts: the model's routed experts.

    Returns:
        an xarray Dataset with ``tokens`` (int64), ``routing_mass`` and ``mass_share`` (float64),
        all (layer, expert). Layers whose ``topk_idx`` holds no expert (a dense layer) are NaN in
        ``mass_share`` and 0 in the others.
    """
    import xarray as xr

    for v in ("topk_idx", "topk_weight"):
        if v not in ref_ds:
            raise MoetraceError(f"the run's reference store has no {v!r}; trace it with the routing sites recorded "
                                f"(moetrace run without --sites, or --sites including topk_idx,topk_weight)")
    from moetrace.tracer.analysis.common import reference

    # The free mode, along ``layer`` (router sites lie along ``moe_layer``: its coordinate holds the layer indices).
    idx_da, w_da = reference(ref_ds, "topk_idx"), reference(ref_ds, "topk_weight")
    idx = np.asarray(idx_da.transpose("layer", "token", "k").values)  # (layer, token, k)
    w = np.asarray(w_da.transpose("layer", "token", "k").values, dtype=np.float64)  # (layer, token, k)
    n_layer = idx.shape[0]
    if idx.size and int(np.nanmax(np.where(idx >= 0, idx, -1))) >= n_experts:
        raise MoetraceError(f"the run routes to expert {int(idx.max())}, but the audited model has {n_experts} "
                            f"experts: the run is of another model")
    tokens = np.zeros((n_layer, n_experts), dtype=np.int64)
    mass = np.zeros((n_layer, n_experts), dtype=np.float64)
    valid = idx >= 0  # -1: no routing recorded (a dense layer, or not written)
    for L in range(n_layer):
        e = idx[L][valid[L]].astype(np.int64)  # (n,)
        tokens[L] = np.bincount(e, minlength=n_experts)
        mass[L] = np.bincount(e, weights=np.nan_to_num(w[L][valid[L]]), minlength=n_experts)
    total = mass.sum(axis=1, keepdims=True)  # (layer, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, mass / np.where(total > 0, total, 1.0), np.nan)
    layers = idx_da["layer"].values
    return xr.Dataset(
        {"tokens": (("layer", "expert"), tokens), "routing_mass": (("layer", "expert"), mass),
         "mass_share": (("layer", "expert"), share)},
        coords={"layer": layers, "expert": np.arange(n_experts)},
    )


def check_same_model(model_hash, model: str, ref_ds, run: str = "") -> None:
    """Refuse a run that traced another model than ``model`` (content hash ``model_hash``).

    Raises:
        MoetraceError: both hashes are known and differ.
    """
    r_hash = ref_ds.attrs.get("model_hash")
    if model_hash and r_hash and model_hash != r_hash:
        raise MoetraceError(
            f"run {run or '?'} traced model {ref_ds.attrs.get('model', '?')} (hash {str(r_hash)[:12]}), but the audit "
            f"is of {model} (hash {str(model_hash)[:12]}); give the same --model and --plant as the run"
        )


def weight_audit(audit_ds, ref_ds, run: str = ""):
    """The audit Dataset with the run's routing load and each expert matrix's ``impact``.

    Args:
        audit_ds: a weight audit (:func:`moetrace.tracer.weights.audit.audit`).
        ref_ds: the run's reference trace.
        run: the run folder, recorded in the attributes.

    Returns:
        ``audit_ds`` plus ``tokens``, ``routing_mass``, ``mass_share`` (layer, expert) and
        ``impact`` (layer, expert, proj) = ``rel_error`` x ``mass_share``; attributes ``run`` and
        ``run_tokens``.

    Raises:
        MoetraceError: the run is of another model (content hash or shape differ).
    """
    import xarray as xr

    check_same_model(audit_ds.attrs.get("model_hash"), audit_ds.attrs.get("model", "?"), ref_ds, run)
    load = routing_load(ref_ds, audit_ds.sizes["expert"])
    if not set(load["layer"].values.tolist()) <= set(audit_ds["layer"].values.tolist()):
        raise MoetraceError(f"run {run or '?'} routes at layers {list(load['layer'].values)}, the audited model has "
                            f"layers {list(audit_ds['layer'].values)}: the run is of another model")
    # Layers without a router (dense) route no tokens: 0 tokens and mass, no share.
    load = xr.Dataset({"tokens": load["tokens"].reindex(layer=audit_ds["layer"], fill_value=0),
                       "routing_mass": load["routing_mass"].reindex(layer=audit_ds["layer"], fill_value=0.0),
                       "mass_share": load["mass_share"].reindex(layer=audit_ds["layer"])})
    out = audit_ds.assign({k: load[k] for k in LOAD_VARIABLES})
    out["impact"] = out["rel_error"] * out["mass_share"]
    out.attrs.update(run=str(run), run_tokens=int(ref_ds.sizes["token"]))
    return out


def weighted_rows(ds) -> list[dict]:
    """Every expert matrix as a row, highest ``impact`` first (ties, and layers without routing, by cosine)."""
    from moetrace.tracer.weights.audit import METRICS, PROJS

    stems = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
    ex = {m: ds[m].values for m in (*METRICS, "impact")}
    tokens, mass, share = ds["tokens"].values, ds["routing_mass"].values, ds["mass_share"].values
    flagged, types = ds["flagged"].values, ds["type"].values
    out = []
    for li, L in enumerate(ds["layer"].values):
        for p, proj in enumerate(PROJS):
            for e in range(ds.sizes["expert"]):
                row = {"tensor": f"blk.{int(L)}.{stems[proj]}.weight", "layer": int(L), "expert": e, "proj": proj,
                       "type": str(types[li, p]), "tokens": int(tokens[li, e]), "routing_mass": float(mass[li, e]),
                       "mass_share": float(share[li, e]), "flagged": bool(flagged[li, e, p])}
                row.update({m: float(ex[m][li, e, p]) for m in (*METRICS, "impact")})
                out.append(row)

    def key(r):
        imp = r["impact"]
        return (math.isnan(imp), -imp if not math.isnan(imp) else 0.0, r["cosine"])

    out.sort(key=key)
    return out


WEIGHTED_COLUMNS = (
    Column("rank", "rank", "{:d}", json=False),
    Column("tensor", "tensor", str, align="left"),
    Column("layer", "layer", "{:d}", table=False),
    Column("expert", "expert", "{:d}"),
    Column("proj", "proj", str, table=False),
    Column("type", "type", str),
    Column("tokens", "tokens", "{:d}", "tokens of the run routed to the expert (reference's top-k)"),
    Column("routing_mass", "mass", "{:.3f}", "sum of those tokens' routing weights", table=False),
    Column("mass_share", "share", "{:.4f}", "the expert's share of its layer's routing mass"),
    Column("cosine", "cosine", "{:.5f}", "<a, b> / (|a| |b|) of the matrix: 1 for an exact copy"),
    Column("rel_error", "rel err", "{:.3e}", "relative L2 error |b - a| / |a| of the matrix"),
    Column("sqnr_db", "SQNR dB", "{:.2f}", "signal to quantization noise of the matrix, dB", table=False),
    Column("max_abs_error", "max err", "{:.3e}", "largest absolute error of the matrix", table=False),
    Column("impact", "impact", "{:.3e}",
           "rel err x share: the share of the layer's MoE output the matrix's error displaces on the run's tokens"),
    Column("flagged", "", lambda f: "FLAGGED" if f else "", "cosine below the threshold", align="left"),
)


def weighted_table(ds, top: int | None = None) -> Table:
    """The expert matrices by impact (:func:`weighted_rows`); only the first ``top`` when given."""
    rows = weighted_rows(ds)
    t = Table(list(WEIGHTED_COLUMNS))
    for i, r in enumerate(rows if top is None else rows[:top]):
        t.add({"rank": i + 1, **r})
    return t


def weighted_json(ds, path=None, top: int = 10) -> dict:
    """The weighted audit for scripts: the run, the top ``top`` rows by impact, and the flagged rows."""
    rows = weighted_table(ds).records()
    return {
        "model": ds.attrs["model"], "weights": ds.attrs["weights"], "overrides": ds.attrs.get("overrides", ""),
        "compute": ds.attrs["compute"], "threshold": ds.attrs["threshold"], "run": ds.attrs["run"],
        "run_tokens": ds.attrs["run_tokens"], "store": str(path) if path else None,
        "score": "impact = rel_error x mass_share", "n_expert_matrices": int(ds["cosine"].size),
        "top": rows[:top], "flagged": [r for r in rows if r["flagged"]],
    }


def format_weighted(ds, path=None, top: int = 10) -> str:
    """A human summary: the top ``top`` expert matrices by impact, and where the worst cosine ranks."""
    a = ds.attrs
    rows = weighted_rows(ds)
    t = weighted_table(ds, top)
    t.title = (f"Activation-weighted audit of {a['model']} under {a['weights']}{a.get('overrides', '')}, dequantized "
               f"to {a['compute']}, weighted by the routing of {a['run_tokens']} tokens of run {a['run']}: "
               f"impact = rel err x the expert's share of its layer's routing mass")
    lines = [t.to_text()]
    worst = min(range(len(rows)), key=lambda i: rows[i]["cosine"]) if rows else None
    if worst is not None and worst >= top:
        r = rows[worst]
        lines.append(f"The worst cosine, {r['tensor']} expert {r['expert']} ({r['cosine']:.5f}), ranks {worst + 1}: "
                     f"{r['tokens']} tokens routed to it, impact {r['impact']:.3e}.")
    if path is not None:
        lines.append(f"Full table in {path} (xarray.open_zarr; impact, tokens, mass_share beside the audit's metrics).")
    return "\n".join(lines)
