"""The expert loop engines share: route tokens to experts, run each expert's matmuls, add the weighted outputs.

llama.cpp's ``build_moe_ffn`` (and KTransformers' CPU MoE kernel) weigh each selected expert's
output and add them slot by slot (``experts[0] + experts[1] + ...``), in float32; transformers'
eager experts ``index_add`` them expert by expert in the hidden dtype. :func:`slot_sum` is the
former, with the expert's arithmetic given as a function.
"""

from __future__ import annotations

from typing import Callable

import torch

from moetrace.errors import MoetraceError


def fused_experts(mod, path_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts module's dense ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), or a one-line error."""
    gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)) or getattr(mod, "has_bias", False):
        raise MoetraceError(f"compute path {path_name!r} takes experts as fused gate_up_proj and down_proj matrices "
                            f"without biases; this model's experts module is {type(mod).__name__}")
    return gate_up, down


def slot_sum(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, n_experts: int,
             expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Experts' outputs weighted and added slot by slot in float32.

    Args:
        hidden: (T, H) the MoE block's input.
        top_k_index, top_k_weights: (T, k) chosen experts and their weights.
        n_experts: experts the module holds (indices outside are routers' padding: no expert).
        expert: ``expert(e, x)`` -> expert e's output (t_e, H) on its tokens' inputs x (t_e, H).

    Returns:
        (T, H) float32.
    """
    t, k = top_k_index.shape
    slots = torch.zeros(t, k, hidden.shape[-1], dtype=torch.float32, device=hidden.device)  # (T, k, H)
    for e in torch.unique(top_k_index).tolist():
        if e < 0 or e >= n_experts:
            continue
        tok, pos = torch.where(top_k_index == e)
        y = expert(e, hidden[tok]).to(torch.float32)  # (t_e, H)
        slots[tok, pos] = y * top_k_weights[tok, pos, None].to(torch.float32)
    out = slots[:, 0]
    for s in range(1, k):  # llama.cpp adds the weighted experts slot by slot
        out = out + slots[:, s]
    return out
