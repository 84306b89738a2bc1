"""Named capture sites on transformers modules, per architecture."""
