"""Comparison metrics: pure functions from two traces (xarray in, xarray out).

All per-token metrics are computed along the feature dimension and then aggregated over
tokens; the reference is always its ``free`` mode (the only one it has). The metric names and
definitions are :data:`moetrace.tracer.analysis.common.ERROR_METRICS`, shared with the weight audit.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from moetrace.tracer.analysis.common import (analysis_attrs, check_comparable, json_number, nonfinite_attrs,
                                             nonfinite_lines, reference, require_mode, variant)
from moetrace.tracer.render.table import Column, Table, layer_table


def hidden_error(ref: xr.DataArray, var: xr.DataArray, dim: str = "hidden") -> xr.Dataset:
    """The four :data:`~moetrace.tracer.analysis.common.ERROR_METRICS` of ``var`` against ``ref`` along ``dim``.

    Args:
        ref: e.g. (layer, token, hidden) reference values.
        var: the variant's values, the same dims.
        dim: the feature dimension the norms run over.

    Returns:
        A Dataset of float64 ``cosine``, ``rel_error``, ``sqnr_db``, ``max_abs_error`` over the
        remaining dims, e.g. (layer, token). Lazy if the inputs are.
    """
    r = ref.astype("float64")
    v = var.astype("float64")
    diff = v - r
    # skipna=False: a NaN (an overflowed stream) must make the token's figures NaN, not vanish from a sum.
    nr = np.sqrt((r * r).sum(dim, skipna=False))
    nv = np.sqrt((v * v).sum(dim, skipna=False))
    nd = np.sqrt((diff * diff).sum(dim, skipna=False))
    rel = nd / nr
    cos = (r * v).sum(dim, skipna=False) / (nr * nv)
    sqnr = 20 * np.log10(nr / nd)
    return xr.Dataset({"cosine": cos, "rel_error": rel, "sqnr_db": sqnr,
                       "max_abs_error": abs(diff).max(dim, skipna=False)})


def aggregate(da: xr.DataArray, dim: str = "token") -> xr.Dataset:
    """Mean, median, p90, p99 and max over ``dim``."""
    return xr.Dataset({
        "mean": da.mean(dim, skipna=False), "median": da.median(dim, skipna=False),
        "p90": da.quantile(0.9, dim, skipna=False).drop_vars("quantile"),
        "p99": da.quantile(0.99, dim, skipna=False).drop_vars("quantile"), "max": da.max(dim, skipna=False),
    })


def topk_overlap(ref_idx: xr.DataArray, var_idx: xr.DataArray) -> xr.DataArray:
    """Fraction of the reference's top-k experts that the variant also chose, per token."""
    r = ref_idx.values[..., :, None]  # (..., k, 1)
    v = var_idx.values[..., None, :]  # (..., 1, k)
    hit = (r == v).any(-1).mean(-1)  # (...)
    return xr.DataArray(hit, dims=ref_idx.dims[:-1], coords={d: ref_idx.coords[d] for d in ref_idx.dims[:-1]
                                                              if d in ref_idx.coords})


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl_per_token(ref_logits: xr.DataArray, var_logits: xr.DataArray) -> xr.DataArray:
    """KL(ref || variant) per token, in nats, over the vocabulary."""
    lp = log_softmax(ref_logits.values)
    lq = log_softmax(var_logits.values)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    dims = var_logits.dims[:-1]
    return xr.DataArray(kl, dims=dims, coords={d: var_logits.coords[d] for d in dims if d in var_logits.coords})


def top1_agree_np(rl: np.ndarray, vl: np.ndarray) -> np.ndarray:
    """(...,) True where both (..., vocab) logits are finite and have the same argmax; a token whose
    logits hold an Inf or NaN (an overflow) disagrees."""
    finite = np.isfinite(rl).all(-1) & np.isfinite(vl).all(-1)
    return finite & (rl.argmax(-1) == vl.argmax(-1))


def top1_agree(ref_logits: xr.DataArray, var_logits: xr.DataArray) -> xr.DataArray:
    """Per token, whether the reference and the variant put the most probability on the same token (see
    :func:`top1_agree_np`)."""
    return xr.apply_ufunc(top1_agree_np, ref_logits, var_logits, input_core_dims=[["vocab"], ["vocab"]],
                          dask="parallelized", output_dtypes=[bool])


