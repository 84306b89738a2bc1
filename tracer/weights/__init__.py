"""Weight derivation: what each variant's weights become (recipes applied, quantized, cached, audited, written)."""
