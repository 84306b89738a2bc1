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
# The largest layer count believed: a flipped byte must not make moetrace loop over 2**32 layers.
MAX_LAYERS = 1 << 16


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


# Quantized checkpoints (GPT-OSS's MXFP4 experts) store a weight as uint8 blocks and scales under
# these suffixes; the family's ``packed`` says how they dequantize (moetrace.tracer.sources.packed).
PACKED_SUFFIXES = ("_blocks", "_scales")


def check_weight_dtype(path, name: str, dtype: str) -> None:
    """Weights are floating point: an integer or boolean tensor is no weight moetrace can trace
    (packed quantized weights, uint8 under :data:`PACKED_SUFFIXES`, aside)."""
    if dtype == "U8" and name.endswith(PACKED_SUFFIXES):
        return
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


def check_config(raw: dict, path, what: str = "config") -> None:
    """Fields of ``config.json`` of the right type and range, and consistent with each other."""
    for key, low in CONFIG_INTS.items():
        v = raw.get(key)
        if (v is not None or key in raw) and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise MoetraceError(f"{what} {str(path)!r}: {key} is {v!r}; it must be an integer of at least {low}")
    for key, low in CONFIG_FLOATS.items():
        v = raw.get(key)
        if (v is not None or key in raw) and (not isinstance(v, (int, float)) or isinstance(v, bool)
                                              or not math.isfinite(v) or v <= low):
            raise MoetraceError(f"{what} {str(path)!r}: {key} is {v!r}; it must be a finite number above {low}")
    heads, kv = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and kv and heads % kv:
        raise MoetraceError(f"{what} {str(path)!r}: num_attention_heads {heads} is not a multiple of "
                            f"num_key_value_heads {kv}")
    hidden = raw.get("hidden_size")
    if "head_dim" not in raw and isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise MoetraceError(f"{what} {str(path)!r}: hidden_size {hidden} is not a multiple of num_attention_heads "
                            f"{heads}, and no head_dim is given")


def one_line(e: BaseException) -> str:
    """An exception's message folded onto one line (a library's multi-line message, for a MoetraceError)."""
    return " ".join(str(e).split()) or type(e).__name__


def check_family_config(cfg: dict, family, path, what: str = "config") -> None:
    """The MoE sizes of a config (``cfg``: the config as a dict) make sense together.

    An expert count of 0 or a top-k larger than the expert count would otherwise surface as a
    torch error deep inside the router.
    """
    k = family.keys
    experts, top_k = cfg.get(k.experts), cfg.get(k.top_k)
    for key, v in ((k.experts, experts), (k.top_k, top_k), (k.expert_width, cfg.get(k.expert_width))):
        if (v is not None or key in cfg) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise MoetraceError(f"{what} {str(path)!r}: {key} is {v!r:.60}; it must be an integer of at least 1")
    step = cfg.get(k.sparse_step) if k.sparse_step else None
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
        raise MoetraceError(f"{what} {str(path)!r}: {k.sparse_step} is {step!r:.60}; it must be an integer of at "
                            f"least 1")
    dense = cfg.get(k.dense_layers) if k.dense_layers else None
    if dense is not None and (not isinstance(dense, list)
                              or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense)):
        raise MoetraceError(f"{what} {str(path)!r}: {k.dense_layers} is {dense!r:.60}; it must be a list of layer "
                            f"indices")
    if isinstance(experts, int) and isinstance(top_k, int) and top_k > experts:
        raise MoetraceError(f"{what} {str(path)!r}: {k.top_k} is {top_k}, more than the {experts} experts "
                            f"({k.experts}); a token cannot choose more experts than there are")


