"""Comparison metrics: pure functions from two traces (xarray in, xarray out).

All per-token metrics are computed along the feature dimension and then aggregated over
tokens; the reference is always its ``free`` mode (the only one it has).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from moetrace.errors import MoetraceError


def check_comparable(ref: xr.Dataset, var: xr.Dataset) -> None:
    """Refuse to compare traces of different models or tokens."""
    if ref.attrs.get("model_hash") != var.attrs.get("model_hash"):
        raise MoetraceError(
            f"the traces are of different models: {ref.attrs.get('model')} ({ref.attrs.get('model_hash')}) "
            f"vs {var.attrs.get('model')} ({var.attrs.get('model_hash')})"
        )
    if ref.sizes.get("token") != var.sizes.get("token") or not np.array_equal(
        ref["token_id"].values, var["token_id"].values
    ):
        raise MoetraceError("the traces are of different tokens; compare stores of the same run or the same prompts")


def _ref(ref: xr.Dataset, name: str) -> xr.DataArray:
    da = ref[name]
    return da.sel(mode="free", drop=True) if "mode" in da.dims else da


def hidden_error(ref: xr.DataArray, var: xr.DataArray, dim: str = "hidden") -> xr.Dataset:
    """Per-token relative L2 error, cosine similarity, SQNR (dB) and max abs error along ``dim``."""
    r = ref.astype("float64")
    v = var.astype("float64")
    diff = v - r
    nr = np.sqrt((r * r).sum(dim))
    nv = np.sqrt((v * v).sum(dim))
    nd = np.sqrt((diff * diff).sum(dim))
    rel = nd / nr
    cos = (r * v).sum(dim) / (nr * nv)
    sqnr = 20 * np.log10(nr / nd)
    return xr.Dataset({"rel_l2": rel, "cosine": cos, "sqnr_db": sqnr, "max_abs": abs(diff).max(dim)})


def aggregate(da: xr.DataArray, dim: str = "token") -> xr.Dataset:
    """Mean, median, p90, p99 and max over ``dim``."""
    return xr.Dataset({
        "mean": da.mean(dim), "median": da.median(dim), "p90": da.quantile(0.9, dim).drop_vars("quantile"),
        "p99": da.quantile(0.99, dim).drop_vars("quantile"), "max": da.max(dim),
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


def diff(ref: xr.Dataset, var: xr.Dataset, mode: str = "free") -> xr.Dataset:
    """The core divergence summary of ``var`` (in ``mode``) against ``ref``.

    Returns:
        A Dataset with, per layer: ``resid_rel_l2_mean``, ``resid_rel_l2_p99``, ``resid_cosine_mean``,
        ``resid_cosine_p99`` (the 1st percentile, the worst tokens), ``topk_overlap``,
        ``top1_flip``; and scalars ``kl_mean`` (nats) and ``top1_agreement`` of the logits.
    """
    check_comparable(ref, var)
    if mode not in var["mode"].values:
        raise MoetraceError(f"{var.attrs.get('variant')} has no {mode!r} mode; it has {list(var['mode'].values)}")
    v = var.sel(mode=mode, drop=True)
    out = xr.Dataset(attrs={"reference": ref.attrs.get("variant"), "variant": var.attrs.get("variant"),
                            "mode": mode, "model": var.attrs.get("model")})
    if "resid" in v and "resid" in ref:
        err = hidden_error(_ref(ref, "resid"), v["resid"]).compute()
        out["resid_rel_l2_mean"] = err.rel_l2.mean("token")
        out["resid_rel_l2_p99"] = err.rel_l2.quantile(0.99, "token").drop_vars("quantile")
        out["resid_cosine_mean"] = err.cosine.mean("token")
        out["resid_cosine_p1"] = err.cosine.quantile(0.01, "token").drop_vars("quantile")
    if "topk_idx" in v and "topk_idx" in ref:
        ri, vi = _ref(ref, "topk_idx").load(), v["topk_idx"].load()
        out["topk_overlap"] = topk_overlap(ri, vi).mean("token")
        out["top1_flip"] = (ri.isel(k=0) != vi.isel(k=0)).mean("token")
    if "logits" in v and "logits" in ref:
        rl, vl = _ref(ref, "logits").load(), v["logits"].load()
        out["kl_mean"] = kl_per_token(rl, vl).mean("token")
        out["top1_agreement"] = (rl.argmax("vocab") == vl.argmax("vocab")).mean("token")
    return out


def diff_to_dict(d: xr.Dataset) -> dict:
    """A JSON-ready dict: attrs, ``layers`` (one dict per layer) and the scalar output metrics."""
    per_layer = [v for v in d.data_vars if "layer" in d[v].dims]
    layers = []
    for i, L in enumerate(d["layer"].values):
        row = {"layer": int(L)}
        for v in per_layer:
            row[v] = float(d[v].values[i])
        layers.append(row)
    scalars = {v: float(d[v].values) for v in d.data_vars if d[v].ndim == 0}
    return {**d.attrs, "layers": layers, "output": scalars}
