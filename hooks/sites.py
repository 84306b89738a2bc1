"""Named capture sites and the context manager that attaches them.

A site is a stable name for a tensor recorded at every decoder layer; its shape (per sequence,
after flattening batch and position into ``token``) is stated beside it. Hooks are attached only
inside :func:`capture`, which removes every handle on exit, also when the forward raises.
Recording never changes what the model computes; the one deliberate intervention, forcing the
reference's expert choices in ``routing`` mode, is a separate, explicit argument.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the site names are read by commands that never load torch (diff, report)
    import torch

LAYER_SITES: dict[str, str] = {
    "resid": "(token, hidden) the decoder layer's output hidden state",
    "attn_out": "(token, hidden) attention output, before the residual add",
    "moe_out": "(token, hidden) MoE block output (shared expert included), before the residual add; MoE layers",
    "shared_out": "(token, hidden) the shared expert's output, its sigmoid gate applied; MoE layers of families "
                  "with a shared expert",
    "mlp_out": "(token, hidden) a dense layer's MLP output, before the residual add; dense layers",
    "router_logits": "(token, expert) router logits",
    "topk_idx": "(token, k) chosen experts, in the router's order",
    "topk_weight": "(token, k) routing weights of the chosen experts",
}
FINAL_SITES: dict[str, str] = {"logits": "(token, vocab) output logits"}
ALL_SITES = tuple(LAYER_SITES) + tuple(FINAL_SITES)
# Sites only an MoE layer has, and only a dense layer has; the rest every layer has.
MOE_SITES = ("moe_out", "shared_out", "router_logits", "topk_idx", "topk_weight")
DENSE_SITES = ("mlp_out",)


def layer_kind_sites(sites, moe: bool, shared: bool = False) -> list[str]:
    """The sites of ``sites`` a layer of one kind records: an MoE layer (``shared``: its family has a
    shared expert) records no ``mlp_out``, a dense layer no router, MoE or shared-expert site."""
    drop = set(DENSE_SITES) if moe else set(MOE_SITES)
    if moe and not shared:
        drop.add("shared_out")
    return [s for s in sites if s not in drop]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1])  # (token, last)


@contextmanager
def capture(layer: torch.nn.Module, adapter, sites=tuple(LAYER_SITES), forced_topk: torch.Tensor | None = None):
    """Record ``sites`` of one decoder layer's forward passes.

    Args:
        layer: a decoder-layer module of the adapter's architecture.
        adapter: the architecture adapter (module paths, router output parsing).
        sites: the site names to record; those the layer's kind lacks (router sites of a dense
            layer, ``mlp_out`` of an MoE layer: see :func:`layer_kind_sites`) are not recorded.
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
    moe = adapter.is_moe_layer(layer)
    if not moe and forced_topk is not None:
        raise ValueError("a dense layer has no router to force a routing choice on")
    # A layer records the sites of its kind: a dense one no router/MoE sites, an MoE one no mlp_out.
    sites = layer_kind_sites(sites, moe, adapter.sites.shared is not None)
    try:
        if "resid" in sites:
            handles.append(layer.register_forward_hook(lambda m, a, out: rec.__setitem__("resid", _flat(out))))
        if "attn_out" in sites:
            handles.append(
                adapter.attention(layer).register_forward_hook(
                    lambda m, a, out: rec.__setitem__("attn_out", _flat(out[0]))
                )
            )
        for name in ("moe_out", "mlp_out"):
            if name in sites:
                # GPT-OSS's MoE block returns (hidden, router_scores): the hidden state is the output.
                handles.append(adapter.moe(layer).register_forward_hook(
                    lambda m, a, out, name=name: rec.__setitem__(name, _flat(out[0] if isinstance(out, tuple)
                                                                           else out))))
        if "shared_out" in sites:
            expert, gate = adapter.shared(layer)
            parts: dict[str, torch.Tensor] = {}

            def on_shared(which):
                def hook(m, a, out):
                    parts[which] = out
                    if "expert" in parts and ("gate" in parts or gate is None):
                        # as the MoE block combines them: sigmoid(gate(x)) * shared_expert(x)
                        y = parts["expert"] if gate is None else parts["gate"].sigmoid() * parts["expert"]
                        rec["shared_out"] = _flat(y)
                        parts.clear()
                return hook

            handles.append(expert.register_forward_hook(on_shared("expert")))
            if gate is not None:
                handles.append(gate.register_forward_hook(on_shared("gate")))
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
