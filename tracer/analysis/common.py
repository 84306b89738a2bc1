"""What every analysis shares: which reference data to read, mode and comparability checks, metric names.

A reference trace records only the ``free`` mode (it is what the variants drift from), so every
analysis reads the reference through :func:`reference` and checks the variant's modes through
:func:`require_mode`, which raises the one "has no mode" error. :data:`ERROR_METRICS` names the four
figures that compare a reference tensor with a variant's (hidden states in
:func:`moetrace.tracer.analysis.compare.hidden_error`, weight matrices in
:func:`moetrace.tracer.weights.audit.matrix_metrics`): one set of names, headers and definitions,
whatever the arithmetic behind each (the audit sums in float64 over float32 rows on purpose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xarray as xr

from moetrace.errors import MoetraceError

REFERENCE_MODE = "free"


@dataclass(frozen=True)
class Metric:
    """One figure comparing a reference tensor ``a`` with a variant's ``b`` along one axis.

    Attributes:
        name: the variable and JSON key (``cosine``).
        header: the short column header (``cosine``).
        fmt: the format of one value in tables.
        description: the definition, for help text and table legends.
        higher_is_better: True where a larger value means less error (cosine, SQNR).
    """

    name: str
    header: str
    fmt: str
    description: str
    higher_is_better: bool


ERROR_METRICS = (
    Metric("cosine", "cosine", "{:.5f}", "<a, b> / (|a| |b|): 1 for an exact copy", True),
    Metric("rel_error", "rel err", "{:.3e}", "relative L2 error |b - a| / |a|", False),
    Metric("sqnr_db", "SQNR dB", "{:.2f}", "signal to quantization noise 20 log10(|a| / |b - a|), dB", True),
    Metric("max_abs_error", "max err", "{:.3e}", "largest absolute error max |b - a|", False),
)
METRIC_NAMES = tuple(m.name for m in ERROR_METRICS)


def store_name(ds: xr.Dataset) -> str:
    """How messages name a trace: its variant and, when xarray knows it, the store it was opened from."""
    variant = ds.attrs.get("variant", "the trace")
    source = ds.encoding.get("source")
    return f"{variant} ({source})" if source else str(variant)


def modes_of(ds: xr.Dataset) -> list[str]:
    """The modes a trace recorded (a Dataset without a ``mode`` coordinate has none)."""
    return [str(m) for m in ds["mode"].values] if "mode" in ds.coords else []


def require_mode(ds: xr.Dataset, *modes: str, hint: str | None = None) -> None:
    """Raise the one "has no mode" error unless ``ds`` recorded every one of ``modes``.

    Args:
        ds: a variant's trace.
        modes: the modes the analysis reads.
        hint: what to do instead (default: how to record the missing mode).

    Raises:
        MoetraceError: one line naming the store, the first missing mode, the modes it has and the hint.
    """
    have = modes_of(ds)
    missing = [m for m in modes if m not in have]
    if missing:
        m = missing[0]
        hint = hint or f"record it with `moetrace run ... --mode free{'' if m == REFERENCE_MODE else ' --mode ' + m}`"
        raise MoetraceError(f"{store_name(ds)} has no {m!r} mode (it has {', '.join(have) or 'none'}); {hint}")


def per_layer(da: xr.DataArray) -> xr.DataArray:
    """``da`` with its ``moe_layer``/``dense_layer`` dimension named ``layer`` (its coordinate keeps the true layer
    indices), so a variable recorded on one kind of layer only is analysed as any per-layer variable."""
    for dim in ("moe_layer", "dense_layer"):
        if dim in da.dims:
            return da.rename({dim: "layer"})
    return da


def reference(ref: xr.Dataset, name: str) -> xr.DataArray:
    """The reference's ``name`` variable in its free mode, without the ``mode`` dimension (layer dim: ``layer``)."""
    da = ref[name]
    return per_layer(da.sel(mode=REFERENCE_MODE, drop=True) if "mode" in da.dims else da)


def variant(var: xr.Dataset, name: str, mode: str) -> xr.DataArray:
    """The variant's ``name`` variable in ``mode`` (checked), without the ``mode`` dimension (layer dim: ``layer``)."""
    require_mode(var, mode)
    return per_layer(var[name].sel(mode=mode, drop=True))


def require_moe_layers(ds: xr.Dataset, what: str) -> None:
    """Raise one line where ``ds`` holds no routing because its model has no MoE layer (a dense model).

    Raises:
        MoetraceError: naming the store and ``what`` could not be done.
    """
    if "topk_idx" not in ds and "moe_layer" not in ds.coords and "dense_layer" in ds.coords:
        raise MoetraceError(f"{store_name(ds)} has no routing to {what}: its model has no mixture-of-experts layer "
                            f"(dense layers {', '.join(map(str, ds['dense_layer'].values))})")


def check_comparable(ref: xr.Dataset, var: xr.Dataset) -> None:
    """Refuse to compare traces of different models or tokens.

    Raises:
        MoetraceError: the model hashes or the token ids differ.
    """
    if ref.attrs.get("model_hash") != var.attrs.get("model_hash"):
        raise MoetraceError(
            f"the traces are of different models: {ref.attrs.get('model')} ({ref.attrs.get('model_hash')}) "
            f"vs {var.attrs.get('model')} ({var.attrs.get('model_hash')})"
        )
    if ref.sizes.get("token") != var.sizes.get("token") or not np.array_equal(
        ref["token_id"].values, var["token_id"].values
    ):
        raise MoetraceError("the traces are of different tokens; compare stores of the same run or the same prompts")