def check_layer_count(names, family, n_layers: int, where: str, key: str = "num_hidden_layers") -> None:
    """The decoder layers that have tensors are exactly 0..n_layers-1, as the config says.

    Checked on open, so a corrupted layer count is refused before anything loops over it.
    """
    import re

    if n_layers > MAX_LAYERS:
        raise MoetraceError(f"{where}: {key} is {n_layers}, more than any model has ({MAX_LAYERS})")
    before, _, after = family.layer_prefix(987654321).partition("987654321")
    pattern = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))
    layers = {int(m.group(1)) for m in map(pattern.match, names) if m}
    if layers and max(layers) >= n_layers:
        raise MoetraceError(f"{where} has tensors of layer {max(layers)}, but {key} is {n_layers}")
    absent = sorted(set(range(n_layers)) - layers)
    if absent:
        raise MoetraceError(f"{where} has no tensors of layer {absent[0]}, but {key} is {n_layers}")


def expected_layer_shapes(family, config, layer: int | None = None) -> dict[str, tuple[int, ...]]:
    """Name inside a decoder layer -> shape, as a source's ``layer_state`` returns it (experts fused,
    transposed where transformers holds them so); with ``layer``, the tensors that layer has
    (``family.layer_tensors``), else the family's MoE layer's."""
    return family.hf_layer_shapes(config, layer)


def check_layer(state: dict, family, config, layer: int, where: str) -> None:
    """Layer ``layer`` read from a source has the tensors and shapes its config implies.

    The one place where a checkpoint whose weights disagree with its config is caught, before
    transformers' ``load_state_dict`` would fail with a multi-line size-mismatch traceback.
    Dense layers of families that have them are left to the family (their tensor set differs).
    """
    if layer in family.dense_layers(config):
        return
    check_shapes(state, expected_layer_shapes(family, config, layer), f"{where}: layer {layer}")


def check_global(tensor, name: str, family, config, where: str) -> None:
    """A tensor outside the layers (embedding, final norm, output head) has its config's shape."""
    sym = family.global_tensors.get(name)
    if sym is None:
        return
    d = family.dims(config)
    want = tuple(s if isinstance(s, int) else d[s] for s in sym)
    if tuple(tensor.shape) != want:
        raise MoetraceError(f"{where}: tensor {name!r} is {tuple(tensor.shape)}, the config makes it {want}")


# -- GGUF -----------------------------------------------------------------------------------
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16")
# Hyperparameters under ``{arch}.``: suffix -> minimum. Counts and widths are integers; llama.cpp
# writes them as UINT32, and a float or string there is a damaged file, not a model.
GGUF_INTS = {"block_count": 1, "context_length": 1, "embedding_length": 1, "feed_forward_length": 0,
             "expert_feed_forward_length": 1, "expert_shared_feed_forward_length": 0, "expert_count": 1,
             "expert_used_count": 1, "vocab_size": 1, "attention.head_count": 1, "attention.head_count_kv": 1,
             "attention.key_length": 1, "attention.value_length": 1}
GGUF_FLOATS = ("attention.layer_norm_rms_epsilon", "rope.freq_base")


