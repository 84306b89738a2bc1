"""llama.cpp file-type recipes: which GGML type each tensor of a model gets.

A llama.cpp *file type* (``Q4_K_M``, ``Q3_K_S``, ...) is not one type but a mixture: attention V,
FFN down and the output matrix get more bits on some layers. :func:`assign_types` reproduces
``llama_tensor_get_type`` of ``src/llama-quant.cpp`` (read at ggml-org/llama.cpp commit 007dbbf3)
for the file types in :data:`FILE_TYPES`, including the order-dependent counters, the
``n_expert == 8`` and ``n_gqa`` rules, tied embeddings and the row-size fallbacks.

Tensors are described by :class:`TensorSpec` with GGUF names and **numpy-order shapes**: the
order of ``gguf.GGUFReader`` tensors' ``.data`` for float tensors and of HF ``[out, in]``
weights, so the last dimension is the row length (ggml's ``ne[0]``). ``ffn_gate_exps`` is
``(E, F, H)``, ``ffn_down_exps`` ``(E, H, F)``, ``token_embd`` ``(vocab, H)``. Use
:meth:`TensorSpec.from_ne` for ggml-order shapes (``ReaderTensor.shape``).

Per-tensor overrides (llama-quantize's ``--tensor-type PATTERN=TYPE``) are modelled as
``llama_tensor_get_type`` applies them: for a tensor llama.cpp quantizes, the first override
whose pattern is found in the name (``re.search``; llama.cpp uses ``std::regex_search``) gives
its type, the file type's rule is skipped for it (so its attn_v/ffn counters do not advance, as in
llama.cpp), and the row-size fallback still applies; ``--pure`` does not turn them off.

``mxfp4_moe`` is llama.cpp's MXFP4_MOE (``LLAMA_FTYPE_MOSTLY_MXFP4_MOE``, same commit): expert
tensors (3-D with more than one matrix, ``ne[2] > 1``) MXFP4, the output head (and a tied token
embedding) and every other quantized tensor Q8_0; it has no attn_v/ffn counters and no fallback.
``mxfp4`` is not a llama.cpp file type but the layout GPT-OSS checkpoints ship in: the same expert
tensors MXFP4, every other tensor as the source stores it.

Not modelled: the IQ*/TQ*/NVFP4 file types, ``--output-tensor-type`` / ``--token-embedding-type``,
``--leave-output-tensor`` and pruning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable

from moetrace.kernels.layouts import BLOCK_SIZES
from moetrace.kernels.errors import FormatError

# llama.cpp file types moetrace reproduces: name -> the file type's default tensor type
# (llama_ftype_get_default_type).
_MIXES: dict[str, str] = {
    "q2_k": "Q2_K",
    "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K",
    "q4_k_s": "Q4_K", "q4_k_m": "Q4_K",
    "q5_k_s": "Q5_K", "q5_k_m": "Q5_K",
    "q6_k": "Q6_K",
    "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
    "mxfp4_moe": "MXFP4",
    "mxfp4": "MXFP4",  # expert tensors only (see the module docstring); not a llama.cpp file type
}
# File types that quantize the expert tensors alone and keep every other tensor's source type.
_EXPERTS_ONLY = ("mxfp4",)
# Types a pure_TYPE file type may use (llama-quantize --pure): the ones moetrace has block formats for.
_PURE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4")

FILE_TYPES: tuple[str, ...] = tuple(_MIXES) + tuple(f"pure_{t.lower()}" for t in _PURE_TYPES)
"""Every valid file-type name, lower case: the llama.cpp mixtures, then ``pure_TYPE``."""

# tensor_type_fallback: a K type whose block does not divide the row falls back to a 32-block type.
# (llama.cpp before the fallback moved into tensor_type_fallback sent Q2_K/Q3_K to IQ4_NL instead of Q4_0;
# the legacy types and Q8_0 have no fallback in either version.)
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# Substrings that keep a tensor out of quantization (tensor_allows_quantization), besides the
# checks on the name's end, "_norm.weight", the router and the dimension count.
_NEVER_QUANTIZED = (
    "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")

# sscanf(name, "blk.%d.", ...): the layer number after "blk."; it skips blanks and takes a sign.
_BLK = re.compile(r"blk\.\s*([+-]?\d+)")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model, as llama.cpp's quantizer sees it.

    Attributes:
        name: the GGUF name, e.g. ``"blk.3.ffn_down_exps.weight"``.
        shape: numpy order, last dimension = row length: ``(E, H, F)`` for ``ffn_down_exps``.
        dtype: the tensor's type in the source file (a ``BLOCK_SIZES`` key); tensors llama.cpp
            does not quantize keep it. ``convert_hf_to_gguf`` writes norms and routers as F32.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "F32"

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if not shape or any(s <= 0 for s in shape):
            raise FormatError(f"tensor {self.name!r}: shape {self.shape} must be non-empty with positive sizes")
        object.__setattr__(self, "shape", shape)
        if self.dtype.upper() not in BLOCK_SIZES:
            raise FormatError(f"tensor {self.name!r}: unknown type {self.dtype!r}; valid: {', '.join(BLOCK_SIZES)}")
        object.__setattr__(self, "dtype", self.dtype.upper())

    @classmethod
    def from_ne(cls, name: str, ne: Iterable[int], dtype: str = "F32") -> "TensorSpec":
        """A spec from a ggml-order shape (``ne``, as ``gguf.ReaderTensor.shape`` holds it)."""
        return cls(name, tuple(reversed([int(n) for n in ne])), dtype)

    @property
    def n_per_row(self) -> int:
        return self.shape[-1]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_dims(self) -> int:
        # ggml_n_dims: trailing ne of 1 (leading numpy dims of 1) do not count.
        dims = len(self.shape)
        while dims > 1 and self.shape[len(self.shape) - dims] == 1:
            dims -= 1
        return dims


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters ``llama_tensor_get_type`` consults.

    Attributes:
        n_layer: decoder layers (``block_count``).
        n_expert: routed experts per MoE layer, 0 for a dense model.
        n_head: attention heads.
        n_head_kv: key/value heads; ``n_gqa = n_head // n_head_kv``.
        arch: the GGUF architecture name (``"qwen3moe"``, ``"llama"``, ...). Only ``"falcon"`` and
            a ``"llama"`` 70B (80 layers, GQA) change the rules.
    """

    n_layer: int
    n_expert: int = 0
    n_head: int = 1
    n_head_kv: int = 1
    arch: str = ""

    def __post_init__(self):
        for key in ("n_layer", "n_head"):
            if getattr(self, key) < 1:
                raise FormatError(f"ModelShape.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("n_expert", "n_head_kv"):
            if getattr(self, key) < 0:
                raise FormatError(f"ModelShape.{key} must not be negative, got {getattr(self, key)}")

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        # llama.cpp's load_hparams: LLaMA with 80 layers is 70B when it uses GQA (65B otherwise);
        # with 8 experts (Mixtral) the type comes from the layer count as 8x7B/8x22B instead.
        return self.arch == "llama" and self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv


@dataclass(frozen=True)
class FileType:
    """A parsed file type: its canonical name, default tensor type and whether it is pure."""

    name: str
    default_type: str
    pure: bool


def parse_file_type(name: str | FileType) -> FileType:
    """Parse a file-type name (case-insensitive): ``"Q4_K_M"``, ``"q8_0"``, ``"pure_q4_k"``.

    Raises:
        FormatError: for an unknown name; the message lists :data:`FILE_TYPES`.
    """
    if isinstance(name, FileType):
        return name
    key = str(name).strip().lower()
    if key in _MIXES:
        return FileType(key, _MIXES[key], pure=False)
    if key.startswith("pure_") and key[5:].upper() in _PURE_TYPES:
        return FileType(key, key[5:].upper(), pure=True)
    raise FormatError(f"unknown llama.cpp file type {name!r}; valid file types: {', '.join(FILE_TYPES)}")


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # Integer arithmetic as in C; (i - n/8) % 3 is never negative here (i >= n/8 by then).
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _category(name: str) -> str:
    # tensor_get_category: the first matching substring wins, in this order.
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def allows_quantization(spec: TensorSpec) -> bool:
    """Whether llama.cpp quantizes this tensor at all (``tensor_allows_quantization``)."""
    name = spec.name
    if spec.n_dims < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    if name in _NEVER_QUANTIZED_EXACT:
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


def _layer_order(name: str) -> tuple[int, str]:
    # llama_model_loader's weight_name_comparer: by "blk.N." layer (-1 without one), then by name.
    m = _BLK.match(name)
    return (int(m.group(1)) if m else -1, name)


class _State:
    """quantize_state_impl: counters that make attn_v (and dense ffn_*) depend on tensor order."""

    def __init__(self, specs: list[TensorSpec], shape: ModelShape, has_imatrix: bool):
        self.shape = shape
        self.has_imatrix = has_imatrix
        cats = [_category(s.name) for s in specs]
        self.n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
        self.tied = "output" not in cats
        self.i_attention_wv = 0
        self.i_ffn = {"ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}

    def layer_info(self, cat: str, name: str) -> tuple[int, int]:
        n_layer = self.shape.n_layer
        if max(1, self.shape.n_expert) > 1:
            # Experts are not stored in layer order in every model, so MoE models read the layer from the name.
            m = _BLK.match(name)
            if not m:
                raise FormatError(f"tensor {name!r}: cannot read its layer (expected a name starting 'blk.N.')")
            i_layer = int(m.group(1))
            if not 0 <= i_layer < n_layer:
                raise FormatError(f"tensor {name!r}: layer {i_layer} is outside [0, {n_layer}) of this model")
            return i_layer, n_layer
        return self.i_ffn[cat], n_layer


def _is_expert_tensor(spec: TensorSpec, cat: str, arch: str) -> bool:
    """MXFP4_MOE's test for an expert tensor: ``ne[2] > 1`` (bailingmoe3's 3-D MLA projections excepted)."""
    if len(spec.shape) < 3 or spec.shape[-3] <= 1:
        return False
    return arch != "bailingmoe3" or cat in ("ffn_up", "ffn_gate", "ffn_down")


def _mixture_type(st: _State, spec: TensorSpec, ft: FileType, cat: str) -> str:
    """llama_tensor_get_type_impl restricted to the K, legacy and MXFP4_MOE file types."""
    f, t, hp = ft.name, ft.default_type, st.shape
    falcon = hp.arch == "falcon"
    if f in _EXPERTS_ONLY:
        return t if _is_expert_tensor(spec, cat, hp.arch) else spec.dtype
    if cat == "output" or (st.tied and cat == "token_embd"):
        if f == "mxfp4_moe":
            return "Q8_0"
        if falcon or spec.n_per_row % BLOCK_SIZES[t][0]:
            return "Q8_0"
        return "Q6_K" if t != "Q8_0" else t
    if f == "mxfp4_moe":  # before the attn_v and ffn rules: no counter moves
        return t if _is_expert_tensor(spec, cat, hp.arch) else "Q8_0"
    if cat == "token_embd":
        return t  # only IQ/TQ file types change an untied token_embd
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        # attn_qkv also lands here: llama.cpp's own attn_qkv branch comes after this one and is never reached.
        i, n = st.i_attention_wv, st.n_attention_wv
        if f == "q2_k":
            t = "Q4_K" if hp.n_gqa >= 4 else "Q3_K"
        elif f == "q3_k_m":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif f == "q3_k_l":
            t = "Q5_K"
        elif f in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            t = "Q6_K"
        elif f == "q4_k_s" and i < 4:
            t = "Q5_K"
        if hp.is_70b and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"  # 70B shares attn_v across 8 heads: more bits cost little
        if hp.n_expert == 8:
            t = "Q8_0"
        st.i_attention_wv += 1
        return t
    if cat == "attn_k":
        return "Q8_0" if hp.n_expert == 8 else t
    if cat == "ffn_down":
        i, n = st.layer_info(cat, spec.name)
        if f == "q2_k":
            t = "Q3_K"
        elif f == "q3_k_m":
            t = "Q5_K" if i < n // 16 else ("Q4_K" if not falcon or _use_more_bits(i, n) else "Q3_K")
        elif f == "q3_k_l":
            t = "Q4_K" if falcon else "Q5_K"
        elif f == "q4_k_m":
            if falcon:
                t = "Q6_K" if i < n // 16 else ("Q5_K" if _use_more_bits(i, n) else "Q4_K")
            elif _use_more_bits(i, n):
                t = "Q6_K"
        elif f == "q5_k_m" and _use_more_bits(i, n):
            t = "Q6_K"
        elif f == "q4_k_s" and not falcon and i < n // 8:
            t = "Q5_K"
        elif f in ("q4_0", "q5_0") and st.has_imatrix and i < n // 8:
            # Only with an imatrix, so that quantizing without one gives the same file as it always did.
            t = "Q4_1" if f == "q4_0" else "Q5_1"
        st.i_ffn[cat] += 1
        return t
    if cat == "attn_output":
        if not falcon:
            if hp.n_expert == 8:
                if f in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"):
                    t = "Q5_K"
            else:
                t = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(f, t)
        elif f == "q3_k_l":
            t = "Q4_K"
        return t
    if cat in ("ffn_gate", "ffn_up"):
        st.layer_info(cat, spec.name)  # raises for an MoE tensor without a readable layer, as llama.cpp does
        st.i_ffn[cat] += 1
    return t


def _fallback(spec: TensorSpec, t: str) -> str:
    """tensor_type_fallback: a type whose block does not divide the row length."""
    n = spec.n_per_row
    if n % BLOCK_SIZES[t][0] == 0:
        return t
    if t not in _FALLBACK:
        raise FormatError(
            f"tensor {spec.name!r}: rows of {n} elements are not a multiple of the {BLOCK_SIZES[t][0]}-element "
            f"blocks of {t}, and llama.cpp defines no fallback for {t} (llama-quantize stops here)"
        )
    t2 = _FALLBACK[t]
    return t2 if n % BLOCK_SIZES[t2][0] == 0 else "F16"


def match_override(name: str, overrides) -> tuple[str, str] | None:
    """The first ``(pattern, TYPE)`` of ``overrides`` whose pattern is found in ``name``, or None."""
    for pattern, t in overrides or ():
        if re.search(pattern, name):
            return pattern, t
    return None


def assign_types(
    specs: Iterable[TensorSpec], ftype: str | FileType, shape: ModelShape, *, has_imatrix: bool = False,
    overrides=(),
) -> dict[str, str]:
    """The GGML type llama-quantize gives each tensor for a file type.

    Args:
        specs: every tensor of the model (the full list matters: ``output.weight``'s presence
            decides tied embeddings, and the attn_v count sets the use_more_bits layers).
        ftype: a file-type name (see :data:`FILE_TYPES`) or a parsed :class:`FileType`.
        shape: the model's hyperparameters.
        has_imatrix: whether an importance matrix is given (changes Q4_0/Q5_0 ffn_down).
        overrides: ``((pattern, TYPE), ...)``, llama-quantize's ``--tensor-type`` in order
            (see :func:`match_override`).

    Returns:
        ``{name: type_name}`` for every tensor, in the order llama.cpp processes them.

    Raises:
        FormatError: unknown file type, duplicate names, an MoE FFN tensor without a readable
            layer, a tensor whose rows no type can take, or an override that takes no tensor
            (llama-quantize ignores it; here it is almost always a typo).
    """
    ft = parse_file_type(ftype)
    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise FormatError(f"duplicate tensor names: {', '.join(dup)}")
    st = _State(specs, shape, has_imatrix)
    out: dict[str, str] = {}
    used = set()
    for spec in sorted(specs, key=lambda s: _layer_order(s.name)):
        if not allows_quantization(spec):
            out[spec.name] = spec.dtype
            continue
        hit = match_override(spec.name, overrides)
        if hit is not None:  # manual: llama.cpp skips llama_tensor_get_type_impl (and its counters)
            used.add(hit[0])
            t = hit[1]
        else:
            t = ft.default_type if ft.pure else _mixture_type(st, spec, ft, _category(spec.name))
        out[spec.name] = _fallback(spec, t)
    check_overrides_used(overrides, used, specs)
    return out


def check_overrides_used(overrides, used: set, specs) -> None:
    """Refuse an override that took no tensor: a typo, or a pattern an earlier override shadows."""
    for pattern, t in overrides or ():
        if pattern not in used:
            example = next((s.name for s in specs if allows_quantization(s) and s.name.startswith("blk.")),
                           next((s.name for s in specs), ""))
            raise FormatError(
                f"tensor type override {pattern}={t.lower()} matches no quantized tensor of this model (or only "
                f"tensors an earlier override already takes); patterns are searched in GGUF names such as "
                f"{example!r} (see `moetrace recipe`)"
            )


@dataclass(frozen=True)
class TensorAssignment:
    """One row of a recipe summary: a tensor, its type and its size in bytes."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    n_elements: int
    n_bytes: int
    override: str | None = None  # the pattern of the override that took this tensor
    recipe_type: str | None = None  # the file type's own type for it (differs from type_name where overridden)


@dataclass(frozen=True)
class RecipeSummary:
    """A file type applied to a model: per-tensor types and sizes, totals, bits per weight.

    Sizes are tensor data only, as llama-quantize reports them (no GGUF header, metadata or
    alignment padding).
    """

    file_type: str
    tensors: tuple[TensorAssignment, ...]
    overrides: tuple = ()
    total_bytes: int = field(init=False)
    total_elements: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "total_bytes", sum(t.n_bytes for t in self.tensors))
        object.__setattr__(self, "total_elements", sum(t.n_elements for t in self.tensors))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / self.total_elements

    def bytes_by_type(self) -> dict[str, int]:
        """Total bytes per GGML type, largest first."""
        acc: dict[str, int] = {}
        for t in self.tensors:
            acc[t.type_name] = acc.get(t.type_name, 0) + t.n_bytes
        return dict(sorted(acc.items(), key=lambda kv: -kv[1]))

    def format_table(self) -> str:
        """A plain-text table: one line per tensor, then the totals."""
        lines = [f"{'tensor':44} {'shape':>22} {'type':>5} {'MiB':>10}"]
        for t in self.tensors:
            lines.append(f"{t.name:44} {str(t.shape):>22} {t.type_name:>5} {t.n_bytes / 2**20:10.2f}")
        lines.append(f"{self.file_type}: {self.total_bytes / 2**30:.3f} GiB ({self.total_bytes / 1e9:.3f} GB), "
                     f"{self.total_elements / 1e9:.3f} B weights, {self.bits_per_weight:.3f} bits per weight")
        return "\n".join(lines)


def tensor_bytes(spec: TensorSpec, type_name: str) -> int:
    """Bytes of ``spec``'s data in ``type_name``: rows times the row size."""
    elems, size = BLOCK_SIZES[type_name]
    if spec.n_per_row % elems:
        raise FormatError(f"tensor {spec.name!r}: rows of {spec.n_per_row} do not split into {type_name} blocks")
    return spec.n_elements // spec.n_per_row * (spec.n_per_row // elems * size)


def summarize(
    specs: Iterable[TensorSpec], ftype: str | FileType, shape: ModelShape, *, has_imatrix: bool = False,
    overrides=(),
) -> RecipeSummary:
    """:func:`assign_types` with sizes: per tensor the type and bytes, totals and bits per weight.

    With ``overrides``, each row also says which override took it and the type the file type's
    own rule gives it (``recipe_type``).
    """
    ft = parse_file_type(ftype)
    specs = list(specs)
    by_name = {s.name: s for s in specs}
    types = assign_types(specs, ft, shape, has_imatrix=has_imatrix, overrides=overrides)
    plain = assign_types(specs, ft, shape, has_imatrix=has_imatrix) if overrides else types
    rows = []
    for n, t in types.items():
        hit = match_override(n, overrides) if overrides and allows_quantization(by_name[n]) else None
        rows.append(TensorAssignment(n, by_name[n].shape, t, by_name[n].n_elements, tensor_bytes(by_name[n], t),
                                     override=hit[0] if hit else None, recipe_type=plain[n]))
    return RecipeSummary(ft.name, tuple(rows), tuple(overrides or ()))


def model_shape_of(family, config) -> ModelShape:
    """The :class:`ModelShape` of a model, its sizes read through its family (``moetrace.hooks.arch``)."""
    return ModelShape(n_layer=int(config.num_hidden_layers), n_expert=family.n_experts(config),
                      n_head=int(config.num_attention_heads), n_head_kv=int(config.num_key_value_heads),
                      arch=family.gguf_arch)


def family_specs(family, config, dtype: str = "BF16") -> tuple[list[TensorSpec], ModelShape]:
    """The tensors of a model's GGUF file, as its family names and shapes them, and its :class:`ModelShape`.

    Args:
        family: a ``moetrace.hooks.arch.Family``.
        config: a transformers config (or any object with its attributes).
        dtype: the stored type of 2-D and 3-D weights (as a BF16 conversion writes them); 1-D
            tensors and the router are F32, as convert_hf_to_gguf keeps them.
    """
    specs = [
        TensorSpec(name, shape, "F32" if len(shape) < 2 or "ffn_gate_inp" in name else dtype)
        for name, shape in family.gguf_specs(config).items()
    ]
    return specs, model_shape_of(family, config)
