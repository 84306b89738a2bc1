"""The per-expert error table of one MoE layer: which expert matrix is broken, from activations.

In ``teacher`` mode the executor records what the variant's experts module receives (its
input hidden states, the experts its router chose and their weights) and then runs every
(token, chosen expert) pair twice, through the variant's experts and through the reference's,
on the same input. The difference ``dy`` is the error of that expert's weights (and arithmetic)
alone: upstream error and routing do not enter it, and a broken expert stands out however few
tokens reach it, where a layer mean dilutes it among all the others. The table's variables are
defined in moetrace.tracer.store.schema (``TABLE_VARS``).

The experts module is the family's own (``Family.experts``), called as the MoE block calls it, so
every family and compute path computes its experts as it does in the run.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def expert_inputs(layer: torch.nn.Module, family, active: bool = True):
    """Record the experts module's inputs during the forward passes inside the block.

    Yields:
        a list, filled with one ``(hidden (token, H), top_k_index (token, k), top_k_weights (token, k))``
        per call of the experts module (one per sequence); empty where ``active`` is false.
    """
    calls: list[tuple] = []
    if not active:
        yield calls
        return

    def hook(module, args, kwargs, out):
        given = list(args) + list(kwargs.values())  # the MoE block's positional or keyword call
        calls.append(tuple(t.detach() for t in given[:3]))

    handle = family.experts(layer).register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _pairs(x: torch.Tensor, idx: torch.Tensor, n_experts: int):
    """Every valid (token, chosen expert) pair: (inputs (P, H), expert (P,), token (P,), slot mask (T*k,))."""
    T, k = idx.shape
    flat = idx.reshape(-1).long()  # (T*k,)
    valid = (flat >= 0) & (flat < n_experts)  # families pad unused slots with -1 or n_experts
    token = torch.arange(T).repeat_interleave(k)[valid]  # (P,)
    return x[token], flat[valid], token, valid


def layer_table(ref_experts: torch.nn.Module, var_experts: torch.nn.Module, calls: list[tuple], n_experts: int,
                ref_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The per-expert table of one layer and mode from the recorded expert inputs.

    Args:
        ref_experts: the reference layer's experts module (its weights, its arithmetic).
        var_experts: the variant layer's experts module.
        calls: what :func:`expert_inputs` recorded, one entry per sequence, in token order.
        n_experts: routed experts of the layer.
        ref_dtype: the dtype the reference computes in (the inputs are cast to it).

    Returns:
        ``expert_error`` (E,) relative L2 error ||dy|| / ||y_ref|| over each expert's tokens (NaN: none),
        ``expert_tokens`` (E,), ``expert_weight`` (E,) summed routing weight, ``expert_sq`` (E,)
        sum of w^2 ||dy||^2, ``experts_part`` (token,) ||sum_k w_k dy_k|| per token.
    """
    E = n_experts
    err_sq = torch.zeros(E, dtype=torch.float64)
    ref_sq = torch.zeros(E, dtype=torch.float64)
    wsq = torch.zeros(E, dtype=torch.float64)
    count = torch.zeros(E, dtype=torch.int64)
    wsum = torch.zeros(E, dtype=torch.float64)
    parts = []
    for x, idx, w in calls:
        T = idx.shape[0]
        xs, expert, token, valid = _pairs(x, idx, E)
        weights = w.reshape(-1)[valid].double()  # (P,)
        one = torch.ones((expert.shape[0], 1), dtype=w.dtype)
        # Each pair as its own "token" with one chosen expert of weight 1: the expert's plain output.
        yv = var_experts(xs, expert[:, None], one).double()  # (P, H)
        yr = ref_experts(xs.to(ref_dtype), expert[:, None], one.to(ref_dtype)).double()  # (P, H)
        d = yv - yr  # (P, H)
        e2 = (d * d).sum(-1)  # (P,)
        err_sq.index_add_(0, expert, e2)
        ref_sq.index_add_(0, expert, (yr * yr).sum(-1))
        wsq.index_add_(0, expert, weights * weights * e2)
        count.index_add_(0, expert, torch.ones_like(expert))
        wsum.index_add_(0, expert, weights)
        combined = torch.zeros((T, d.shape[1]), dtype=torch.float64).index_add_(0, token, d * weights[:, None])
        parts.append(combined.norm(dim=-1))  # (T,)
    error = torch.where(count > 0, (err_sq / ref_sq.clamp_min(1e-300)).sqrt(), torch.full_like(err_sq, float("nan")))
    return {"expert_error": error.float(), "expert_tokens": count.to(torch.int32), "expert_weight": wsum.float(),
            "expert_sq": wsq.float(), "experts_part": torch.cat(parts).float()}


def empty_table(n_experts: int, n_tokens: int) -> dict[str, torch.Tensor]:
    """The table's slab of a mode that does not compute it: NaN errors, no tokens."""
    nan = torch.full((n_experts,), float("nan"))
    return {"expert_error": nan, "expert_tokens": torch.zeros(n_experts, dtype=torch.int32),
            "expert_weight": nan.clone(), "expert_sq": nan.clone(), "experts_part": torch.full((n_tokens,), float("nan"))}
