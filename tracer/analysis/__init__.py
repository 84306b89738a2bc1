"""Analysis: pure functions from traces to divergence, decomposition, routing and output metrics."""

# Registers the `ds.moetrace` xarray accessor: it exists whenever analysis code (or a store
# reader, which imports this package) has been imported.
from moetrace.tracer.analysis import accessor as _accessor  # noqa: E402,F401