def check_gguf_metadata(path, arch: str, field) -> None:
    """Numeric hyperparameters of a GGUF file have the right type and range.

    Args:
        field: ``field(key)`` -> the value or None (absent keys are the family's to require).
    """
    for suffix, low in GGUF_INTS.items():
        key = f"{arch}.{suffix}"
        v = field(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise MoetraceError(f"GGUF file {str(path)!r}: metadata {key} is {v!r:.60}; it must be an integer of "
                                f"at least {low}")
    for suffix in GGUF_FLOATS:
        key = f"{arch}.{suffix}"
        v = field(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                              or v <= 0):
            raise MoetraceError(f"GGUF file {str(path)!r}: metadata {key} is {v!r:.60}; it must be a finite "
                                f"number above 0")
    n = field(f"{arch}.block_count")
    if isinstance(n, int) and n > MAX_LAYERS:
        raise MoetraceError(f"GGUF file {str(path)!r}: metadata {arch}.block_count is {n}, more than any model "
                            f"has ({MAX_LAYERS})")


def check_gguf_extents(path, tensors: list, data_start: int, size: int) -> None:
    """Every tensor's declared type, shape and offset fit the file, and no two tensors share bytes.

    Args:
        tensors: ``(name, type name, ne (ggml order), offset from data_start)`` per tensor.
        data_start: the offset of the tensor data section; ``size``: the file's size in bytes.
    """
    import gguf

    spans = []
    for name, type_name, ne, offset in tensors:
        qt = gguf.GGMLQuantizationType[type_name]
        block, type_size = gguf.GGML_QUANT_SIZES[qt]
        row = int(ne[0]) if len(ne) else 1
        if row % block:
            raise MoetraceError(f"GGUF file {str(path)!r}: tensor {name} is {type_name}, whose blocks hold {block} "
                                f"values, but its rows hold {row}")
        n_bytes = math.prod(int(x) for x in ne) // block * type_size
        start = data_start + int(offset)
        if start + n_bytes > size:
            raise MoetraceError(f"GGUF file {str(path)!r} is truncated: tensor {name} ({type_name}) needs bytes "
                                f"{start}..{start + n_bytes}, the file has {size}")
        spans.append((start, start + n_bytes, name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise MoetraceError(f"GGUF file {str(path)!r}: tensor {n1} (bytes {s1}..{e1}) overlaps tensor {n0} "
                                f"(bytes {s0}..{e0}); a declared type or shape is wrong")



def check_gguf_tensors(path, family, config, shapes: dict, types: dict) -> None:
    """The tensor table of a GGUF file agrees with its metadata and its family.

    Args:
        shapes: GGUF name -> shape (HF order, as GGUFReader reverses ggml's ``ne``).
        types: GGUF name -> GGML type name.

    Raises:
        MoetraceError: block_count disagreeing with the ``blk.N`` tensors present, a tensor the
            family does not make or one it needs that is missing, a shape that disagrees with the
            metadata (expert count, widths), or a norm stored in a non-float type.
    """
    import re

    from moetrace.kernels import base

    p, arch = str(path), family.gguf_arch
    n = int(config.num_hidden_layers)
    layers = {int(m.group(1)) for m in map(re.compile(r"blk\.(\d+)\.").match, shapes) if m}
    if layers and max(layers) >= n:
        raise MoetraceError(f"GGUF file {p!r} has tensors of layer {max(layers)}, but its metadata "
                            f"{arch}.block_count is {n}")
    absent = sorted(set(range(n)) - layers)
    if absent:
        raise MoetraceError(f"GGUF file {p!r} has no tensors of layer {absent[0]}, but its metadata "
                            f"{arch}.block_count is {n}")
    want = family.gguf_specs(config)
    experts = family.n_experts(config)
    for name, shape in want.items():
        if name not in shapes:
            raise MoetraceError(f"GGUF file {p!r} lacks tensor {name} {tuple(shape)}, which {family.name} needs")
        got = tuple(shapes[name])
        if got != tuple(shape):
            if len(got) == 3 and len(shape) == 3 and got[0] != shape[0]:
                raise MoetraceError(f"GGUF file {p!r}: tensor {name} holds {got[0]} experts, but its metadata "
                                    f"{arch}.expert_count is {experts}")
            raise MoetraceError(f"GGUF file {p!r}: tensor {name} is {got}, its metadata makes it {tuple(shape)}")
        if len(shape) == 1 and types[name] not in GGUF_FLOAT_TYPES:
            raise MoetraceError(f"GGUF file {p!r}: tensor {name} is {types[name]}; a norm or other 1-D tensor "
                                f"must be one of {', '.join(GGUF_FLOAT_TYPES)}")
    extra = [name for name in shapes if name not in want]
    if extra:
        raise MoetraceError(f"GGUF file {p!r} has tensor {extra[0]}, which {family.name} (GGUF {arch}) does not "
                            f"make")
    base._load_formats()
    for name, t in types.items():
        if t not in base.FORMATS:
            raise MoetraceError(f"GGUF file {p!r}: tensor {name} is {t}, a type moetrace cannot read; readable: "
                                f"{', '.join(sorted(base.FORMATS))}")