def diff(ref: xr.Dataset, var: xr.Dataset, mode: str = "free", score_positions: str | None = None) -> xr.Dataset:
    """The core divergence summary of ``var`` (in ``mode``) against ``ref``.

    Returns:
        A Dataset with, per layer: ``resid_rel_l2_mean``, ``resid_rel_l2_p99``, ``resid_cosine_mean``,
        ``resid_cosine_p99`` (the 1st percentile, the worst tokens), ``topk_overlap``,
        ``top1_flip``; and scalars ``kl_mean`` (nats) and ``top1_agreement`` of the logits, on
        the tokens ``score_positions`` selects (see moetrace.tracer.analysis.positions; default all).
    """
    from moetrace.tracer.analysis import positions

    check_comparable(ref, var)
    require_mode(var, mode)
    out = xr.Dataset(attrs={**analysis_attrs(ref, var, mode=mode), **nonfinite_attrs(ref, var, mode)})
    if "resid" in var and "resid" in ref:
        err = hidden_error(reference(ref, "resid"), variant(var, "resid", mode)).compute()
        # skipna=False: a layer where a token overflowed (Inf/NaN) reads NaN, not a mean of the finite rest.
        out["resid_rel_l2_mean"] = err.rel_error.mean("token", skipna=False)
        out["resid_rel_l2_p99"] = err.rel_error.quantile(0.99, "token", skipna=False).drop_vars("quantile")
        out["resid_cosine_mean"] = err.cosine.mean("token", skipna=False)
        out["resid_cosine_p1"] = err.cosine.quantile(0.01, "token", skipna=False).drop_vars("quantile")
    if "topk_idx" in var and "topk_idx" in ref:
        ri, vi = reference(ref, "topk_idx").load(), variant(var, "topk_idx", mode).load()
        out["topk_overlap"] = topk_overlap(ri, vi).mean("token")
        out["top1_flip"] = (ri.isel(k=0) != vi.isel(k=0)).mean("token")
    if "logits" in var and "logits" in ref:
        keep = positions.mask(ref["pos"].values, score_positions)  # (token,)
        rl = reference(ref, "logits").isel(token=keep).load()
        vl = variant(var, "logits", mode).isel(token=keep).load()
        out.attrs["score_positions"] = score_positions or "all"
        out["scored_tokens"] = int(keep.sum())
        out["kl_mean"] = kl_per_token(rl, vl).mean("token", skipna=False)
        out["top1_agreement"] = top1_agree(rl, vl).mean("token")
    return out


# The per-layer columns of a diff, in table order; their keys are the Dataset's variables and the JSON keys.
DIFF_COLUMNS = (
    Column("layer", "layer", "{:d}"),
    Column("resid_rel_l2_mean", "relL2 mean", "{:.2e}", "relative L2 error of the layer's output, token mean"),
    Column("resid_rel_l2_p99", "relL2 p99", "{:.2e}", "relative L2 error, 99th percentile over tokens"),
    Column("resid_cosine_mean", "cos mean", "{:.5f}", "cosine similarity of the layer's output, token mean"),
    Column("resid_cosine_p1", "cos p1", "{:.5f}", "cosine similarity, 1st percentile over tokens (the worst)"),
    Column("topk_overlap", "top-k overlap", "{:.3f}", "share of the reference's experts also chosen"),
    Column("top1_flip", "top-1 flip", "{:.3f}", "share of tokens whose first expert changed"),
)


def diff_table(d: xr.Dataset) -> Table:
    """The per-layer table of :func:`diff`."""
    head = f"{d.attrs['variant']} vs {d.attrs['reference']} ({d.attrs['mode']} mode) on {d.attrs['model']}"
    return layer_table(d, DIFF_COLUMNS, head)


def format_diff(d: xr.Dataset) -> str:
    """A human table of :func:`diff`, its output figures and where a stream first became non-finite."""
    head = f"{d.attrs['variant']} vs {d.attrs['reference']} ({d.attrs['mode']} mode) on {d.attrs['model']}"
    # A run that recorded no layer sites (--sites logits) has only the output figures.
    table = [diff_table(d).to_text()] if "layer" in d.dims else [head, "(no layer sites recorded)"]
    lines = [*table, *nonfinite_lines(d.attrs)]
    if "kl_mean" in d:
        lines.append(f"output: KL(ref || variant) mean {float(d['kl_mean']):.3e} nats, "
                     f"top-1 agreement {100 * float(d['top1_agreement']):.1f}% "
                     f"({int(d['scored_tokens'])} tokens scored, positions {d.attrs['score_positions']})")
    return "\n".join(lines)


def diff_to_dict(d: xr.Dataset) -> dict:
    """A JSON-ready dict: attrs, ``layers`` (one dict per layer) and the scalar output metrics."""
    scalars = {v: json_number(d[v].values) for v in d.data_vars if d[v].ndim == 0}
    layers = diff_table(d).records() if "layer" in d.dims else []
    return {**d.attrs, "layers": layers, "output": scalars}
