r"""Variants: named numeric treatments of the reference model, written ``WEIGHTS-COMPUTE`` or ``WEIGHTS-DEQw-COMPUTE``.

``WEIGHTS`` says what the weights are:

- ``orig``: the checkpoint as it is;
- a llama.cpp file type in lower case (``q8_0``, ``q4_k_m``, ...): each tensor gets the GGML type
  llama.cpp's quantizer would give it, is quantized bit-exactly as ggml does, and dequantized;
- ``pure_TYPE`` (``pure_q4_0``): every quantizable tensor in TYPE (llama.cpp's ``--pure``);
- ``mxfp4``: the expert matrices in MXFP4 (bit-exact with ggml), every other tensor as the checkpoint
  has it, the way GPT-OSS checkpoints ship; ``mxfp4_moe`` is llama.cpp's MXFP4_MOE file type (expert
  matrices MXFP4, every other quantized tensor Q8_0);
- ``gguf``: the tensors of the GGUF file given with ``--gguf FILE``, dequantized (bit-exact with
  ggml), or as the file's own block bytes under a compute path that takes blocks
  (``gguf-llamacpp_cpu``); the file must have the reference's tensor names and shapes;
- ``gguf_NAME``: the tensors of the GGUF file given with ``--gguf NAME=FILE`` (repeat ``--gguf``
  for several files in one run: ``--gguf a=A.gguf --gguf b=B.gguf --variant gguf_a-bf16
  --variant gguf_b-bf16``). NAME is lower-case letters, digits and ``_``, starting with a letter.

``COMPUTE`` names a compute path, the arithmetic (moetrace.kernels.compute): ``fp32``, ``bf16``
or ``fp16`` run transformers' modules in that dtype (activations and matmuls).

``DEQw`` (optional) is the dtype the weights are dequantized to, when it differs from the
path's own: ``fp32w``, ``bf16w`` or ``fp16w``. Weights are dequantized in float32, rounded to
it (every weight: norms and router too, as a model loaded in that dtype holds them), then cast
to the arithmetic dtype. Without it a path dequantizes to its default, the compute dtype for the
simple paths:

- ``q4_k_m-bf16``: dequantize to bf16 and compute in bf16;
- ``q4_k_m-bf16w-fp32``: dequantize to bf16, compute in fp32 (the rounding of the weights alone);
- ``q4_k_m-bf16w-bf16`` is the same variant as ``q4_k_m-bf16`` and is named so.

Routers and norms are never quantized (llama.cpp keeps them F32).

Per-tensor type overrides (llama-quantize's ``--tensor-type PATTERN=TYPE``) follow the weights,
each after a ``+``: ``WEIGHTS+PATTERN=TYPE[+PATTERN=TYPE...][-DEQw]-COMPUTE``, e.g.

- ``q4_k_m+blk.9.ffn_down_exps=q8_0-bf16``: Q4_K_M, but layer 9's expert down matrices in Q8_0;
- ``q4_k_m+ffn_down_exps=q6_k-bf16``: every layer's;
- ``q4_k_m+blk\.(1|2)\.attn_v=q8_0-bf16``: a regular expression (quote it in a shell).

As in llama.cpp (src/llama-quant.cpp, llama_tensor_get_type, read at ggml-org/llama.cpp
007dbbf3): PATTERN is a regular expression searched for (not matched whole) in each GGUF tensor
name (``blk.9.ffn_down_exps.weight``); the first override whose pattern is found wins, and it
replaces the file type's rule for that tensor (the rule's position counters then skip the tensor,
as llama.cpp's do); tensors llama.cpp never quantizes (norms, router) are left alone, and a type
whose block does not divide the rows falls back as llama.cpp's do. Patterns are lower-cased, as
llama-quantize does; TYPE is a GGML type name, any case (``q8_0``, ``q6_k``, ``f16``, ``bf16``).
The overrides take a file type or ``pure_TYPE``. A pattern that is not a valid regular expression,
a type moetrace cannot write, or (once a model is known) a pattern that matches no quantized
tensor is an error; llama-quantize ignores the last silently, moetrace refuses the typo.

Parsing: COMPUTE is the text after the last ``-``, a ``DEQw`` word may precede it, the weights
are the text before the first ``+``, and each override is the shortest text ending in ``=TYPE``
followed by ``+`` or the end; so patterns may hold ``-``, ``+`` and ``|`` (a pattern holding
``=TYPE+`` itself cannot be written). The canonical name keeps the overrides in order (order
matters: the first match wins) and drops a repeated pattern, which could never match.

Store names (``RUN/VARIANT.zarr``) are the canonical name where every pattern is made of
``a-z 0-9 _ .``; a pattern with any other character (``\ ( ) | [ ] * ? ^ $``, ...) is written
``~`` and the first 10 hex digits of its SHA-256 (``q4_k_m+~3f2a...=q8_0-bf16``), and a name
longer than 180 characters puts all its overrides under one such hash. The store's ``variant``
attribute always holds the full canonical name.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

from moetrace.errors import MoetraceError
from moetrace.kernels.compute.base import DTYPE_NAMES

# Nothing here imports torch at module level: parsing a variant name (and refusing a bad one)
# must answer before torch loads, in well under the 2 s a user waits for a typo's error.
DEQUANT_SUFFIX = "w"  # ``bf16w``: the dequantization word in a variant name
REFERENCE = "orig-fp32"
OVERRIDE_SEP = "+"  # ``q4_k_m+PATTERN=TYPE-bf16``
FLOAT_OVERRIDE_TYPES = ("F32", "F16", "BF16")
_SAFE_PATTERN = re.compile(r"[a-z0-9_.]+")
_MAX_STORE_NAME = 180


def __getattr__(name):
    if name == "COMPUTE_DTYPES":  # dtype name -> torch dtype (for callers that map a compute name to its dtype)
        from moetrace.kernels.compute.base import DTYPES

        return DTYPES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quantizable_types() -> list[str]:
    """GGML types that moetrace can quantize: every type of the layout table its kernels implement
    (tests/kernels check this list against the format registry's quantizers)."""
    from moetrace.kernels.layouts import C_TYPES

    return sorted(C_TYPES)


def file_types() -> list[str]:
    """llama.cpp file types (lower case), offered once moetrace can quantize every type a recipe may use.

    A recipe can reach any K type or legacy type through its per-tensor rules and row-size
    fallbacks, so file types appear together when all of them are available.
    """
    try:
        from moetrace.kernels import recipes
    except ImportError:
        return []
    needed = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
    if not needed <= set(quantizable_types()):
        return []
    return [ft.lower() for ft in recipes.FILE_TYPES if not ft.lower().startswith("pure")]


def valid_weights() -> list[str]:
    return ["orig"] + file_types() + [f"pure_{t.lower()}" for t in quantizable_types()] + ["gguf", "gguf_NAME"]


GGUF_PREFIX = "gguf_"  # gguf_NAME: the file of --gguf NAME=FILE
GGUF_NAME = re.compile(r"[a-z][a-z0-9_]*")


def gguf_name_of(weights: str) -> str | None:
    """The --gguf name a weights word refers to: "" for ``gguf``, NAME for ``gguf_NAME``, None otherwise."""
    if weights == "gguf":
        return ""
    if weights.startswith(GGUF_PREFIX) and GGUF_NAME.fullmatch(weights[len(GGUF_PREFIX):]):
        return weights[len(GGUF_PREFIX):]
    return None


def override_types() -> list[str]:
    """GGML types an override may name: the float types and every type moetrace can quantize."""
    return list(FLOAT_OVERRIDE_TYPES) + quantizable_types()


def parse_override(text: str) -> tuple[str, str]:
    """``PATTERN=TYPE`` (llama-quantize's ``--tensor-type``) -> (lower-case pattern, upper-case type).

    The split is at the last ``=`` (types hold none). Raises MoetraceError, one line, for a
    missing part, an invalid regular expression or a type moetrace cannot write.
    """
    pattern, sep, type_name = text.strip().rpartition("=")
    if not sep:
        raise MoetraceError(f"invalid tensor type override {text!r}; expected PATTERN=TYPE, e.g. ffn_down_exps=q8_0")
    pattern = pattern.lower()  # llama-quantize lower-cases the pattern (tools/quantize/quantize.cpp)
    if not pattern:
        raise MoetraceError(f"tensor type override {text!r} has no tensor name or pattern before '='")
    t = type_name.strip().upper()
    valid = override_types()
    if t not in valid:
        raise MoetraceError(f"unknown GGML type {type_name!r} in tensor type override {text!r}; valid types: "
                            f"{', '.join(x.lower() for x in valid)}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise MoetraceError(f"tensor type override {text!r}: {pattern!r} is not a valid regular expression ({e})") \
            from None
    return pattern, t


def _split_overrides(text: str, whole: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``WEIGHTS+P=T+P=T`` -> (weights, ((pattern, TYPE), ...))."""
    weights, sep, rest = text.partition(OVERRIDE_SEP)
    if not sep:
        return weights, ()
    out = []
    # Each override: the shortest text ending in =TYPE that is followed by + or the end.
    item = re.compile(r"(.+?=[a-z0-9_]+)(?:\+|$)", re.S)
    pos = 0
    while pos < len(rest):
        m = item.match(rest, pos)
        if not m:
            raise MoetraceError(f"invalid tensor type override {rest[pos:]!r} in variant {whole!r}; expected "
                                f"WEIGHTS+PATTERN=TYPE-COMPUTE, e.g. q4_k_m+blk.9.ffn_down_exps=q8_0-bf16")
        out.append(parse_override(m.group(1)))
        pos = m.end()
    if rest.endswith(OVERRIDE_SEP) or not out:
        raise MoetraceError(f"variant {whole!r} ends its overrides with '+'; expected WEIGHTS+PATTERN=TYPE-COMPUTE")
    return weights, tuple(out)


def split_weights(text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A weights part without compute, ``q4_k_m+blk.9.ffn_down_exps=q8_0`` -> ("q4_k_m", overrides)."""
    t = text.strip().lower()
    return _split_overrides(t, text)


def canonical_overrides(overrides) -> tuple[tuple[str, str], ...]:
    """Overrides checked and in canonical form: (pattern, TYPE) pairs in order, a repeated pattern dropped."""
    out, seen = [], set()
    for o in overrides or ():
        pattern, t = parse_override(o if isinstance(o, str) else f"{o[0]}={o[1]}")
        if pattern not in seen:
            seen.add(pattern)
            out.append((pattern, t))
    return tuple(out)


def overrides_text(overrides) -> str:
    """``+P=t+P=t`` (types lower case), as a variant name writes them; empty for none."""
    return "".join(f"{OVERRIDE_SEP}{p}={t.lower()}" for p, t in overrides)


def _hash(text: str) -> str:
    return "~" + hashlib.sha256(text.encode()).hexdigest()[:10]


def compute_names() -> list[str]:
    """Every compute path name (moetrace.kernels.compute registry)."""
    from moetrace.kernels import compute

    return compute.names()


@dataclass(frozen=True)
class Variant:
    """A parsed, checked variant name.

    Attributes:
        weights: ``orig``, a file type (``q4_k_m``), ``pure_TYPE`` or ``gguf``.
        compute: the compute path's name (``fp32``, ``bf16``, ``fp16``, ...).
        dequant: the dtype name weights are dequantized to (``bf16``), or None for a path that
            takes block bytes; None when constructing means the path's default.
        overrides: per-tensor types, ``((pattern, TYPE), ...)`` in order (first match wins);
            ``PATTERN=TYPE`` strings are accepted when constructing.
    """

    weights: str
    compute: str
    dequant: str | None = None
    overrides: tuple = ()

    def __post_init__(self):
        from moetrace.kernels import compute

        object.__setattr__(self, "overrides", canonical_overrides(self.overrides))
        paths = compute_names()
        if self.compute not in paths:
            raise MoetraceError(
                f"unknown compute {self.compute!r} in variant {self.name!r}; valid compute: {', '.join(paths)}"
            )
        valid = valid_weights()
        if self.weights not in valid and gguf_name_of(self.weights) is None:
            raise MoetraceError(
                f"unknown variant weights {self.weights!r} in {self.name!r}; valid weights: {', '.join(valid)}"
            )
        if self.overrides and (self.weights == "orig" or gguf_name_of(self.weights) is not None):
            raise MoetraceError(
                f"variant {self.name!r}: tensor type overrides apply to a file type or pure_TYPE (as llama-quantize's "
                f"--tensor-type does), not to {self.weights!r}; e.g. q4_k_m{overrides_text(self.overrides)}-{self.compute}"
            )
        try:
            path = compute.get(self.compute, self.dequant)
        except MoetraceError as e:
            raise MoetraceError(f"variant {self.name!r}: {e}") from None
        object.__setattr__(self, "dequant", path.dequant)  # resolved: equal variants compare equal

    @property
    def name(self) -> str:
        """The canonical name: the ``DEQw`` word only where it differs from the path's default."""
        from moetrace.kernels import compute

        return self._named(self.weights + overrides_text(self.overrides))

    def _named(self, weights: str) -> str:
        from moetrace.kernels import compute

        default = compute.PATHS[self.compute].default_dequant if self.compute in compute.PATHS else None
        if self.dequant and self.dequant != default:
            return f"{weights}-{self.dequant}{DEQUANT_SUFFIX}-{self.compute}"
        return f"{weights}-{self.compute}"

    @property
    def store_name(self) -> str:
        """The name of this variant's store folder (``RUN/STORE_NAME.zarr``): the canonical name where every
        pattern is made of ``a-z 0-9 _ .``, else with such patterns hashed (see the module docstring)."""
        parts = [(p if _SAFE_PATTERN.fullmatch(p) else _hash(p), t) for p, t in self.overrides]
        name = self._named(self.weights + overrides_text(parts))
        if len(name) > _MAX_STORE_NAME:
            name = self._named(self.weights + OVERRIDE_SEP + _hash(overrides_text(self.overrides)))
        return name

    @functools.cached_property
    def path(self):
        """The compute path object (a ``moetrace.kernels.compute.ComputePath``)."""
        from moetrace.kernels import compute

        return compute.get(self.compute, self.dequant)

    @property
    def dtype(self):
        """The arithmetic dtype: the dtype hidden states flow in between layers."""
        return self.path.dtype

    @property
    def gguf_name(self) -> str | None:
        """The ``--gguf`` file this variant's weights come from: "" (plain ``--gguf FILE``), NAME, or None."""
        return gguf_name_of(self.weights)

    @property
    def pure_type(self) -> str | None:
        return self.weights[len("pure_"):].upper() if self.weights.startswith("pure_") else None

    def to_dict(self) -> dict:
        return {"weights": self.weights, "compute": self.compute, "dequant": self.dequant,
                "overrides": [list(o) for o in self.overrides]}

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        d = dict(d)
        d["overrides"] = tuple(tuple(o) for o in d.get("overrides", ()))
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """Parse ``WEIGHTS[+PATTERN=TYPE...][-DEQw]-COMPUTE``; the error lists every valid choice."""
        rest, sep, compute = text.strip().lower().rpartition("-")
        head, sep2, word = rest.rpartition("-")
        dequant = None
        if sep2 and head and word.endswith(DEQUANT_SUFFIX) and "=" not in word:
            if word[: -len(DEQUANT_SUFFIX)] not in DTYPE_NAMES and (head.partition(OVERRIDE_SEP)[0] in valid_weights()
                                                                    or gguf_name_of(head) is not None):
                raise MoetraceError(
                    f"unknown dequantization {word!r} in variant {text!r}; valid DEQw: "
                    f"{', '.join(d + DEQUANT_SUFFIX for d in DTYPE_NAMES)}"
                )
            if word[: -len(DEQUANT_SUFFIX)] in DTYPE_NAMES:
                rest, dequant = head, word[: -len(DEQUANT_SUFFIX)]
        if not sep or not rest:
            raise MoetraceError(
                f"invalid variant {text!r}; expected WEIGHTS-COMPUTE or WEIGHTS-DEQw-COMPUTE, e.g. pure_q8_0-bf16 or "
                f"q4_k_m-bf16w-fp32; valid weights: {', '.join(valid_weights())}; valid compute: "
                f"{', '.join(compute_names())}; valid DEQw: {', '.join(d + DEQUANT_SUFFIX for d in DTYPE_NAMES)}"
            )
        weights, overrides = _split_overrides(rest, text)
        return cls(weights, compute, dequant, overrides)

    def __str__(self) -> str:
        return self.name


def all_variant_names() -> list[str]:
    """Every ``WEIGHTS-COMPUTE`` name (each also takes a ``DEQw`` word; see the grammar)."""
    return [f"{w}-{c}" for w in valid_weights() for c in compute_names() if w != "gguf_NAME"]


def dequant_names(compute: str) -> list[str]:
    """The ``DEQw`` words compute path ``compute`` takes."""
    from moetrace.kernels import compute as C

    return [d + DEQUANT_SUFFIX for d in C.PATHS[compute].dequants] if compute in compute_names() else []


GRAMMAR = __doc__
