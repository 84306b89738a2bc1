"""Variants, the layer-lockstep executor, weight sources, the trace store and comparison metrics.

The ``ds.moetrace`` xarray accessor is registered by :mod:`moetrace.tracer.analysis` and by every
store reader (``open_trace``), not here: importing ``moetrace.tracer`` stays free of xarray and
torch, so checking a variant name answers at once.
"""
