"""The ``ds.moetrace`` xarray accessor: moetrace's analysis on a trace opened in a notebook.

It is registered when :mod:`moetrace.tracer` is imported, which ``moetrace.open_trace`` and
``moetrace.open_traces`` do; after a plain ``xarray.open_zarr``, ``import moetrace.tracer`` once::

    import moetrace
    ref = moetrace.open_trace("traces/demo/orig-fp32.zarr")
    var = moetrace.open_trace("traces/demo/q4_k_m-bf16.zarr")
    var.moetrace.decompose(ref)              # local / propagated / gain per layer
    var.moetrace.routing(ref)                # routing diff
    var.moetrace.output(ref)                 # KL, top-1 agreement, next-token change, intervals
    moetrace.open_traces("traces/demo").moetrace.variants()   # split a run back into stores

Every method returns what the function of the same analysis returns, the same numbers as the
command line. Traces opened with Dask (the default when dask is installed) are read lazily,
one layer chunk at a time; ``*_tokens`` methods return lazy per-token arrays.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from moetrace.errors import MoetraceError


@xr.register_dataset_accessor("moetrace")
class MoetraceAccessor:
    """Analysis of one variant's trace against a reference trace (``ds.moetrace``)."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    @property
    def variant(self) -> str | None:
        """The variant this trace records."""
        return self._ds.attrs.get("variant")

    def diff(self, ref: xr.Dataset, mode: str = "free") -> xr.Dataset:
        """:func:`moetrace.tracer.analysis.compare.diff` of this trace against ``ref``."""
        from moetrace.tracer.analysis.compare import diff

        return diff(ref, self._ds, mode)

    def hidden_error(self, ref: xr.Dataset, site: str = "resid", mode: str = "free") -> xr.Dataset:
        """Per (layer, token) cosine, relative error, SQNR and max error of ``site`` (lazy)."""
        from moetrace.tracer.analysis.common import check_comparable, reference, variant
        from moetrace.tracer.analysis.compare import hidden_error

        check_comparable(ref, self._ds)
        return hidden_error(reference(ref, site), variant(self._ds, site, mode))

    def decompose(self, ref: xr.Dataset) -> xr.Dataset:
        """:func:`moetrace.tracer.analysis.decompose.decompose`: local, propagated, inherited, gain per layer."""
        from moetrace.tracer.analysis.decompose import decompose

        return decompose(ref, self._ds)

    def decompose_tokens(self, ref: xr.Dataset) -> xr.Dataset:
        """:func:`moetrace.tracer.analysis.decompose.decompose_tokens` (per layer and token; lazy)."""
        from moetrace.tracer.analysis.decompose import decompose_tokens

        return decompose_tokens(ref, self._ds)

    def routing(self, ref: xr.Dataset, mode: str = "free") -> xr.Dataset:
        """:func:`moetrace.tracer.analysis.routing.routing_diff` of this trace in ``mode``."""
        from moetrace.tracer.analysis.routing import routing_diff

        return routing_diff(ref, self._ds, mode)

    def routing_tokens(self, ref: xr.Dataset, mode: str = "free") -> xr.Dataset:
        """:func:`moetrace.tracer.analysis.routing.routing_tokens` (per layer and token; lazy)."""
        from moetrace.tracer.analysis.routing import routing_tokens

        return routing_tokens(ref, self._ds, mode)

    def output(self, ref: xr.Dataset, mode: str = "free", n_resamples: int = 1000, seed: int = 0) -> xr.Dataset:
        """:func:`moetrace.tracer.analysis.output.output_metrics`, with bootstrap intervals."""
        from moetrace.tracer.analysis.output import output_metrics

        return output_metrics(ref, self._ds, mode, n_resamples, seed)

    def output_tokens(self, ref: xr.Dataset, mode: str = "free") -> xr.Dataset:
        """:func:`moetrace.tracer.analysis.output.output_tokens`: KL, agreement, next-token change per token."""
        from moetrace.tracer.analysis.output import output_tokens

        return output_tokens(ref, self._ds, mode)

    def headline(self, ref: xr.Dataset, floor: xr.Dataset | None = None, n_resamples: int = 1000,
                 seed: int = 0) -> dict:
        """Headline figures (as ``moetrace report``), with multiples of ``floor`` (orig-bf16's trace)."""
        from moetrace.tracer.analysis.summary import analyze_variant, set_floor

        a = analyze_variant(ref, self._ds, n_resamples, seed)
        if floor is not None:
            set_floor({a.name: a}, analyze_variant(ref, floor, n_resamples, seed))
        return {"variant": a.name, "figures": a.figures, "ci": a.ci, "x_floor": a.x_floor}

    def variants(self) -> dict[str, xr.Dataset]:
        """Split a run opened with ``moetrace.open_traces`` back into one Dataset per variant.

        Each has its own ``variant`` attribute and only the modes it recorded, so the methods
        above apply to it (``run.moetrace.variants()["q4_k_m-bf16"].moetrace.decompose(ref)``).
        """
        if "variant" not in self._ds.dims:
            raise MoetraceError("variants() needs a run opened with moetrace.open_traces (a 'variant' dimension)")
        out = {}
        for name in self._ds["variant"].values:
            ds = self._ds.sel(variant=name, drop=True)
            # open_traces joins the modes of all stores (the reference has only free), filling
            # the modes a store lacks with NaN; one value per mode tells which it recorded.
            probe = ds["resid"] if "resid" in ds else ds["logits"]
            first = probe.isel({d: 0 for d in probe.dims if d != "mode"})  # (mode,)
            present = np.atleast_1d(first.notnull().values)
            ds = ds.sel(mode=[m for m, ok in zip(ds["mode"].values, present) if ok])
            if "topk_idx" in ds and ds["topk_idx"].dtype.kind == "f":  # the join made it float for NaN
                ds["topk_idx"] = ds["topk_idx"].fillna(-1).astype("int16")
            ds.attrs = {**self._ds.attrs, "variant": str(name)}
            out[str(name)] = ds
        return out
