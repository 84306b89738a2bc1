"""The trace store's public names, in one import (kept for the modules that import them from here).

The schema is documented in tracer/store/schema.py; the writer is tracer/store/writer.py, the
readers and integrity checks tracer/store/reader.py, the single-writer lock tracer/store/lock.py,
local paths and URLs tracer/store/location.py.
"""

from moetrace.tracer.store.reader import layers_done, list_stores, open_trace, open_traces
from moetrace.tracer.store.schema import LAYER_VARS, LOCK_NAME, PROGRESS_PREFIX, Tokens, logit_chunk_tokens, quiet
from moetrace.tracer.store.writer import TraceWriter

__all__ = ["LAYER_VARS", "LOCK_NAME", "PROGRESS_PREFIX", "Tokens", "TraceWriter", "layers_done", "list_stores",
           "logit_chunk_tokens", "open_trace", "open_traces", "quiet"]
