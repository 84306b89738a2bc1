"""The compute-path interface: what form of the weights a path needs, and how a layer runs with them.

A compute path is the arithmetic of a variant (the ``COMPUTE`` part of ``WEIGHTS-COMPUTE``). The
executor (moetrace.tracer.execution.executor) never looks inside one; for each variant it asks
the path, through :class:`ComputePath`:

1. :meth:`ComputePath.weight_form` - per weight *role* (attention linears, router, experts,
   shared expert, dense MLP, norms, embedding, output head), the form the weights must take:
   dequantized and rounded to a torch dtype, or the GGUF block bytes (:class:`BlockWeight`).
   Weight derivation (moetrace.tracer.weights.derive) produces exactly that form.
2. :meth:`ComputePath.prepare` - once per fresh copy of a transformers decoder layer: change the
   module where the path's arithmetic differs from a plain torch forward (swap a linear's or the
   experts' forward for one computing from block bytes, wrap inputs, ...). The simple paths
   change nothing.
3. :meth:`ComputePath.load` - per layer: put that layer's weights, in the form asked for, into
   the (possibly reused) module. The simple paths copy them into the module's own tensors,
   rounded to the dequantization dtype and cast to the arithmetic dtype.
4. :meth:`ComputePath.embed` / :meth:`ComputePath.head` - the token embedding and the output head.

Modules a path prepared are pooled by :attr:`ComputePath.pool_key` and reused across layers of
the same structure, so ``prepare`` runs once per module copy and ``load`` once per layer.

How an engine path plugs in (one new file in this package, nothing else): a ``llamacpp_cpu`` path
sets ``dequants = ()`` and answers ``WeightForm(blocks=True)`` for ``attention``, ``experts``,
``shared_expert`` and ``lm_head`` (norms and the router stay dense float32, as llama.cpp keeps
them F32); its ``prepare`` replaces the forward of each ``nn.Linear`` and of the experts module
with one that quantizes the activations to the weight type's vec_dot type (Q8_K) and computes
integer block dots from the :class:`BlockWeight` bytes that ``load`` stored on the module; its
``head`` does the same for the output head. A KTransformers decode path answers per role:
dense bf16 for attention, 4-bit groups of 64 (re-quantized in ``load``) for other linears,
block bytes for the CPU experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from moetrace.errors import MoetraceError

# Dtype names a path may dequantize weights to, and compute in. torch is imported on first use,
# not here: listing the paths (``moetrace variants``, checking a variant name) must stay fast.
DTYPE_NAMES = ("fp32", "bf16", "fp16")


def torch_dtype(name: str):
    """The torch dtype of a dtype name (``bf16`` -> ``torch.bfloat16``)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def __getattr__(name):
    if name == "DTYPES":  # dtype name -> torch dtype, built on first use
        return {n: torch_dtype(n) for n in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _ComputeDtype:
    """The class attribute ``dtype``: the torch dtype named by the class's ``compute``, resolved on first use.

    A path class may still set ``dtype`` to a torch dtype itself (a plug-in file that imports torch).
    """

    def __get__(self, obj, cls):
        return torch_dtype(cls.compute)

# Weight roles, from GGUF tensor names (standard across families, so no family is named here).
ROLES = ("attention", "router", "experts", "shared_expert", "dense_mlp", "norm", "embedding", "lm_head")


def role_of(gguf_name: str) -> str:
    """The role of a tensor by its GGUF name (``blk.3.ffn_up_exps.weight`` -> ``experts``)."""
    stem = gguf_name.split(".")[-2] if gguf_name.endswith(".weight") or gguf_name.endswith(".bias") else gguf_name
    if stem.endswith("norm") or "_norm" in stem:
        return "norm"
    if stem == "token_embd":
        return "embedding"
    if stem == "output":
        return "lm_head"
    if stem.startswith("ffn_gate_inp") or stem.startswith("exp_probs"):
        return "router"
    if stem.endswith("_exps"):
        return "experts"
    if stem.endswith("_shexp"):
        return "shared_expert"
    if stem.startswith("attn"):
        return "attention"
    return "dense_mlp"


@dataclass(frozen=True)
class WeightForm:
    """The form a path takes one role's weights in.

    Attributes:
        dtype: dense weights, dequantized in float32 and rounded to this dtype.
        blocks: the GGUF block bytes instead (:class:`BlockWeight`); tensors stored as
            F32/F16/BF16 (norms, the router) still come dense, in their stored precision.
    """

    dtype: torch.dtype | None = None
    blocks: bool = False


@dataclass(frozen=True)
class BlockWeight:
    """One weight tensor as GGUF blocks.

    Attributes:
        data: uint8 (n_mat, rows, bytes_per_row): n_mat is 1 for a matrix, E for experts.
        ggml_type: the GGML type name (``Q4_K``).
        shape: the dense shape, (rows, cols) or (E, rows, cols).
    """

    data: np.ndarray
    ggml_type: str
    shape: tuple[int, ...]


class ComputePath:
    """Base of every compute path; the defaults are the dense "dequantize, then torch in ``dtype``" path.

    Class attributes a subclass sets:
        name: the ``COMPUTE`` word in variant names (``fp32``).
        summary: one line for ``moetrace variants``.
        compute: the name of the arithmetic dtype (``fp32``, ``bf16``, ``fp16``); ``dtype`` is its torch
            dtype: activations between layers, the module's tensors.
        dequants: dtype names weights may be dequantized to (``()``: the path takes block bytes only).
        default_dequant: the dequantization dtype when the variant names none.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    compute: ClassVar[str] = "fp32"
    dtype = _ComputeDtype()
    dequants: ClassVar[tuple[str, ...]] = DTYPE_NAMES
    default_dequant: ClassVar[str | None] = None

    def __init__(self, dequant: str | None = None):
        dequant = dequant or self.default_dequant
        if self.dequants and dequant not in self.dequants:
            raise MoetraceError(
                f"compute path {self.name!r} cannot dequantize weights to {dequant!r}; valid: "
                f"{', '.join(d + 'w' for d in self.dequants)}"
            )
        if not self.dequants and dequant:
            raise MoetraceError(f"compute path {self.name!r} takes the GGUF block bytes; it has no {dequant}w form")
        self.dequant = dequant

    @property
    def pool_key(self) -> tuple:
        """Modules prepared by paths with equal keys are interchangeable (the executor pools on it)."""
        return (type(self).__module__, type(self).__qualname__, self.dtype)

    # -- weights --------------------------------------------------------------------------

    def weight_form(self, role: str) -> WeightForm:
        """The form of the weights of ``role`` (one of :data:`ROLES`); default: dense, in the dequant dtype."""
        return WeightForm(dtype=torch_dtype(self.dequant))

    def takes_blocks(self) -> bool:
        """Whether the path takes GGUF block bytes for any role (then it needs the variant's block bytes)."""
        return any(self.weight_form(r).blocks for r in ROLES)

    def round(self, role: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` (dense, any float dtype) rounded to the role's dequant dtype, unless the cast to ``dtype`` does so.

        Copying float32 straight into a tensor of the dequant dtype rounds exactly as ``.to`` does,
        so the intermediate rounding is only needed where the two dtypes differ.
        """
        form = self.weight_form(role).dtype
        return w if form in (None, w.dtype, self.dtype) else w.to(form)

    # -- the decoder layer ---------------------------------------------------------------

    def prepare(self, layer: torch.nn.Module) -> None:
        """Adapt a fresh copy of a decoder layer once (swap forwards); the dense paths change nothing."""

    def load(self, layer: torch.nn.Module, state: dict) -> None:
        """Put one layer's weights into ``layer``, reusing its tensors where it already has them.

        Args:
            layer: a decoder layer module this path prepared; ``layer._moetrace_tensors`` is its
                own tensors by name, or None where none are allocated (the executor sets None
                on fresh and on emptied modules).
            state: name inside the layer -> weight in :meth:`weight_form`; ``state.roles``
                (where present) maps the names to roles.
        """
        import torch

        roles = getattr(state, "roles", {})
        fp32 = getattr(state, "fp32", frozenset())  # held in float32 whatever the path's dtype
        tensors = layer._moetrace_tensors
        if tensors is None:
            tensors = layer.state_dict(keep_vars=True)
            _check_names(tensors, state)
            device = getattr(layer, "_moetrace_device", None)  # the executor's run device (None: the default)
            owned = {k: self._put(torch.empty(v.shape, dtype=torch.float32 if k in fp32 else self.dtype, device=device),
                                  None if k in fp32 else roles.get(k, "other"), v)
                     for k, v in state.items()}
            layer.load_state_dict(owned, strict=True, assign=True)
            layer._moetrace_tensors = layer.state_dict(keep_vars=True)
            return
        _check_names(tensors, state)
        with torch.no_grad():
            for name, t in tensors.items():
                self._put(t, None if name in fp32 else roles.get(name, "other"), state[name])

    def _put(self, dst, role: str | None, w):
        """``dst`` <- ``w`` rounded for ``role`` (None: as it is); a weight still to be dequantized (it has
        ``fill_into``, moetrace.tracer.weights.stream) fills ``dst`` chunk by chunk, with the same rounding."""
        convert = (lambda x: x) if role is None else (lambda x: self.round(role, x))
        if hasattr(w, "fill_into"):
            w.fill_into(dst, convert)
            return dst
        return dst.copy_(convert(w))

    def fills_deferred(self) -> bool:
        """Whether :meth:`load` takes weights still to be dequantized (the executor then streams them):
        true for paths that load through this base class's :meth:`load` unchanged."""
        return type(self).load is ComputePath.load

    # -- outside the layers ---------------------------------------------------------------

    def global_weight(self, role: str, w: torch.Tensor) -> torch.Tensor:
        """An embedding, final norm or head weight (dense, dequantized) as :meth:`embed`/:meth:`head` take it."""
        return self.round(role, w).to(self.dtype)

    def embed(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (T,) -> hidden states (1, T, H) in ``dtype``."""
        import torch

        return torch.nn.functional.embedding(ids, weight).unsqueeze(0)

    def head(self, norm: torch.nn.Module, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output head: hidden (1, T, H) -> logits (T, vocab)."""
        import torch

        return torch.nn.functional.linear(norm(hidden), weight)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dequant={self.dequant!r})"


def _check_names(tensors: dict, state: dict) -> None:
    if tensors.keys() != state.keys():
        raise KeyError(f"state and module differ in {sorted(set(tensors) ^ set(state))[:5]}")
