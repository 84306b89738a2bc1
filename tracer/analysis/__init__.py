"""Analysis: pure functions from traces to divergence, decomposition, routing and output metrics."""
