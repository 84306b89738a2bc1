"""Variants, the layer-lockstep executor, weight sources, the trace store and comparison metrics."""
