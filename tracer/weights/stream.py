"""Dequantized weights produced straight into their destination, a bounded number of rows at a time.

A variant's dense weights are the float32 dequantization of its quantized tensors, rounded to the
module's dtype. Built whole, a layer at Qwen3-30B-A3B's widths is 2.3 GB of float32 that lives
only to be copied into the module's bf16 tensors. A :class:`Dequantizing` weight instead holds the
reference tensor and its GGML type; the compute path's ``load`` asks it to :meth:`~Dequantizing.fill_into`
the module's tensor, and it quantizes, dequantizes, rounds and copies one chunk of rows at a
time (:data:`moetrace.tracer.weights.derive.CHUNK_ELEMENTS`), so memory holds one chunk in
float32 instead of the layer. Every element goes through the same operations as the whole-tensor
path (dequantize to float32, the path's rounding, the copy's cast), so the values are the same bits.

Where transformers holds a tensor in another layout than GGUF's (GPT-OSS's experts: transposed,
(E, in, out), and gate/up interleaved along the last axis), ``split`` gives the destination's parts
as *views* in GGUF's layout (the family's ``to_gguf`` applied to the destination), so the same
row-by-row fill writes straight into the module's tensor through strided views, with no float32
copy of the whole tensor and no transposing copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Dequantizing:
    """A dense weight still to be dequantized: ``parts`` stacked along dim 1 (one part unless fused).

    Attributes:
        parts: per part (reference tensor in GGUF's layout, (rows, cols) or (E, rows, cols), GGUF name,
            GGML type name).
        context: the QuantContext (cache, imatrix) or None.
        shape: the dense shape, as the module holds it (without ``split``: the parts' shapes joined along dim 1).
        split: destination (``shape``) -> one view of it per part, in GGUF's layout (the family's
            ``to_gguf``); None: the parts are row blocks along dim 1.
    """

    parts: tuple
    context: object
    shape: tuple
    split: Callable[[torch.Tensor], list] | None = None

    dtype = torch.float32  # the dtype of what it dequantizes to, as a dense weight's ``dtype``

    def fill_into(self, dst: torch.Tensor, convert: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> None:
        """Write the weight into ``dst`` (of :attr:`shape`, any float dtype): ``dst.copy_(convert(float32 rows))``."""
        if tuple(dst.shape) != tuple(self.shape):
            from moetrace.errors import InternalError

            raise InternalError(f"{self.parts[0][1]}: destination {tuple(dst.shape)}, weight {tuple(self.shape)}")
        for (w, name, type_name), part in zip(self.parts, self._views(dst)):  # each shaped like w, a view into dst
            _fill_part(part if part.ndim == 3 else part.unsqueeze(0), w, name, type_name, self.context, convert)

    def _views(self, dst: torch.Tensor) -> list[torch.Tensor]:
        """One view of ``dst`` per part, shaped like the part; a split that would copy is an internal error."""
        if self.split is None:  # fused parts lie along dim 1, as derive's torch.cat puts them
            starts = [0]
            for w, _, _ in self.parts[:-1]:
                starts.append(starts[-1] + w.shape[1])
            return [dst.narrow(1, at, w.shape[1]) for at, (w, _, _) in zip(starts, self.parts)]
        views = list(self.split(dst))
        if len(views) != len(self.parts):
            from moetrace.errors import InternalError

            raise InternalError(f"{self.parts[0][1]}: the destination splits into {len(views)} parts, the weight has "
                                f"{len(self.parts)}")
        base = dst.untyped_storage().data_ptr()
        for v, (w, name, _) in zip(views, self.parts):
            if v.untyped_storage().data_ptr() != base or tuple(v.shape) != tuple(w.shape):
                from moetrace.errors import InternalError

                raise InternalError(f"{name}: the destination's part {tuple(v.shape)} is not a view shaped like the "
                                    f"weight {tuple(w.shape)}")
        return views

    def dense(self) -> torch.Tensor:
        """The whole float32 tensor (where no destination exists yet, e.g. a prefetch thread)."""
        out = torch.empty(self.shape, dtype=torch.float32)
        self.fill_into(out)
        return out


def _fill_part(dst3: torch.Tensor, w: torch.Tensor, name: str, type_name: str | None, context, convert) -> None:
    """``dst3`` (n_mat, rows, cols) <- ``w`` dequantized from ``type_name``, chunk by chunk."""
    from moetrace.kernels import dequantize
    from moetrace.tracer.weights.derive import FLOAT_TYPES, quantized_stream

    w3 = w if w.ndim == 3 else w.unsqueeze(0)  # (n_mat, rows, cols)
    if type_name is None or type_name == "F32" or type_name in FLOAT_TYPES:
        stored = FLOAT_TYPES.get(type_name or "F32", torch.float32)
        for m in range(w3.shape[0]):  # one matrix at a time: a bounded float32 temporary
            dst3[m].copy_(convert(w3[m].to(stored).to(torch.float32)))
        return
    cols = w.shape[-1]
    for r0, q in quantized_stream(w, name, type_name, context):
        put_rows(dst3, r0, dequantize(torch.from_numpy(q), type_name, cols), convert)  # (n, cols) float32


def put_rows(dst3: torch.Tensor, r0: int, x: torch.Tensor, convert=lambda x: x) -> None:
    """Copy rows ``x`` (n, cols), numbered from ``r0`` across the matrices of ``dst3`` (n_mat, rows, cols)."""
    rows = dst3.shape[1]
    i = 0
    while i < x.shape[0]:  # a chunk may span matrices
        m, r = divmod(r0 + i, rows)
        n = min(rows - r, x.shape[0] - i)
        dst3[m, r:r + n].copy_(convert(x[i:i + n]))
        i += n
