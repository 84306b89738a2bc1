"""Named capture sites and the context manager that attaches them.

A site is a stable name for a tensor recorded at every decoder layer; its shape (per sequence,
after flattening batch and position into ``token``) is stated beside it. Hooks are attached only
inside :func:`capture`, which removes every handle on exit, also when the forward raises.
Recording never changes what the model computes; the one deliberate intervention, forcing the
reference's expert choices in ``routing`` mode, is a separate, explicit argument.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

LAYER_SITES: dict[str, str] = {
    "resid": "(token, hidden) the decoder layer's output hidden state",
    "attn_out": "(token, hidden) attention output, before the residual add",
    "moe_out": "(token, hidden) MoE block output, before the residual add",
    "router_logits": "(token, expert) router logits",
    "topk_idx": "(token, k) chosen experts, in the router's order",
    "topk_weight": "(token, k) routing weights of the chosen experts",
}
FINAL_SITES: dict[str, str] = {"logits": "(token, vocab) output logits"}
ALL_SITES = tuple(LAYER_SITES) + tuple(FINAL_SITES)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1])  # (token, last)


@contextmanager
def capture(layer: torch.nn.Module, adapter, sites=tuple(LAYER_SITES), forced_topk: torch.Tensor | None = None):
    """Record ``sites`` of one decoder layer's forward passes.

    Args:
        layer: a decoder-layer module of the adapter's architecture.
        adapter: the architecture adapter (module paths, router output parsing).
        sites: the site names to record.
        forced_topk: (token, k) expert indices the router must choose instead of its own
            (``routing`` mode); None leaves the model as it is.

    Yields:
        A dict filled during the forward: site name -> tensor, shapes as in :data:`LAYER_SITES`.
    """
    unknown = set(sites) - set(LAYER_SITES)
    if unknown:
        raise ValueError(f"unknown sites {sorted(unknown)}; valid: {', '.join(LAYER_SITES)}")
    rec: dict[str, torch.Tensor] = {}
    handles = []
    try:
        if "resid" in sites:
            handles.append(layer.register_forward_hook(lambda m, a, out: rec.__setitem__("resid", _flat(out))))
        if "attn_out" in sites:
            handles.append(
                adapter.attention(layer).register_forward_hook(
                    lambda m, a, out: rec.__setitem__("attn_out", _flat(out[0]))
                )
            )
        if "moe_out" in sites:
            handles.append(
                adapter.moe(layer).register_forward_hook(lambda m, a, out: rec.__setitem__("moe_out", _flat(out)))
            )
        router_sites = [s for s in ("router_logits", "topk_idx", "topk_weight") if s in sites]
        if router_sites or forced_topk is not None:

            def on_router(module, args, out):
                if forced_topk is not None:
                    out = adapter.force_choice(module, out, forced_topk)
                logits, idx, weight = adapter.router_outputs(out)
                for name, t in (("router_logits", logits), ("topk_idx", idx), ("topk_weight", weight)):
                    if name in sites:
                        rec[name] = _flat(t)
                return out if forced_topk is not None else None

            handles.append(adapter.router(layer).register_forward_hook(on_router))
        yield rec
    finally:
        for h in handles:
            h.remove()
