"""Variants: named numeric treatments of the reference model, written ``WEIGHTS-COMPUTE``.

``WEIGHTS`` says what the weights are:

- ``orig``: the checkpoint as it is;
- a llama.cpp file type in lower case (``q8_0``, ``q4_k_m``, ...): each tensor gets the GGML type
  llama.cpp's quantizer would give it, is quantized bit-exactly as ggml does, and dequantized;
- ``pure_TYPE`` (``pure_q4_0``): every quantizable tensor in TYPE (llama.cpp's ``--pure``);
- ``gguf``: the tensors of the GGUF file given with ``--gguf FILE``, dequantized (bit-exact with
  ggml); the file must have the reference's tensor names and shapes.

``COMPUTE`` says the arithmetic: ``fp32``, ``bf16`` or ``fp16`` (weights dequantized to that dtype,
activations and matmuls in it). Routers and norms are never quantized (llama.cpp keeps them F32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moetrace.errors import MoetraceError

COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE = "orig-fp32"


def quantizable_types() -> list[str]:
    """GGML types that moetrace can quantize (their format implements quantize_blocks)."""
    from moetrace.kernels import base

    base._load_formats()
    return sorted(
        name for name, fmt in base.FORMATS.items()
        if type(fmt).quantize_blocks is not base.BlockFormat.quantize_blocks
        and name not in ("F32", "F16", "BF16", "Q8_K", "Q8_1")
    )


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
    return ["orig"] + file_types() + [f"pure_{t.lower()}" for t in quantizable_types()] + ["gguf"]


@dataclass(frozen=True)
class Variant:
    """A parsed, checked variant name.

    Attributes:
        weights: ``orig``, a file type (``q4_k_m``), ``pure_TYPE`` or ``gguf``.
        compute: ``fp32``, ``bf16`` or ``fp16``.
    """

    weights: str
    compute: str

    def __post_init__(self):
        if self.compute not in COMPUTE_DTYPES:
            raise MoetraceError(
                f"unknown compute {self.compute!r} in variant {self.name!r}; valid compute: {', '.join(COMPUTE_DTYPES)}"
            )
        valid = valid_weights()
        if self.weights not in valid:
            raise MoetraceError(
                f"unknown variant weights {self.weights!r} in {self.name!r}; valid weights: {', '.join(valid)}"
            )

    @property
    def name(self) -> str:
        return f"{self.weights}-{self.compute}"

    @property
    def dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute]

    @property
    def pure_type(self) -> str | None:
        return self.weights[len("pure_"):].upper() if self.weights.startswith("pure_") else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """Parse ``WEIGHTS-COMPUTE``; the error lists every valid choice."""
        weights, sep, compute = text.strip().lower().rpartition("-")
        if not sep or not weights:
            raise MoetraceError(
                f"invalid variant {text!r}; expected WEIGHTS-COMPUTE, e.g. pure_q8_0-bf16; "
                f"valid weights: {', '.join(valid_weights())}; valid compute: {', '.join(COMPUTE_DTYPES)}"
            )
        return cls(weights, compute)

    def __str__(self) -> str:
        return self.name


def all_variant_names() -> list[str]:
    return [f"{w}-{c}" for w in valid_weights() for c in COMPUTE_DTYPES]


GRAMMAR = __doc__
