"""Routing diff: which router decisions a variant changed, where, and why.

Per layer and token, against the reference (its ``free`` mode):

- ``topk_overlap``: the fraction of the reference's k experts the variant also chose;
- ``top1_flip``: the variant's highest-weighted expert differs from the reference's;
- ``any_flip``: the chosen *set* differs (overlap < 1), the flip that changes which experts run;
- ``mass_moved``: total variation ``0.5 * sum_e |p_e - q_e|`` between the reference's and the
  variant's full routing distributions (softmax of the router logits over all experts): the
  share of routing probability that moved, seen even when the chosen set stays the same;
- ``margin``: the reference's logit gap between its k-th and (k+1)-th expert. A set flip needs
  the error to close this gap, so flips concentrate where it is small; :func:`routing_diff`
  bins the any-flip rate by it.

Per layer and expert, the load (tokens routed to the expert) of both and its change; per token,
the first layer whose chosen set flipped (-1: none) and in how many layers it flipped.

Upstream drift or the layer itself: in ``teacher`` mode layer L sees the reference's exact input,
so a set flip there is the layer's own doing (its router, attention and precision). A ``free``
mode flip that also happens in teacher mode is counted as **own**; one that does not is
**upstream** (the drifted input moved the router). Flips in teacher mode alone (the drift
happened to cancel them) are not counted in either.

All per-token work is numpy applied per layer chunk through :func:`xarray.apply_ufunc`, so a
Dask-backed trace is read one layer at a time.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from moetrace.errors import MoetraceError
from moetrace.tracer.analysis.common import (analysis_attrs, check_comparable, floor_fmt, floor_multiples, reference,
                                             require_mode, nonfinite_attrs, nonfinite_lines, require_moe_layers,
                                             require_sites, variant)
from moetrace.tracer.render.table import Column, Table, layer_table

# Edges of the k/(k+1) logit-margin bins (router logit units); the last bin is open.
MARGIN_EDGES = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, np.inf)


def _overlap_np(ri: np.ndarray, vi: np.ndarray) -> np.ndarray:
    hit = (ri[..., :, None] == vi[..., None, :]).any(-1)  # (..., k)
    return hit.mean(-1)  # (...)


def _tv_np(rl: np.ndarray, vl: np.ndarray) -> np.ndarray:
    def softmax(x):
        x = x.astype(np.float64)
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    return 0.5 * np.abs(softmax(rl) - softmax(vl)).sum(-1)  # (...)


def _margin_np(rl: np.ndarray, k: int) -> np.ndarray:
    if rl.shape[-1] <= k:  # every expert is chosen: no (k+1)-th
        return np.full(rl.shape[:-1], np.nan)
    top = -np.partition(-rl.astype(np.float64), (k - 1, k), axis=-1)  # k-th and (k+1)-th in place
    return top[..., k - 1] - top[..., k]


def _load_np(idx: np.ndarray, n_expert: int) -> np.ndarray:
    if idx.dtype.kind == "f":  # ids that went through a NaN-filling join; NaN = not chosen
        idx = np.where(np.isnan(idx), -1, idx)
    idx = idx.astype(np.int64)
    lead = idx.shape[:-2]
    flat = idx.reshape(-1, idx.shape[-2] * idx.shape[-1])  # (lead, token * k)
    counts = np.stack([np.bincount(row[row >= 0], minlength=n_expert) for row in flat]) if flat.shape[0] else \
        np.zeros((0, n_expert), dtype=np.int64)
    return counts.reshape(*lead, n_expert)  # (..., expert)


def _ufunc(fn, *args, core, out_core=(), out_sizes=None, dtype=np.float64, **kwargs):
    return xr.apply_ufunc(
        fn, *args, input_core_dims=[core] * len(args), output_core_dims=[list(out_core)], kwargs=kwargs,
        dask="parallelized", output_dtypes=[dtype],
        dask_gufunc_kwargs={"output_sizes": out_sizes or {}, "allow_rechunk": True},
    )


def _check(ref: xr.Dataset, var: xr.Dataset, mode: str) -> None:
    check_comparable(ref, var)
    require_mode(var, mode)
    require_moe_layers(ref, "compare")
    require_sites(ref, "reference", "topk_idx", "router_logits")
    require_sites(var, "variant", "topk_idx", "router_logits")


def routing_tokens(ref: xr.Dataset, var: xr.Dataset, mode: str = "free") -> xr.Dataset:
    """Per-(layer, token) routing differences of ``var`` in ``mode`` against ``ref``.

    Returns:
        A Dataset of (layer, token) arrays: ``topk_overlap``, ``top1_flip`` and ``any_flip``
        (bool), ``mass_moved`` and ``margin`` (the reference's k/(k+1) logit gap). Lazy if the
        traces are.
    """
    _check(ref, var, mode)
    ri, rl = reference(ref, "topk_idx"), reference(ref, "router_logits")  # (layer, token, k), (layer, token, expert)
    vi, vl = variant(var, "topk_idx", mode), variant(var, "router_logits", mode)
    overlap = _ufunc(_overlap_np, ri, vi, core=["k"])
    return xr.Dataset({
        "topk_overlap": overlap,
        "top1_flip": ri.isel(k=0, drop=True) != vi.isel(k=0, drop=True),
        "any_flip": overlap < 1,
        "mass_moved": _ufunc(_tv_np, rl, vl, core=["expert"]),
        "margin": _ufunc(_margin_np, rl, core=["expert"], k=int(ri.sizes["k"])),
    })


def expert_load(idx: xr.DataArray, n_expert: int) -> xr.DataArray:
    """Tokens routed to each expert: (layer, token, k) expert ids -> (layer, expert) counts."""
    load = _ufunc(_load_np, idx, core=["token", "k"], out_core=["expert"], out_sizes={"expert": n_expert},
                  dtype=np.int64, n_expert=n_expert)
    return load.assign_coords(expert=np.arange(n_expert))


def routing_diff(ref: xr.Dataset, var: xr.Dataset, mode: str = "free", margin_edges=MARGIN_EDGES) -> xr.Dataset:
    """The routing diff of ``var`` (in ``mode``) against ``ref``; see the module docstring.

    Args:
        ref: the reference's trace.
        var: a variant's trace.
        mode: the variant's mode to compare (``routing`` mode has no flips by construction).
        margin_edges: increasing bin edges of the k/(k+1) margin.

    Returns:
        A computed Dataset with
        (layer,): ``topk_overlap``, ``top1_flip``, ``any_flip``, ``mass_moved`` (token means)
        and, for ``mode="free"`` when ``var`` also has a teacher mode, ``teacher_any_flip``,
        ``flip_own`` and ``flip_upstream`` (rates over tokens of the set flips, by cause);
        (layer, expert): ``load_ref``, ``load_var``, ``load_change`` (tokens);
        (token,): ``first_flip_layer`` (-1 where none) and ``layers_flipped``;
        (margin_bin,): ``margin_lo``, ``margin_hi``, ``bin_count`` (layer-token pairs),
        ``bin_flips`` and ``bin_flip_rate`` (any-flip rate, NaN for an empty bin).
    """
    tok = routing_tokens(ref, var, mode).compute()
    n_expert = int(reference(ref, "router_logits").sizes["expert"])
    out = xr.Dataset(attrs={**analysis_attrs(ref, var, mode=mode), **nonfinite_attrs(ref, var, mode)})
    for name in ("topk_overlap", "top1_flip", "any_flip", "mass_moved"):
        out[name] = tok[name].astype("float64").mean("token")
    if mode == "free" and "teacher" in var["mode"].values:
        free = tok["any_flip"]
        teach = routing_tokens(ref, var, "teacher")["any_flip"].compute()
        out["teacher_any_flip"] = teach.astype("float64").mean("token")
        out["flip_own"] = (free & teach).astype("float64").mean("token")
        out["flip_upstream"] = (free & ~teach).astype("float64").mean("token")
    out["load_ref"] = expert_load(reference(ref, "topk_idx"), n_expert).compute()
    out["load_var"] = expert_load(variant(var, "topk_idx", mode), n_expert).compute()
    out["load_change"] = out["load_var"] - out["load_ref"]
    flips = tok["any_flip"].transpose("layer", "token").values  # (layer, token)
    layers = tok["layer"].values
    has = flips.any(0)
    out["first_flip_layer"] = ("token", np.where(has, layers[flips.argmax(0)], -1))
    out["layers_flipped"] = ("token", flips.sum(0))
    edges = np.asarray(margin_edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or (np.diff(edges) <= 0).any():
        raise MoetraceError(f"margin bin edges {list(margin_edges)} must be at least two increasing numbers")
    m = tok["margin"].transpose("layer", "token").values.ravel()  # (layer * token,)
    f = flips.ravel()
    which = np.digitize(m, edges[1:-1])  # bin index; NaN margins fall into the last bin and are masked below
    ok = ~np.isnan(m)
    count = np.bincount(which[ok], minlength=edges.size - 1)
    hits = np.bincount(which[ok], weights=f[ok].astype(np.float64), minlength=edges.size - 1)
    out["margin_lo"] = ("margin_bin", edges[:-1])
    out["margin_hi"] = ("margin_bin", edges[1:])
    out["bin_count"] = ("margin_bin", count)
    out["bin_flips"] = ("margin_bin", hits.astype(np.int64))
    with np.errstate(invalid="ignore", divide="ignore"):
        out["bin_flip_rate"] = ("margin_bin", np.where(count > 0, hits / np.maximum(count, 1), np.nan))
    return out


def load_movers(rd: xr.Dataset, n: int = 5) -> dict:
    """The ``n`` (layer, expert) pairs that gained and that lost the most tokens."""
    ch = rd["load_change"].transpose("layer", "expert").values  # (layer, expert)
    flat = ch.ravel()
    order = np.argsort(flat, kind="stable")
    layers, experts = rd["layer"].values, rd["expert"].values

    def row(i):
        li, ei = np.unravel_index(i, ch.shape)
        return {"layer": int(layers[li]), "expert": int(experts[ei]), "change": int(flat[i]),
                "ref_tokens": int(rd["load_ref"].values[li, ei])}

    return {"gained": [row(i) for i in order[::-1][:n] if flat[i] > 0],
            "lost": [row(i) for i in order[:n] if flat[i] < 0]}


# The per-layer columns of a routing diff; keys are its variables and the JSON keys.
COLUMNS = (
    Column("layer", "layer", "{:d}"),
    Column("topk_overlap", "top-k overlap", "{:.3f}", "share of the reference's k experts the variant also chose"),
    Column("top1_flip", "top-1 flip", "{:.3f}", "share of tokens whose highest-weighted expert changed"),
    Column("any_flip", "any flip", "{:.3f}", "share of tokens whose chosen set changed"),
    Column("mass_moved", "mass moved", "{:.2e}", "total variation between the routing distributions"),
    Column("teacher_any_flip", "teacher flips", "{:.3f}", "set-flip rate in teacher mode (exact input)"),
    Column("flip_own", "own flips", "{:.3f}", "set flips that happen in teacher mode too: the layer's own"),
    Column("flip_upstream", "upstream", "{:.3f}", "set flips only in free mode: from upstream drift"),
    Column("any_flip_x_floor", "flip xfloor", floor_fmt(), "set-flip rate as a multiple of the noise floor's "
           "(exact: both 0; floor 0: the floor's is 0, this one not)"),
    Column("mass_moved_x_floor", "moved xfloor", floor_fmt(), "mass moved as a multiple of the noise floor's "
           "(exact: both 0; floor 0: the floor's is 0, this one not)"),
)
MARGIN_COLUMNS = (
    Column("margin", "margin", str, "the reference's k/(k+1) router logit gap", json=False, align="left"),
    Column("lo", "from", "{:g}", table=False),
    Column("hi", "to", "{:g}", table=False),
    Column("count", "layer-tokens", "{:d}", "layer-token pairs in the bin"),
    Column("flips", "flipped", "{:d}", "of them with a changed expert set"),
    Column("rate", "rate", "{:.1%}", "set-flip rate"),
)
MOVER_COLUMNS = (
    Column("kind", "", str, json=False, align="left"),
    Column("layer", "layer", "{:d}"),
    Column("expert", "expert", "{:d}"),
    Column("change", "tokens", "{:+d}", "tokens routed: variant - reference"),
    Column("ref_tokens", "reference tokens", "{:d}", "tokens the reference routed to the expert"),
)


def routing_table(rd: xr.Dataset, floor: xr.Dataset | None = None) -> Table:
    """The per-layer table of :func:`routing_diff`; with ``floor`` (orig-bf16's routing diff against the
    same reference) also the set-flip rate and the mass moved as multiples of it."""
    head = f"{rd.attrs['variant']} vs {rd.attrs['reference']} routing ({rd.attrs['mode']} mode) on {rd.attrs['model']}"
    return layer_table(rd, COLUMNS, head, floor_multiples(rd, floor, "any_flip", "mass_moved"))


def margin_table(rd: xr.Dataset) -> Table:
    """The set-flip rate per bin of the reference's k/(k+1) logit margin (the last bin is open)."""
    t = Table(list(MARGIN_COLUMNS), title="set-flip rate by the reference's k/(k+1) logit margin:")
    for lo, hi, c, h, r in zip(rd.margin_lo.values, rd.margin_hi.values, rd.bin_count.values, rd.bin_flips.values,
                               rd.bin_flip_rate.values):
        t.add({"margin": f"[{lo:g}, {hi:g})", "lo": lo, "hi": hi, "count": c, "flips": h, "rate": r})
    return t


def movers_table(rd: xr.Dataset, n: int = 5) -> Table:
    """The experts that gained and lost the most tokens (:func:`load_movers`)."""
    movers = load_movers(rd, n)
    t = Table(list(MOVER_COLUMNS), title="experts that gained and lost the most tokens:")
    for kind in ("gained", "lost"):
        for row in movers[kind]:
            t.add({"kind": kind, **row})
    return t


def mover_lines(rd: xr.Dataset) -> list[str]:
    """Two sentences: the experts that gained and that lost the most tokens (:func:`movers_table` in short)."""
    movers = load_movers(rd)
    fmt = lambda rows: ", ".join(f"L{r['layer']} e{r['expert']} {r['change']:+d}" for r in rows) or "none"  # noqa: E731
    return [f"expert load (tokens), gained most: {fmt(movers['gained'])}",
            f"expert load (tokens), lost most:   {fmt(movers['lost'])}"]


def flip_lines(rd: xr.Dataset) -> list[str]:
    """Sentences: the first flipped layer per token, layers flipped per token, flips from upstream."""
    first = rd["first_flip_layer"].values
    hist = ", ".join(f"layer {int(L)}: {int((first == L).sum())}" for L in rd["layer"].values if (first == L).any())
    n = rd["layers_flipped"].values
    lines = [f"first flipped layer per token: {hist or 'none'}; never: {int((first < 0).sum())} of {first.size}",
             f"layers flipped per token: mean {n.mean():.2f}, max {int(n.max()) if n.size else 0} "
             f"of {rd.sizes['layer']}"]
    if "flip_upstream" in rd:
        own, up = float(rd["flip_own"].sum()), float(rd["flip_upstream"].sum())
        share = f"{100 * up / (own + up):.0f}%" if own + up > 0 else "-"
        lines.append(f"free-mode set flips from upstream drift: {share} (the rest flip in teacher mode too)")
    return lines


def format_routing(rd: xr.Dataset, floor: xr.Dataset | None = None) -> str:
    """A human table of :func:`routing_diff` (see :func:`routing_table`), the flip rate by margin, and
    sentences on expert load and flips per token."""
    return "\n".join([routing_table(rd, floor).to_text(), margin_table(rd).to_text(), *mover_lines(rd),
                      *flip_lines(rd), *nonfinite_lines(rd.attrs)])


def routing_to_dict(rd: xr.Dataset, floor: xr.Dataset | None = None) -> dict:
    """A JSON-ready dict of :func:`routing_diff`."""
    layers = routing_table(rd, floor).records()
    for row, change in zip(layers, rd["load_change"].transpose("layer", "expert").values):
        row["load_change"] = [int(x) for x in change]
    first = rd["first_flip_layer"].values
    return {
        **rd.attrs, "layers": layers, "margin_bins": margin_table(rd).records(), "load_movers": load_movers(rd),
        "first_flip_layer": [int(x) for x in first], "layers_flipped": [int(x) for x in rd["layers_flipped"].values],
        "tokens_never_flipped": int((first < 0).sum()),
    }
