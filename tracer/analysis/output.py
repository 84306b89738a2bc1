"""Output metrics: how far a variant's next-token distributions are from the reference's.

Per token ``t`` with logits ``(vocab,)``, ``p = softmax(ref)`` and ``q = softmax(variant)``:

- ``kl``: KL(p || q) in nats, the information lost using the variant in place of the reference;
- ``top1_agree``: 1 where both put the most probability on the same token;
- ``p_next_ref``, ``p_next_var``: the probability each gives to the token that actually follows
  ``t`` in its sequence (found through the ``seq`` and ``pos`` coordinates; NaN for the last
  token of a sequence); ``dp_next = p_next_var - p_next_ref``; ``dnll_next`` the change of its
  negative log-likelihood (positive: the variant predicts the real text worse).

Token summaries carry percentile-bootstrap confidence intervals (:mod:`moetrace.tracer.analysis.stats`).
The log-softmax runs through :func:`xarray.apply_ufunc`, so Dask-backed logits stay lazy until the
per-token figures are taken.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from moetrace.tracer.analysis import stats as stats
from moetrace.tracer.analysis.common import (analysis_attrs, check_comparable, floor_fmt, floor_multiple, json_number,
                                             reference, require_sites, variant)
from moetrace.tracer.analysis.compare import log_softmax, top1_agree
from moetrace.tracer.render.table import Column, Table

CI_FIGURES = {"kl_mean": ("kl", "mean"), "top1_agreement": ("top1_agree", "mean"),
              "dp_next_mean": ("dp_next", "mean"), "dnll_next_mean": ("dnll_next", "mean")}


def next_token_index(ds: xr.Dataset) -> np.ndarray:
    """(token,) index of the token that follows each token in its sequence; -1 for a sequence's last."""
    seq = ds["seq"].values.astype(np.int64)
    pos = ds["pos"].values.astype(np.int64)
    key = seq * (int(pos.max()) + 2) + pos  # unique per (seq, pos)
    order = np.argsort(key, kind="stable")
    target = key + 1
    j = np.searchsorted(key[order], target)
    j = np.minimum(j, key.size - 1)
    found = key[order][j] == target
    return np.where(found, order[j], -1)


