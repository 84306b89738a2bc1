"""Execution: the layer-lockstep executor and resuming a stopped run."""
