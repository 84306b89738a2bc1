"""Where a stream first held an Inf or NaN: a finding of the run, not a crash.

fp16 overflows (its largest value is 65504) where real models have massive activations, and a
broken weight can do the same in any dtype. The executor checks every recorded site of every
stream after each layer, in the order the layer computes them, and keeps the first site, layer
and token where a value became non-finite, per stream (variant and mode). The finding is saved
in the variant's store as the attribute ``nonfinite``: ``{mode: {"site", "layer", "token",
"kind"}}`` (``layer`` is -1 for the output ``logits``; ``token`` is the index along the store's
``token`` dimension; ``kind`` is ``inf`` or ``nan``). A stream without a finding has no entry.
"""

from __future__ import annotations

# The order a decoder layer computes its sites in: the first non-finite one is where it began.
COMPUTE_ORDER = ("attn_out", "router_logits", "topk_weight", "moe_out", "resid")
ATTR = "nonfinite"


def first_nonfinite(record: dict) -> tuple[str, int, str] | None:
    """(site, token, kind) of the first non-finite value of ``record`` (site -> (token, n)), or None."""
    import torch

    names = [s for s in COMPUTE_ORDER if s in record] + sorted(s for s in record if s not in COMPUTE_ORDER)
    for site in names:
        t = record[site]
        if not t.is_floating_point():
            continue
        # A sum is non-finite wherever a term is (NaN and Inf propagate; Inf - Inf is NaN): one
        # reduction instead of an isfinite mask per site. A finite record whose sum overflows
        # (fp16) is looked at element by element and passes.
        if bool(torch.isfinite(t.sum())):
            continue
        bad = ~torch.isfinite(t)  # (token, n)
        if bool(bad.any()):
            token = int(bad.reshape(t.shape[0], -1).any(-1).nonzero()[0, 0])
            kind = "nan" if bool(torch.isnan(t[token]).any()) else "inf"
            return site, token, kind
    return None


class Findings:
    """The first non-finite site of each stream (variant name, mode) of a run."""

    def __init__(self):
        self.first: dict[tuple[str, str], dict] = {}

    def check(self, variant: str, mode: str, layer: int, record: dict) -> None:
        """Look at one stream's record of ``layer`` (-1: the logits) unless that stream already has a finding."""
        if (variant, mode) in self.first:
            return
        hit = first_nonfinite(record)
        if hit is not None:
            site, token, kind = hit
            self.first[(variant, mode)] = {"site": site, "layer": layer, "token": token, "kind": kind}

    def attrs(self, variant: str) -> dict:
        """The store attribute of ``variant``: ``{"nonfinite": {mode: finding}}``, or {} without a finding."""
        found = {m: f for (v, m), f in self.first.items() if v == variant}
        return {ATTR: found} if found else {}

