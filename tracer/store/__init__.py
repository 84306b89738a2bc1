"""The trace store: Zarr stores of recorded sites, their schema, writer and readers."""
