"""The trace store: Zarr stores of recorded sites, their schema, writer and readers.

The public names are importable from here (and, as before, from ``moetrace.tracer.store.zarr_store``).
"""

from moetrace.tracer.store.zarr_store import (  # noqa: F401
    LAYER_VARS, LOCK_NAME, Tokens, TraceWriter, layers_done, list_stores, open_trace, open_traces,
)