def open_pair(reference_path, variant_path) -> tuple[xr.Dataset, xr.Dataset]:
    """Open a reference's and a variant's trace store (``moetrace.open_trace``), each checked to exist."""
    from moetrace.tracer.store import location
    from moetrace.tracer.store.zarr_store import open_trace

    for p in (reference_path, variant_path):
        if not location.exists(p):  # a local folder or a URL
            raise MoetraceError(f"trace store {str(p)!r} does not exist")
    return open_trace(reference_path), open_trace(variant_path)


def require_sites(ds: xr.Dataset, who: str, *sites: str) -> None:
    """Raise unless ``ds`` (the ``who`` trace: "reference", "variant") recorded every one of ``sites``."""
    missing = [s for s in sites if s not in ds]
    if missing:
        raise MoetraceError(f"the {who} trace lacks the {missing[0]!r} site; record it with --sites")


def analysis_attrs(ref: xr.Dataset, var: xr.Dataset, **extra) -> dict:
    """The attributes every analysis result carries: reference, variant and model (and ``extra``)."""
    return {"reference": ref.attrs.get("variant"), "variant": var.attrs.get("variant"), **extra,
            "model": var.attrs.get("model")}


def json_number(x):
    """A JSON-safe number: numpy scalars become Python ones; NaN and infinities become None."""
    if x is None or isinstance(x, (bool, np.bool_)):
        return None if x is None else bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


# Where the noise floor's figure is exactly 0 there is no multiple: the figure is then "exact" when it is
# 0 too (the variant matches the reference there as exactly as the floor does), and "floor 0" when it is
# not (all of it is beyond the compute-precision noise, which has none of it). Tables print these words,
# never "nanx" or "infx"; JSON gives the same strings, a number otherwise, null where a figure is missing.
FLOOR_EXACT = "exact"
FLOOR_ZERO = "floor 0"


def floor_multiple(a, b):
    """``a`` as a multiple of the floor figure ``b``: a float, :data:`FLOOR_EXACT` (both 0),
    :data:`FLOOR_ZERO` (``b`` 0, ``a`` not), or NaN where either is missing (NaN, or None)."""
    a = float("nan") if a is None else float(a)
    b = float("nan") if b is None else float(b)
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    if b == 0:
        return FLOOR_EXACT if a == 0 else FLOOR_ZERO
    return a / b


def floor_fmt(fmt: str = "{:.1f}x"):
    """The cell format of a "x floor" column: the multiple with ``fmt``, or the word :func:`floor_multiple` gave."""
    return lambda v: v if isinstance(v, str) else fmt.format(v)


def floor_multiples(ds: xr.Dataset, floor: xr.Dataset | None, *names: str) -> dict:
    """``{NAME_x_floor: (layer,) list}``: each per-layer figure of ``ds`` divided by the noise floor's.

    Args:
        ds: an analysis result with (layer,) variables ``names`` (a decomposition, a routing diff).
        floor: the same analysis of the noise floor (orig-bf16 against the same reference), or None.

    Returns:
        An empty dict without a floor; :func:`floor_multiple` per layer ("exact" or "floor 0" where
        the floor's figure is zero).
    """
    if floor is None:
        return {}
    return {f"{n}_x_floor": [floor_multiple(a, b) for a, b in zip(ds[n].values, floor[n].values)] for n in names}


def ratio(a, b) -> float:
    """``a / b`` as a float, NaN where ``b`` is zero or either is missing (a multiple of nothing)."""
    a, b = float(a), float(b)
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else float("nan")


def nonfinite_attrs(ref: xr.Dataset, var: xr.Dataset, mode: str) -> dict:
    """Where the reference's stream and the variant's ``mode`` stream first held an Inf or NaN (the
    run's ``nonfinite`` store attribute, see moetrace.tracer.execution.nonfinite), as analysis
    attributes ``nonfinite_reference`` and ``nonfinite_variant``; absent where a stream stayed finite."""
    out = {}
    for key, ds, m in (("nonfinite_reference", ref, "free"), ("nonfinite_variant", var, mode)):
        found = (ds.attrs.get("nonfinite") or {}).get(m)
        if found:
            out[key] = dict(found)
    return out


def nonfinite_lines(attrs: dict) -> list[str]:
    """One line per stream of an analysis result that became non-finite (see :func:`nonfinite_attrs`)."""
    lines = []
    for key, who in (("nonfinite_reference", "reference"), ("nonfinite_variant", "variant")):
        f = attrs.get(key)
        if f:
            where = "the output logits" if f["layer"] < 0 else f"layer {f['layer']}, site {f['site']}"
            lines.append(f"non-finite: the {who} {attrs.get(who)} first holds {f['kind']} at {where}, token "
                         f"{f['token']}; figures from there on are NaN or inf (an overflow is a finding, e.g. fp16 "
                         f"beyond 65504)")
    return lines
