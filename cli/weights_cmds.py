"""Weight commands (recipe, quantize, imatrix, audit): registered on the main `moetrace` group."""
