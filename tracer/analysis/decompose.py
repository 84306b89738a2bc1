"""Where the error grows: each layer's error split into what it injects and what it passes on.

Let ``r_L`` be the reference's output of layer L (``resid``, free mode), ``f_L`` the variant's
output in ``free`` mode (the variant running on its own outputs) and ``t_L`` its output in
``teacher`` mode (the variant's layer L fed the reference's input ``r_{L-1}``). Per token, with
``|.|`` the L2 norm over ``hidden``, the variant's error splits exactly as a vector identity::

    f_L - r_L  =  (t_L - r_L)  +  (f_L - t_L)
      free        local           inherited

- **local** ``|t_L - r_L| / |r_L|``: the error layer L makes on the exact input, i.e. what it
  injects by itself (its weights and arithmetic);
- **propagated** ``|f_L - r_L| / |r_L|``: the error a user sees after layer L (the divergence
  curve of ``moetrace diff``);
- **inherited** ``|f_L - t_L| / |r_L|``: the same variant layer run on its own drifted input
  instead of the exact one, i.e. the error that arrived from upstream as layer L passes it on.

Each is averaged over tokens (relative L2 error, as in :func:`moetrace.tracer.analysis.compare.diff`).
The **gain** of layer L is the ratio of the relative error it passes on to the relative error it
received::

    gain_L = inherited_L / propagated_{L-1}

Why this definition: it is the factor by which the divergence curve would change across layer L
if the layer injected nothing (``local = 0`` means ``t_L = r_L``, so ``f_L - r_L = f_L - t_L`` and
``propagated_L = inherited_L = gain_L * propagated_{L-1}``), so gain > 1 means the layer
amplifies incoming error and gain < 1 that it damps it. It is taken on the same relative scale as
the curve, so the growth of the residual stream's norm (which by itself shrinks relative error)
counts as damping; and it is a ratio of token means, not a mean of per-token ratios, so tokens
that arrive almost error-free cannot blow it up. By the triangle inequality, per token and hence
on the means, ``|inherited_L - local_L| <= propagated_L <= local_L + gain_L * propagated_{L-1}``:
the growth of the curve across layer L is bounded by ``local_L`` (injected) plus
``(gain_L - 1) * propagated_{L-1}``. The **amplified** figure is that second term clipped at 0,
``max(0, inherited_L - propagated_{L-1})``: what the layer adds to the curve by amplifying the
error it received, and 0 where it damps it (gain <= 1), so it is never negative (a damping layer
amplifies nothing; its gain says by how much it damps). :func:`growth_summary` calls a layer's
growth *injected* when the first term is the larger one and *amplified* otherwise. The input
error of layer 0 (the embeddings') is not recorded, so its gain is NaN; its inherited part is
the embeddings' error as layer 0 passes it on.

With a ``routing`` mode, ``routing_forced`` is the propagated error when the variant keeps the
reference's expert choices; ``propagated - routing_forced`` is then roughly what the flipped
expert choices cost.

Everything here is xarray operations per layer, so it runs lazily on Dask-backed traces.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from moetrace.errors import MoetraceError
from moetrace.tracer.analysis.common import (analysis_attrs, check_comparable, floor_fmt, floor_multiples, json_number,
                                             reference,
                                             nonfinite_attrs, nonfinite_lines, require_mode, variant)
from moetrace.tracer.render.table import Column, Table, layer_table

PER_LAYER = ("local", "propagated", "inherited", "gain", "growth", "amplified")


def _norm(x: xr.DataArray, dim: str = "hidden") -> xr.DataArray:
    return np.sqrt((x * x).sum(dim, skipna=False))  # a NaN (an overflow) stays NaN


def decompose_tokens(ref: xr.Dataset, var: xr.Dataset) -> xr.Dataset:
    """Per-token relative errors of the decomposition.

    Args:
        ref: the reference's trace (its ``free`` mode is used).
        var: a variant's trace with ``free`` and ``teacher`` modes (and optionally ``routing``).

    Returns:
        A Dataset of (layer, token) float64 arrays: ``local``, ``propagated``, ``inherited``, and
        ``routing_forced`` when ``var`` has a ``routing`` mode. Lazy if the traces are.
    """
    check_comparable(ref, var)
    require_mode(var, "free", "teacher")
    if "resid" not in ref or "resid" not in var:
        raise MoetraceError("the decomposition needs the 'resid' site in both traces; record it with --sites")
    layers = ref["layer"].values
    if len(layers) > 1 and not (np.diff(layers) == 1).all():
        raise MoetraceError(f"the decomposition needs consecutive layers; got {list(layers)}")
    r = reference(ref, "resid").astype("float64")  # (layer, token, hidden)
    f = variant(var, "resid", "free").astype("float64")
    t = variant(var, "resid", "teacher").astype("float64")
    nr = _norm(r)  # (layer, token)
    out = xr.Dataset({
        "local": _norm(t - r) / nr,
        "propagated": _norm(f - r) / nr,
        "inherited": _norm(f - t) / nr,
    })
    if "routing" in var["mode"].values:
        g = variant(var, "resid", "routing").astype("float64")
        out["routing_forced"] = _norm(g - r) / nr
    return out


def decompose(ref: xr.Dataset, var: xr.Dataset) -> xr.Dataset:
    """Per-layer local error, propagated error and gain of ``var`` against ``ref``.

    Returns:
        A Dataset of (layer,) float64 arrays (token means; see the module docstring):
        ``local``, ``propagated``, ``inherited``, ``gain`` (NaN at the first layer),
        ``growth`` (``propagated_L - propagated_{L-1}``, the first layer's from zero),
        ``amplified`` (``max(0, inherited_L - propagated_{L-1})`` = ``max(0, gain - 1) * propagated_{L-1}``),
        ``local_p99`` and, with a routing mode, ``routing_forced``. Computed (not lazy).
    """
    tok = decompose_tokens(ref, var)
    # The token reductions are the only heavy part (lazy on Dask); the rest is on (layer,) arrays.
    # One compute for both, so a Dask-backed trace is read once.
    # skipna=False: a token whose stream overflowed (Inf/NaN) makes its layer's figures NaN, never
    # a mean over the tokens that happened to stay finite.
    means = tok.mean("token", skipna=False).assign(
        local_p99=tok["local"].quantile(0.99, "token", skipna=False).drop_vars("quantile")).compute()
    p99 = means["local_p99"]
    incoming = means["propagated"].shift(layer=1)  # NaN at the first layer
    out = xr.Dataset(attrs={**analysis_attrs(ref, var, plant=plant_of(var)), **nonfinite_attrs(ref, var, "free")})
    out["local"] = means["local"]
    out["propagated"] = means["propagated"]
    out["inherited"] = means["inherited"]
    with np.errstate(divide="ignore", invalid="ignore"):  # an error-free input gives a NaN or inf gain
        out["gain"] = means["inherited"] / incoming
    out["growth"] = means["propagated"] - incoming.fillna(0.0)
    out["amplified"] = (means["inherited"] - incoming).clip(min=0.0)  # NaN at the first layer stays NaN
    out["local_p99"] = p99
    if "routing_forced" in means:
        out["routing_forced"] = means["routing_forced"]
    return out


def plant_of(ds: xr.Dataset) -> str:
    cfg = ds.attrs.get("config") or {}
    return str(cfg.get("plant") or "") if isinstance(cfg, dict) else ""


def growth_summary(dec: xr.Dataset, top: int = 3) -> list[dict]:
    """The layers where the propagated error grows most, and whether each injected or amplified it.

    Args:
        dec: the result of :func:`decompose`.
        top: how many layers to name (only layers where the error grows are named).

    Returns:
        Up to ``top`` dicts, largest growth first: ``layer``, ``growth``, ``propagated``,
        ``local``, ``amplified``, ``gain`` and ``cause``: ``"injected"`` (the layer's local error
        is at least the amplification of the error it received), ``"amplified"`` (the other way
        round), or, at the first layer where the incoming error is unknown, ``"embeddings"``
        when the inherited part is larger than the local one.
    """
    growth = dec["growth"].values
    order = [i for i in np.argsort(-growth, kind="stable") if growth[i] > 0][:top]
    rows = []
    for i in order:
        local, amp = float(dec["local"].values[i]), float(dec["amplified"].values[i])
        if np.isnan(amp):  # the first layer: its incoming (embedding) error is not recorded
            cause = "injected" if local >= float(dec["inherited"].values[i]) else "embeddings"
        else:
            cause = "injected" if local >= amp else "amplified"
        rows.append({"layer": int(dec["layer"].values[i]), "growth": float(growth[i]),
                     "propagated": float(dec["propagated"].values[i]), "local": local, "amplified": amp,
                     "gain": float(dec["gain"].values[i]), "cause": cause})
    return rows


def max_local_layer(dec: xr.Dataset) -> tuple[int, float]:
    """(layer, local error) of the layer that injects the most error by itself."""
    i = int(np.nanargmax(dec["local"].values))
    return int(dec["layer"].values[i]), float(dec["local"].values[i])


def summary_lines(dec: xr.Dataset, top: int = 3) -> list[str]:
    """Plain sentences: where a stream first overflowed, where the error grows most and why, and the layer
    with the highest local error."""
    lines = nonfinite_lines(dec.attrs)
    for row in growth_summary(dec, top):
        first = np.isnan(row["amplified"])
        why = {
            "injected": f"injected there (local {row['local']:.3g} >= "
                        + (f"inherited from the embeddings {float(dec['inherited'].values[0]):.3g})" if first
                           else f"amplified {row['amplified']:.3g})"),
            "amplified": f"amplified there (gain {row['gain']:.3g}: amplified {row['amplified']:.3g} > "
                         f"local {row['local']:.3g})",
            "embeddings": f"inherited from the embeddings (local {row['local']:.3g})",
        }[row["cause"]]
        lines.append(f"error grows most at layer {row['layer']}: +{row['growth']:.3g} relative L2, {why}")
    if not lines:
        lines.append("the propagated error does not grow at any layer")
    layer, value = max_local_layer(dec)
    loc = np.sort(dec["local"].values)[::-1]
    ratio = f", {loc[0] / loc[1]:.2f}x the next highest" if loc.size > 1 and loc[1] > 0 else ""
    lines.append(f"highest local error: layer {layer} ({value:.3g}{ratio})")
    # A fault in one expert hits only the tokens routed to it; the worst tokens show it more sharply.
    p99 = dec["local_p99"].values
    i = int(np.nanargmax(p99))
    srt = np.sort(p99)[::-1]
    ratio = f", {srt[0] / srt[1]:.2f}x the next highest" if srt.size > 1 and srt[1] > 0 else ""
    lines.append(f"highest local error of the worst 1% of tokens (p99): layer {int(dec['layer'].values[i])} "
                 f"({p99[i]:.3g}{ratio})")
    if dec.attrs.get("plant"):
        lines.append(f"planted fault: {dec.attrs['plant']} (layer:expert:projection)")
    return lines


# The per-layer columns of a decomposition; keys are its variables and the JSON keys.
COLUMNS = (
    Column("layer", "layer", "{:d}"),
    Column("local", "local", "{:.3e}", "error the layer makes on the reference's exact input (teacher mode)"),
    Column("local_p99", "local p99", "{:.3e}", "local error of the worst 1% of tokens"),
    Column("propagated", "propagated", "{:.3e}", "free-running error after the layer (what users see)"),
    Column("inherited", "inherited", "{:.3e}", "upstream error as the layer passes it on (free minus teacher)"),
    Column("gain", "gain", "{:.3f}", "inherited / propagated error of the layer before (>1: amplifies)"),
    Column("growth", "growth", "{:+.2e}", "propagated error minus that of the layer before"),
    Column("amplified", "amplified", "{:.2e}", "inherited minus the incoming propagated error, clipped at 0 "
           "(0: the layer damps what it receives)"),
    Column("routing_forced", "fixed routing", "{:.3e}", "propagated error with the reference's expert choices"),
    Column("local_x_floor", "local xfloor", floor_fmt(), "local error as a multiple of the noise floor's "
           "(exact: both 0; floor 0: the floor's is 0, this one not)"),
    Column("propagated_x_floor", "prop xfloor", floor_fmt(), "propagated error as a multiple of the noise floor's "
           "(exact: both 0; floor 0: the floor's is 0, this one not)"),
)


def decomposition_table(dec: xr.Dataset, floor: xr.Dataset | None = None) -> Table:
    """The per-layer table of :func:`decompose`; with ``floor`` (the noise floor's decomposition,
    orig-bf16 against the same reference) also local and propagated error as multiples of it."""
    head = f"{dec.attrs['variant']} vs {dec.attrs['reference']}: local vs propagated error on {dec.attrs['model']}"
    return layer_table(dec, COLUMNS, head, floor_multiples(dec, floor, "local", "propagated"))


def format_decomposition(dec: xr.Dataset, floor: xr.Dataset | None = None) -> str:
    """A human table of :func:`decompose` (see :func:`decomposition_table`) and its growth summary."""
    return "\n".join([decomposition_table(dec, floor).to_text(), *summary_lines(dec)])


def decomposition_to_dict(dec: xr.Dataset, floor: xr.Dataset | None = None) -> dict:
    """A JSON-ready dict: attrs, one row per layer, and the growth summary."""
    layer, value = max_local_layer(dec)
    growth = [{k: (json_number(v) if isinstance(v, float) else v) for k, v in row.items()}
              for row in growth_summary(dec)]
    return {**dec.attrs, "layers": decomposition_table(dec, floor).records(), "growth": growth,
            "max_local": {"layer": layer, "local": value}}
