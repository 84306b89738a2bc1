"""Model sources: where reference weights, the architecture and the tokens come from."""
