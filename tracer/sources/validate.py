"""The one boundary where files a user hands moetrace are checked before anything is read from them.

Every model file moetrace reads goes through here on open: JSON files (``config.json``,
``model.safetensors.index.json``), safetensors headers, and the tensors of a layer against the
shapes its config implies. A file whose content contradicts its own declarations (a header that
runs past the end, tensors that overlap, a size that disagrees with dtype x shape, integers where
weights must be floating point) is refused with one line naming the file, the tensor or key, and
what is wrong, never read as garbage or zeros.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from moetrace.errors import MoetraceError

# safetensors dtype -> bytes per element; floating-point ones can be weights.
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 << 20  # safetensors' own limit on a header's size


def read_json(path, what: str) -> dict:
    """A JSON object from ``path``; any failure is one line naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoetraceError(f"{what} {str(p)!r} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise MoetraceError(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise MoetraceError(f"{what} {str(p)!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise MoetraceError(f"{what} {str(p)!r} holds a JSON {type(obj).__name__}, not an object")
    return obj


def weight_map(index: dict, path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> shard file name (a plain name)."""
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise MoetraceError(f"index {str(path)!r} has no 'weight_map' object of tensor names to shard files")
    for name, shard in wm.items():
        if not isinstance(shard, str) or not shard or os.path.basename(shard) != shard:
            raise MoetraceError(f"index {str(path)!r}: tensor {name!r} maps to {shard!r}, not a shard file name")
    return dict(wm)


def safetensors_header(path) -> tuple[dict, int]:
    """The checked header of a safetensors file and the offset where its data starts.

    Returns:
        (tensors: name -> {"dtype", "shape", "data_offsets"}, data start); ``__metadata__`` removed.

    Raises:
        MoetraceError: a header that is cut short or not JSON, an unknown dtype, a tensor whose
            byte range disagrees with dtype x shape, overlaps another, or passes the file's end.
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise MoetraceError(f"safetensors file {str(p)!r} is truncated or not safetensors: its header length "
                                f"{n} does not fit a file of {size} bytes")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoetraceError(f"safetensors file {str(p)!r} has a corrupted header (not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise MoetraceError(f"safetensors file {str(p)!r} has a corrupted header (not a JSON object)")
    header.pop("__metadata__", None)
    spans = [(_tensor_span(p, name, info), name) for name, info in header.items()]
    _check_spans(p, sorted(spans), size - 8 - n)
    return header, 8 + n


def _tensor_span(p: Path, name: str, info) -> tuple[int, int]:
    ok = isinstance(info, dict) and info.get("dtype") in ST_ITEMSIZE
    shape, offs = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
    if not (ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
        raise MoetraceError(f"safetensors file {str(p)!r}: tensor {name!r} has a malformed entry {info!r:.120}")
    start, end = offs
    want = math.prod(shape) * ST_ITEMSIZE[info["dtype"]]
    if start < 0 or end - start != want:
        raise MoetraceError(f"safetensors file {str(p)!r}: tensor {name!r} ({info['dtype']} {shape}) needs "
                            f"{want} bytes but its data_offsets {offs} hold {end - start}")
    return start, end


def _check_spans(p: Path, spans: list, data_len: int) -> None:
    pos = 0
    for (start, end), name in spans:
        if start < pos:
            raise MoetraceError(f"safetensors file {str(p)!r}: tensor {name!r} overlaps the tensor before it")
        pos = end
    if pos > data_len:
        raise MoetraceError(f"safetensors file {str(p)!r} is truncated: its tensors need {pos} data bytes, "
                            f"the file holds {data_len}")


def check_weight_dtype(path, name: str, dtype: str) -> None:
    """Weights are floating point: an integer or boolean tensor is no weight moetrace can trace."""
    if dtype not in WEIGHT_DTYPES:
        raise MoetraceError(f"{str(path)!r}: tensor {name!r} is {dtype}; weights must be one of "
                            f"{', '.join(WEIGHT_DTYPES)}")


def check_shapes(state: dict, expected: dict, where: str) -> None:
    """Every tensor of ``state`` has the shape the model's config implies (``expected``: name -> shape).

    Raises:
        MoetraceError: a tensor missing, unexpected, or of another shape, named with ``where``.
    """
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the config does not make"
        raise MoetraceError(f"{where} {what}")
    for name, want in expected.items():
        got = tuple(state[name].shape)
        if got != tuple(want):
            raise MoetraceError(f"{where}: tensor {name!r} is {got}, the config makes it {tuple(want)}")


# config.json fields every family shares: name -> (type, minimum). Family-specific fields are
# checked by the family (hooks/arch), which knows them.
CONFIG_INTS = {"hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
               "vocab_size": 1, "max_position_embeddings": 1, "head_dim": 1, "intermediate_size": 1}
CONFIG_FLOATS = {"rms_norm_eps": 0.0, "rope_theta": 0.0}


def check_config(raw: dict, path) -> None:
    """Fields of ``config.json`` of the right type and range, and consistent with each other."""
    for key, low in CONFIG_INTS.items():
        v = raw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise MoetraceError(f"config {str(path)!r}: {key} is {v!r}; it must be an integer of at least {low}")
    for key, low in CONFIG_FLOATS.items():
        v = raw.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                              or v <= low):
            raise MoetraceError(f"config {str(path)!r}: {key} is {v!r}; it must be a finite number above {low}")
    heads, kv = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and kv and heads % kv:
        raise MoetraceError(f"config {str(path)!r}: num_attention_heads {heads} is not a multiple of "
                            f"num_key_value_heads {kv}")
    hidden = raw.get("hidden_size")
    if "head_dim" not in raw and isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise MoetraceError(f"config {str(path)!r}: hidden_size {hidden} is not a multiple of num_attention_heads "
                            f"{heads}, and no head_dim is given")
