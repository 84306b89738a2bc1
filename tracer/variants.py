"""Variants: named numeric treatments of the reference model, written ``WEIGHTS-COMPUTE`` or ``WEIGHTS-DEQw-COMPUTE``.

``WEIGHTS`` says what the weights are:

- ``orig``: the checkpoint as it is;
- a llama.cpp file type in lower case (``q8_0``, ``q4_k_m``, ...): each tensor gets the GGML type
  llama.cpp's quantizer would give it, is quantized bit-exactly as ggml does, and dequantized;
- ``pure_TYPE`` (``pure_q4_0``): every quantizable tensor in TYPE (llama.cpp's ``--pure``);
- ``gguf``: the tensors of the GGUF file given with ``--gguf FILE``, dequantized (bit-exact with
  ggml); the file must have the reference's tensor names and shapes;
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
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from moetrace.errors import MoetraceError
from moetrace.kernels.compute.base import DTYPE_NAMES

# Nothing here imports torch at module level: parsing a variant name (and refusing a bad one)
# must answer before torch loads, in well under the 2 s a user waits for a typo's error.
DEQUANT_SUFFIX = "w"  # ``bf16w``: the dequantization word in a variant name
REFERENCE = "orig-fp32"


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
    """

    weights: str
    compute: str
    dequant: str | None = None

    def __post_init__(self):
        from moetrace.kernels import compute

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
        try:
            path = compute.get(self.compute, self.dequant)
        except MoetraceError as e:
            raise MoetraceError(f"variant {self.name!r}: {e}") from None
        object.__setattr__(self, "dequant", path.dequant)  # resolved: equal variants compare equal

    @property
    def name(self) -> str:
        """The canonical name: the ``DEQw`` word only where it differs from the path's default."""
        from moetrace.kernels import compute

        default = compute.PATHS[self.compute].default_dequant if self.compute in compute.PATHS else None
        if self.dequant and self.dequant != default:
            return f"{self.weights}-{self.dequant}{DEQUANT_SUFFIX}-{self.compute}"
        return f"{self.weights}-{self.compute}"

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
        return {"weights": self.weights, "compute": self.compute, "dequant": self.dequant}

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """Parse ``WEIGHTS-COMPUTE`` or ``WEIGHTS-DEQw-COMPUTE``; the error lists every valid choice."""
        rest, sep, compute = text.strip().lower().rpartition("-")
        head, sep2, word = rest.rpartition("-")
        dequant = None
        if sep2 and head and word.endswith(DEQUANT_SUFFIX):
            if word[: -len(DEQUANT_SUFFIX)] not in DTYPE_NAMES and (head in valid_weights()
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
        return cls(rest, compute, dequant)

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