def _kl_np(rl: np.ndarray, vl: np.ndarray) -> np.ndarray:
    lp, lq = log_softmax(rl), log_softmax(vl)  # (..., vocab) float64
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _logp_at_np(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    lp = log_softmax(logits)  # (..., vocab)
    got = np.take_along_axis(lp, np.maximum(ids, 0)[..., None], axis=-1)[..., 0]
    return np.where(ids >= 0, got, np.nan)


def _apply(fn, *args, core):
    return xr.apply_ufunc(fn, *args, input_core_dims=core, dask="parallelized", output_dtypes=[np.float64],
                          dask_gufunc_kwargs={"allow_rechunk": True})


def output_tokens(ref: xr.Dataset, var: xr.Dataset, mode: str = "free") -> xr.Dataset:
    """Per-token output figures of ``var`` in ``mode`` against ``ref``.

    Returns:
        A computed Dataset of (token,) float64 arrays: ``kl``, ``top1_agree``, ``p_next_ref``,
        ``p_next_var``, ``dp_next``, ``dnll_next`` (NaN where a token has no next token).
    """
    check_comparable(ref, var)
    require_sites(ref, "reference", "logits")
    require_sites(var, "variant", "logits")
    rl = reference(ref, "logits")  # (token, vocab)
    vl = variant(var, "logits", mode)
    nxt = next_token_index(ref)
    next_id = xr.DataArray(np.where(nxt >= 0, ref["token_id"].values[np.maximum(nxt, 0)], -1), dims="token")
    out = xr.Dataset({
        "kl": _apply(_kl_np, rl, vl, core=[["vocab"], ["vocab"]]),
        "top1_agree": top1_agree(rl, vl),
        "lp_ref": _apply(_logp_at_np, rl, next_id, core=[["vocab"], []]),
        "lp_var": _apply(_logp_at_np, vl, next_id, core=[["vocab"], []]),
    }).compute()
    out["top1_agree"] = out["top1_agree"].astype(np.float64)
    out["p_next_ref"] = np.exp(out["lp_ref"])
    out["p_next_var"] = np.exp(out["lp_var"])
    out["dp_next"] = out["p_next_var"] - out["p_next_ref"]
    out["dnll_next"] = out["lp_ref"] - out["lp_var"]
    return out.drop_vars(["lp_ref", "lp_var"])


def output_metrics(ref: xr.Dataset, var: xr.Dataset, mode: str = "free", n_resamples: int = stats.N_RESAMPLES,
                   seed: int = 0, level: float = stats.LEVEL, score_positions: str | None = None) -> xr.Dataset:
    """Token summaries of :func:`output_tokens`, with bootstrap intervals on the headline figures.

    Returns:
        A Dataset of scalars: ``kl_mean``, ``kl_median``, ``kl_p99``, ``kl_max`` (nats),
        ``top1_agreement``, ``dp_next_mean``, ``abs_dp_next_mean``, ``dnll_next_mean``,
        ``p_next_ref_mean``, ``tokens``, ``tokens_with_next``; and for each of ``kl_mean``,
        ``top1_agreement``, ``dp_next_mean``, ``dnll_next_mean`` a ``NAME_ci`` of dim (bound,)
        = (lo, hi) at coverage ``level``, ``n_resamples`` resamples seeded by ``seed``. Only the
        tokens ``score_positions`` selects count (moetrace.tracer.analysis.positions; default all).
    """
    from moetrace.tracer.analysis import positions

    tok = output_tokens(ref, var, mode)
    tok = tok.isel(token=positions.mask(ref["pos"].values, score_positions))
    kl = tok["kl"].values
    out = xr.Dataset(attrs={**analysis_attrs(ref, var, mode=mode), "ci_level": level, "n_resamples": n_resamples,
                            "seed": seed, "score_positions": score_positions or "all"})
    out["kl_mean"] = kl.mean()
    out["kl_median"] = np.median(kl)
    out["kl_p99"] = np.quantile(kl, 0.99)
    out["kl_max"] = kl.max()
    out["top1_agreement"] = tok["top1_agree"].values.mean()
    dp = tok["dp_next"].values
    out["dp_next_mean"] = np.nanmean(dp) if np.isfinite(dp).any() else np.nan
    out["abs_dp_next_mean"] = np.nanmean(np.abs(dp)) if np.isfinite(dp).any() else np.nan
    out["dnll_next_mean"] = np.nanmean(tok["dnll_next"].values) if np.isfinite(dp).any() else np.nan
    out["p_next_ref_mean"] = np.nanmean(tok["p_next_ref"].values) if np.isfinite(dp).any() else np.nan
    out["tokens"] = kl.size
    out["tokens_with_next"] = int(np.isfinite(dp).sum())
    for name, (col, stat) in CI_FIGURES.items():
        lo, hi = stats.bootstrap_ci(tok[col].values, stat, n_resamples, seed, level)
        out[f"{name}_ci"] = ("bound", [lo, hi])
    return out.assign_coords(bound=["lo", "hi"])


# (variable, figure) rows of the output table; the variables with an interval are CI_FIGURES.
OUTPUT_ROWS = (
    ("kl_mean", "KL(ref || variant) mean, nats"), ("kl_median", "KL median"), ("kl_p99", "KL p99"),
    ("kl_max", "KL max"), ("top1_agreement", "top-1 agreement"), ("dp_next_mean", "next-token p change"),
    ("abs_dp_next_mean", "next-token |p change|"), ("p_next_ref_mean", "next-token p of the reference"),
    ("dnll_next_mean", "next-token NLL change, nats"),
)
OUTPUT_COLUMNS = (
    Column("name", "figure", str, table=False),
    Column("figure", "figure", str, align="left", json=False),
    Column("value", "value", "{:.4g}"),
    Column("lo", "low", "{:.4g}", "lower bound of the bootstrap interval over tokens"),
    Column("hi", "high", "{:.4g}", "upper bound of the bootstrap interval over tokens"),
    Column("x_floor", "x floor", floor_fmt(), "the figure as a multiple of the noise floor's (orig-bf16; exact: both "
           "0; floor 0: the floor's is 0, this one not)"),
)


def output_table(om: xr.Dataset, floor: xr.Dataset | None = None) -> Table:
    """One row per figure of :func:`output_metrics`, with its interval; with ``floor`` (orig-bf16's
    output metrics) the error-like KL figures as multiples of it."""
    pct = int(round(100 * om.attrs["ci_level"]))
    t = Table(list(OUTPUT_COLUMNS), title=f"{om.attrs['variant']} vs {om.attrs['reference']} output "
                                          f"({om.attrs['mode']} mode), {int(om['tokens'])} tokens "
                                          f"({int(om['tokens_with_next'])} with a next token), "
                                          f"{pct}% bootstrap intervals:")
    for name, figure in OUTPUT_ROWS:
        lo, hi = om[f"{name}_ci"].values if f"{name}_ci" in om else (None, None)
        x = floor_multiple(om[name], floor[name]) if floor is not None and name.startswith("kl_") else None
        t.add({"name": name, "figure": figure, "value": float(om[name]), "lo": lo, "hi": hi, "x_floor": x})
    if floor is None:
        t.columns = [c for c in t.columns if c.key != "x_floor"]
    return t


def format_output(om: xr.Dataset, floor: xr.Dataset | None = None) -> str:
    """The output table of :func:`output_metrics` (see :func:`output_table`)."""
    return output_table(om, floor).to_text()


def output_to_dict(om: xr.Dataset) -> dict:
    """A JSON-ready dict of :func:`output_metrics`."""
    out = dict(om.attrs)
    for v in om.data_vars:
        vals = om[v].values
        out[v] = [json_number(x) for x in vals] if vals.ndim else json_number(vals)
    return out
