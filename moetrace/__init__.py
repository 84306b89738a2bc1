"""moetrace: trace numerical error layer by layer through Mixture-of-Experts language models.

The public entry points for notebooks:

    import moetrace
    ref = moetrace.open_trace("traces/demo/orig-fp32.zarr")      # one xarray Dataset
    run = moetrace.open_traces("traces/demo")                   # all variants along `variant`
"""

__version__ = "0.1.0"

__all__ = ["__version__", "open_trace", "open_traces"]


def __getattr__(name):
    # Lazy, so `import moetrace` (and `moetrace --help`) does not pull in torch or zarr.
    if name in ("open_trace", "open_traces"):
        from moetrace.tracer.store import zarr_store as store

        return getattr(store, name)
    raise AttributeError(f"module 'moetrace' has no attribute {name!r}")
