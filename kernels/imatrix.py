"""llama.cpp importance-matrix files: read both formats ``llama-imatrix`` writes, write the GGUF one.

An importance matrix holds, per weight tensor, the mean of the squared activations that met
each input column: the ``quant_weights`` ggml's quantizers weigh their error with. llama.cpp
writes it in two formats (tools/imatrix/imatrix.cpp), and ``llama-quantize`` turns both into
the same values (tools/quantize/quantize.cpp, common/imatrix-loader.cpp):

* **GGUF** (the default since 2025): key ``general.type = "imatrix"``, ``imatrix.datasets``
  (string array), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and per tensor
  ``NAME.in_sum2`` (F32, ggml ne ``(n_per_row, n_mat)``: the sums of squared activations),
  ``NAME.counts`` (F32, ne ``(1, n_mat)``: activations summed per matrix) and optionally
  ``NAME.in_sum`` (plain sums). ``n_mat`` is the expert count for a 3-D expert tensor, else 1.
  Value = ``in_sum2 / round(count)``; a matrix with count 0 (an expert no token reached) gets 1.
* **legacy** ``.dat``, little-endian: ``int32 n_entries``; per entry ``int32 len``, ``len`` bytes
  of name, ``int32 ncall``, ``int32 nval``, ``nval`` float32 (already ``mean * ncall``); then,
  optionally, ``int32 last_chunk``, ``int32 len`` and the dataset name. Value = stored / ncall
  (stored as is when ncall <= 0). Expert tensors store all experts flat; the file does not say
  how many, so the reader needs ``n_expert`` to split them.

Returned values are float32: ``(n_per_row,)`` for a 2-D weight, ``(n_expert, n_per_row)`` for an
expert tensor, keyed by the GGUF tensor name (``blk.0.ffn_down_exps.weight``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from moetrace.kernels.errors import FormatError

_GGUF_MAGIC = b"GGUF"
_SUFFIXES = (".in_sum2", ".counts", ".in_sum")


@dataclass
class Imatrix:
    """A loaded importance matrix.

    Attributes:
        values: ``{tensor name: float32 array}``, ``(n_per_row,)`` or ``(n_expert, n_per_row)``:
            what llama-quantize passes to the quantizer.
        counts: ``{tensor name: float64 array (n_mat,)}``: activation counts (GGUF), or ``ncall``
            repeated (legacy).
        means: ``{tensor name: float32 array}`` of plain activation means, where the file has
            ``in_sum`` tensors (GGUF files of newer llama.cpp only).
        datasets: the calibration dataset names recorded in the file.
        chunk_count: chunks the matrix was computed on (0 where unknown).
        chunk_size: tokens per chunk (0 where unknown, always for legacy files).
        legacy: whether it came from a legacy ``.dat`` file.
    """

    values: dict[str, np.ndarray]
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    means: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False


def read_imatrix(path: str | os.PathLike, n_expert: int | None = None) -> dict[str, np.ndarray]:
    """The importance values of an imatrix file (either format), keyed by GGUF tensor name.

    Args:
        path: a ``.gguf`` or legacy ``.dat`` file written by ``llama-imatrix``.
        n_expert: experts per MoE layer; needed only to split the expert entries of a legacy file.

    Returns:
        ``{name: float32 array}``: ``(n_per_row,)`` per 2-D weight, ``(n_expert, n_per_row)`` per
        expert tensor.

    Raises:
        FormatError: a missing, truncated or corrupt file (the message names the file and what is wrong).
    """
    return load_imatrix(path, n_expert=n_expert).values


def load_imatrix(path: str | os.PathLike, n_expert: int | None = None) -> Imatrix:
    """Like :func:`read_imatrix`, with counts, datasets and chunk information."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) == _GGUF_MAGIC:
                return _load_gguf(path)
            f.seek(0)
            data = f.read()
    except OSError as e:
        raise FormatError(f"cannot read imatrix file {str(path)!r}: {e.strerror or e}") from e
    return _load_legacy(path, data, n_expert)


