"""Site adapter for transformers' Qwen3-MoE decoder layers (``Qwen3MoeDecoderLayer``)."""

from __future__ import annotations

import torch


class Qwen3MoeAdapter:
    """Where the sites of a Qwen3-MoE decoder layer live, and how its router speaks.

    ``layer.self_attn`` returns ``(attn_output, attn_weights)``; ``layer.mlp`` is the
    ``Qwen3MoeSparseMoeBlock`` whose ``gate`` (``Qwen3MoeTopKRouter``) returns
    ``(router_logits (token, expert), top_k_weights (token, k), top_k_index (token, k))``.
    """

    model_type = "qwen3_moe"

    def attention(self, layer):
        return layer.self_attn

    def moe(self, layer):
        return layer.mlp

    def router(self, layer):
        return layer.mlp.gate

    def router_outputs(self, out):
        """(logits, topk_idx, topk_weight) from the router's output tuple."""
        logits, weight, idx = out
        return logits, idx, weight

    def force_choice(self, router, out, forced_idx: torch.Tensor):
        """The router's output with ``forced_idx`` (token, k) as its choice.

        The weights are the router's own probabilities at the forced experts, renormalized as
        the router renormalizes its own choice, so only *which* experts run changes.
        """
        logits, _, _ = out
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # (token, expert)
        idx = forced_idx.to(device=logits.device, dtype=torch.long).reshape(logits.shape[0], -1)
        w = probs.gather(-1, idx)  # (token, k)
        if router.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return logits, w.to(logits.dtype), idx


ADAPTERS = {"qwen3_moe": Qwen3MoeAdapter}


def adapter_for(config):
    from moetrace.errors import MoetraceError

    if config.model_type not in ADAPTERS:
        raise MoetraceError(
            f"no site adapter for model type {config.model_type!r}; supported: {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[config.model_type]()
