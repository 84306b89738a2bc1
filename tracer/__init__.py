"""Variants, the layer-lockstep executor, weight sources, the trace store and comparison metrics."""

# Registers the `ds.moetrace` xarray accessor. Here, so that it exists after any moetrace.tracer
# import, which moetrace.open_trace/open_traces do; the top-level `import moetrace` stays free of
# xarray so `moetrace --help` answers at once.
from moetrace.tracer.analysis import accessor as _accessor  # noqa: E402,F401