class _Cursor:
    """Little-endian reads from bytes that fail with a sentence naming the file and the field."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            have = len(self.data) - self.pos
            raise FormatError(
                f"imatrix file {str(self.path)!r} is truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"{have} remain (file size {len(self.data)})"
            )
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _load_legacy(path: Path, data: bytes, n_expert: int | None) -> Imatrix:
    cur = _Cursor(path, data)
    n_entries = cur.i32("the entry count")
    if n_entries < 1:
        raise FormatError(f"imatrix file {str(path)!r} is neither GGUF nor a legacy imatrix: "
                          f"its entry count is {n_entries}")
    values: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        where = f"entry {i + 1} of {n_entries}"
        name_len = cur.i32(f"the name length of {where}")
        if not 0 < name_len <= 4096:
            raise FormatError(f"imatrix file {str(path)!r} is corrupt: {where} has a name length of {name_len}")
        raw = cur.take(name_len, f"the name of {where}")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"imatrix file {str(path)!r} is corrupt: the name of {where} is not UTF-8: {raw[:40]!r}")
        ncall = cur.i32(f"the call count of {name!r}")
        nval = cur.i32(f"the value count of {name!r}")
        if nval < 1:
            raise FormatError(f"imatrix file {str(path)!r} is corrupt: entry {name!r} has {nval} values")
        if name in values:
            raise FormatError(f"imatrix file {str(path)!r} is corrupt: entry {name!r} appears twice")
        stored = np.frombuffer(cur.take(4 * nval, f"the {nval} values of {name!r}"), dtype="<f4")
        # The writer stored mean * ncall (ggml's old accumulation); llama-quantize divides it back.
        vals = (stored / np.float32(ncall)).astype(np.float32) if ncall > 0 else stored.astype(np.float32)
        if "_exps" in name:
            if n_expert is None:
                raise FormatError(
                    f"imatrix file {str(path)!r} is a legacy file: expert entry {name!r} holds {nval} values for all "
                    f"experts together and the file does not say how many there are; pass n_expert"
                )
            if nval % n_expert:
                raise FormatError(f"imatrix entry {name!r} in {str(path)!r} has {nval} values, "
                                  f"not a multiple of n_expert={n_expert}")
            vals = vals.reshape(n_expert, nval // n_expert)
        values[name] = vals
        counts[name] = np.full(vals.shape[0] if vals.ndim == 2 else 1, float(ncall))
    out = Imatrix(values, counts, legacy=True)
    if cur.pos < len(data):
        # Trailer: the chunk count and the dataset name (absent in the oldest files).
        out.chunk_count = cur.i32("the chunk count after the entries")
        ds_len = cur.i32("the dataset name length")
        if not 0 <= ds_len <= 1 << 20:
            raise FormatError(f"imatrix file {str(path)!r} is corrupt: the dataset name length is {ds_len}")
        ds = cur.take(ds_len, "the dataset name")
        if ds_len:
            out.datasets.append(ds.decode("utf-8", errors="replace"))
        if cur.pos != len(data):
            raise FormatError(f"imatrix file {str(path)!r} is corrupt: {len(data) - cur.pos} unexpected bytes after "
                              f"the dataset name at offset {cur.pos}")
    return out


def _load_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct/numpy errors on truncation
        size = path.stat().st_size
        raise FormatError(f"imatrix file {str(path)!r} is not a readable GGUF file (truncated or corrupt? "
                          f"{size} bytes): {e}") from e
    parts: dict[str, dict[str, object]] = {}
    for t in reader.tensors:
        for suffix in _SUFFIXES:
            if t.name.endswith(suffix):
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = t
                break
    if not parts:
        raise FormatError(f"imatrix file {str(path)!r} holds no '.in_sum2'/'.counts' tensors: "
                          f"not an importance matrix (tensors: {', '.join(t.name for t in reader.tensors[:5])})")
    out = Imatrix({}, legacy=False)
    for name in sorted(parts):
        p = parts[name]
        if ".in_sum2" not in p or ".counts" not in p:
            missing = ".in_sum2" if ".in_sum2" not in p else ".counts"
            raise FormatError(f"imatrix file {str(path)!r}: entry {name!r} has no {name + missing!r} tensor")
        arrays = {}
        for suffix, t in p.items():
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise FormatError(f"imatrix file {str(path)!r}: {t.name!r} is {t.tensor_type.name}, must be F32")
            arrays[suffix] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        sums, cnt = arrays[".in_sum2"], arrays[".counts"]
        n_mat = cnt.size
        if n_mat == 0 or sums.size % n_mat:
            raise FormatError(f"imatrix file {str(path)!r}: entry {name!r} has {sums.size} sums for {n_mat} counts")
        if ".in_sum" in arrays and arrays[".in_sum"].size != sums.size:
            raise FormatError(f"imatrix file {str(path)!r}: entry {name!r} has {arrays['.in_sum'].size} plain sums "
                              f"and {sums.size} squared sums")
        sums = sums.reshape(n_mat, -1)
        # llama.cpp rounds counts to integers (std::lround) before dividing.
        c = np.floor(np.abs(cnt.astype(np.float64)) + 0.5) * np.sign(cnt)
        c32 = c.astype(np.float32)[:, None]
        safe = np.where(c32 > 0, c32, np.float32(1))
        vals = np.where(c32 > 0, sums / safe, np.float32(1)).astype(np.float32)  # unreached experts weigh 1
        out.values[name] = vals[0] if n_mat == 1 else vals
        out.counts[name] = c
        if ".in_sum" in arrays:
            means = np.where(c32 > 0, arrays[".in_sum"].reshape(n_mat, -1) / safe, np.float32(0)).astype(np.float32)
            out.means[name] = means[0] if n_mat == 1 else means
    out.datasets = _gguf_strings(reader, "imatrix.datasets")
    out.chunk_count = _gguf_int(reader, "imatrix.chunk_count")
    out.chunk_size = _gguf_int(reader, "imatrix.chunk_size")
    return out


def _gguf_strings(reader, key: str) -> list[str]:
    f = reader.fields.get(key)
    if f is None:
        return []
    return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]


def _gguf_int(reader, key: str) -> int:
    f = reader.fields.get(key)
    return int(f.parts[f.data[0]][0]) if f is not None and f.data else 0


def write_imatrix_gguf(
    path: str | os.PathLike,
    in_sum2: Mapping[str, np.ndarray],
    counts: Mapping[str, np.ndarray | float],
    *,
    in_sum: Mapping[str, np.ndarray] | None = None,
    datasets: Sequence[str] = (),
    chunk_count: int = 0,
    chunk_size: int = 512,
) -> None:
    """Write an importance matrix in llama.cpp's GGUF imatrix format.

    Args:
        path: the file to write.
        in_sum2: ``{tensor name: sums of squared activations}``, ``(n_per_row,)`` for a 2-D
            weight or ``(n_expert, n_per_row)`` for an expert tensor.
        counts: ``{tensor name: activation count}``: a number for a 2-D weight, ``(n_expert,)``
            for an expert tensor. The values llama-quantize uses are ``in_sum2 / counts``.
        in_sum: optional plain activation sums, shaped like ``in_sum2``.
        datasets: calibration dataset names.
        chunk_count: chunks the sums cover.
        chunk_size: tokens per chunk.

    Raises:
        FormatError: mismatched names or shapes, or non-finite values.
    """
    import gguf

    if set(in_sum2) != set(counts):
        raise FormatError(f"in_sum2 and counts name different tensors: {sorted(set(in_sum2) ^ set(counts))}")

    class _Writer(gguf.GGUFWriter):
        def add_architecture(self) -> None:
            pass  # llama-imatrix stores no general.architecture

    w = _Writer(path, arch="")
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, list(datasets))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(chunk_count))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
    for name in sorted(in_sum2):  # llama-imatrix sorts the names too
        s = np.asarray(in_sum2[name], dtype=np.float32)
        c = np.asarray(counts[name], dtype=np.float32).reshape(-1)
        if s.ndim not in (1, 2) or (s.ndim == 1 and c.size != 1) or (s.ndim == 2 and s.shape[0] != c.size):
            raise FormatError(f"imatrix entry {name!r}: sums of shape {s.shape} do not fit {c.size} counts; "
                              f"expected (n_per_row,) with one count or (n_expert, n_per_row) with n_expert counts")
        if not (np.isfinite(s).all() and np.isfinite(c).all()):
            raise FormatError(f"imatrix entry {name!r} holds NaN or Inf")
        s2 = s.reshape(c.size, -1)  # ggml ne (n_per_row, n_mat)
        w.add_tensor(name + ".in_sum2", s2)
        w.add_tensor(name + ".counts", c.reshape(c.size, 1))  # ne (1, n_mat)
        if in_sum is not None and name in in_sum:
            a = np.asarray(in_sum[name], dtype=np.float32)
            if a.size != s2.size:
                raise FormatError(f"imatrix entry {name!r}: in_sum has {a.size} values, in_sum2 {s2.size}")
            w.add_tensor(name + ".in_sum", a.reshape(s2.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
