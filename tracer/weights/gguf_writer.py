"""Write a quantized GGUF file of a model, as llama-quantize would: names, shapes, types, metadata.

``moetrace quantize`` calls :func:`write_gguf`. The file has llama.cpp's tensor names
(``blk.N.ffn_down_exps.weight``), shapes (ggml ``ne``; ``gguf.GGUFReader`` shows HF's
[out, in]), the GGML type :func:`moetrace.tracer.weights.derive.tensor_types` assigns to each tensor
for the file type, block bytes from :mod:`moetrace.kernels` (bit-exact with ggml), and the
metadata llama.cpp and transformers' GGUF loader read, under the model family's architecture name
(see :func:`gguf_metadata`; the hyperparameters come from the family, :mod:`moetrace.hooks.arch`).

Memory stays bounded: the header and tensor table are written first (sizes are known from the
types), then the data one tensor at a time in llama.cpp's order (tensors outside the layers,
then layer by layer), each quantized a bounded number of rows at a time (3-D expert tensors one
or a few experts at a time; HF's fused ``gate_up_proj`` is split into ``ffn_gate_exps`` and
``ffn_up_exps``), and written as it comes. Quantized bytes go through the quantized-weight cache,
so quantizing a model a run has already used only copies bytes. The file is written under a
temporary name and renamed when complete.

Tokenizer: GGUF files made here record ``tokenizer.ggml.model = "none"`` (llama.cpp's
"no vocabulary") with ``{arch}.vocab_size``: moetrace does not convert tokenizers, and the
built-in models' byte-level vocabulary has no GGUF tokenizer type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moetrace.errors import MoetraceError

# llama.cpp file type name -> general.file_type (llama_ftype). A pure_TYPE file is what
# `llama-quantize --pure` writes for the file type whose default type is TYPE.
_FTYPE_IDS = {
    "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13,
    "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
    # LLAMA_FTYPE_MOSTLY_MXFP4_MOE; also for ``mxfp4`` (MXFP4 experts, the rest as stored), which is no
    # llama.cpp file type: its files are mostly MXFP4 MoE weights too.
    "mxfp4_moe": 38, "mxfp4": 38,
}
_PURE_FTYPE = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0", "Q2_K": "q2_k",
               "Q3_K": "q3_k_m", "Q4_K": "q4_k_m", "Q5_K": "q5_k_m", "Q6_K": "q6_k", "MXFP4": "mxfp4_moe"}


def ftype_id(file_type: str) -> int:
    """``general.file_type`` of a file type name (``q4_k_m`` -> 15)."""
    from moetrace.kernels import recipes

    ft = recipes.parse_file_type(file_type)
    return _FTYPE_IDS[_PURE_FTYPE[ft.default_type] if ft.pure else ft.name]


def gguf_metadata(family, config, *, name: str, file_type: str, imatrix_file: str | None = None,
                  imatrix_entries: int = 0, imatrix_datasets=(), imatrix_chunks: int = 0) -> list[tuple]:
    """The key-value pairs of a GGUF file of ``family``, as ``(key, value, gguf.GGUFValueType)``.

    What convert_hf_to_gguf.py writes (general keys, then the architecture's hyperparameters
    from :meth:`~moetrace.hooks.arch.Family.gguf_metadata`) plus what llama-quantize adds (file
    type, quantization version, imatrix provenance).
    """
    import gguf

    V = gguf.GGUFValueType
    c = config
    kv: list[tuple] = [
        ("general.architecture", family.gguf_arch, V.STRING),
        ("general.type", gguf.GGUFType.MODEL, V.STRING),
        ("general.name", name, V.STRING),
        ("general.quantized_by", "moetrace", V.STRING),
        ("general.file_type", ftype_id(file_type), V.UINT32),
        ("general.quantization_version", gguf.GGML_QUANT_VERSION, V.UINT32),
        *family.gguf_metadata(c),
    ]
    kv.append(("tokenizer.ggml.model", "none", V.STRING))
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        tid = getattr(c, attr, None)
        if isinstance(tid, int):
            kv.append((f"tokenizer.ggml.{key}_token_id", tid, V.UINT32))
    if imatrix_file:
        # llama-quantize's provenance keys (tools/quantize/quantize.cpp).
        kv.append(("quantize.imatrix.file", str(imatrix_file), V.STRING))
        kv.append(("quantize.imatrix.entries_count", int(imatrix_entries), V.INT32))
        if imatrix_datasets:
            kv.append(("quantize.imatrix.dataset", str(list(imatrix_datasets)[0]), V.STRING))
        if imatrix_chunks:
            kv.append(("quantize.imatrix.chunks_count", int(imatrix_chunks), V.INT32))
    return kv


@dataclass
class WriteResult:
    """What :func:`write_gguf` wrote."""

    path: Path
    file_type: str
    types: dict[str, str]
    tensor_bytes: int
    file_bytes: int
    quantized: int = 0  # tensors quantized now
    from_cache: int = 0  # tensors whose bytes came from the cache
    n_elements: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / max(1, self.n_elements)


def model_name(source) -> str:
    """The model's name for ``general.name``: never a local path, which would leak the user's folders.

    A built-in model keeps its id (``builtin:tiny``); a checkpoint folder gives its folder name, as
    convert_hf_to_gguf.py names a model after its directory; a GGUF source its own ``general.name``.
    """
    named = getattr(source, "general_name", None)
    if named:
        return str(named)
    model_id = str(getattr(source, "model_id", "") or "model")
    if model_id.startswith("builtin:"):
        return model_id
    folder = getattr(source, "folder", None) or getattr(source, "path", None)
    base = Path(folder).name if folder is not None else Path(model_id.rstrip("/\\")).name
    return base or "model"


def load_imatrix_for(source, imatrix_file) -> tuple[dict | None, object | None]:
    """Read an imatrix file for ``source`` (legacy files need the expert count): (values, Imatrix) or (None, None)."""
    if not imatrix_file:
        return None, None
    from moetrace.kernels.imatrix import load_imatrix

    from moetrace.tracer.weights.derive import family_of

    im = load_imatrix(imatrix_file, n_expert=family_of(source).n_experts(source.config))
    return im.values, im


def _float_bytes(w: torch.Tensor, type_name: str) -> np.ndarray:
    if type_name == "F32":
        return w.to(torch.float32).contiguous().numpy()
    if type_name == "F16":
        return w.to(torch.float16).contiguous().numpy()
    if type_name == "BF16":
        return w.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    raise MoetraceError(f"internal: {type_name} is not a float type")


def write_gguf(source, file_type: str, path, *, imatrix_file=None, cache=True, progress=None,
               overrides=()) -> WriteResult:
    """Quantize ``source`` to ``file_type`` and write a GGUF file at ``path``.

    Args:
        source: a model source (``config``, ``tensor``, ``layer_state``, ``model_id``, ``model_hash``).
        file_type: a llama.cpp file type (``q4_k_m``, ``pure_q8_0``, ...).
        path: the ``.gguf`` file to write (replaced if it exists, only once complete).
        imatrix_file: an importance-matrix file (llama.cpp's GGUF or legacy ``.dat``).
        cache: True for the quantized-weight cache, False for none, or a QuantCache.
        progress: optional ``progress(done, total, name)`` after each tensor.
        overrides: per-tensor types, llama-quantize's ``--tensor-type``: ``PATTERN=TYPE`` strings
            or (pattern, TYPE) pairs (see moetrace.tracer.variants); ``general.file_type`` stays
            the file type's, as llama-quantize writes it.

    Raises:
        MoetraceError: an unknown file type (valid ones listed), NaN/Inf in a tensor or a row
            length the type cannot take (the tensor named), an unwritable path.
    """
    import gguf

    from moetrace.kernels import recipes
    from moetrace.tracer.weights import derive as W
    from moetrace.tracer.weights.qcache import context_for

    ft = recipes.parse_file_type(file_type)
    family = W.family_of(source)
    why = family.gguf_unwritable(source.config)
    if why:
        raise MoetraceError(f"{getattr(source, 'model_id', 'the model')} cannot be written as a GGUF file: {why}")
    imatrix, im = load_imatrix_for(source, imatrix_file)
    ctx = context_for(source, imatrix, str(imatrix_file) if imatrix_file else None, cache=cache)
    types = W.file_type_types(source, ft.name, has_imatrix=imatrix is not None, context=ctx, overrides=overrides)
    specs = W.gguf_specs(source)
    order = W.tensor_order(types)
    sizes = {n: recipes.tensor_bytes(recipes.TensorSpec(n, specs[n]), types[n]) for n in order}

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(tmp, arch=family.gguf_arch)
    except OSError as e:
        raise MoetraceError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    for key, value, vtype in gguf_metadata(
        family, source.config, name=model_name(source), file_type=ft.name, imatrix_file=imatrix_file,
        imatrix_entries=len(imatrix or {}), imatrix_datasets=getattr(im, "datasets", ()),
        imatrix_chunks=getattr(im, "chunk_count", 0),
    ):
        if key == "general.architecture":
            continue  # the writer adds it from arch=
        writer.add_key_value(key, value, vtype)
    for n in order:
        writer.add_tensor_info(n, specs[n], np.dtype(np.float32), sizes[n],
                               raw_dtype=gguf.GGMLQuantizationType[types[n]])
    result = WriteResult(path, ft.name, dict((n, types[n]) for n in order), sum(sizes.values()), 0,
                         n_elements=sum(int(np.prod(specs[n])) for n in order))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        layer, state = None, {}
        for i, n in enumerate(order):
            L = W.layer_of(n)
            if L >= 0 and L != layer:
                state = {}  # free the previous layer before reading the next
                state = W.gguf_tensors_of_layer(source.layer_state(L), L, family)
                layer = L
            w = state[n] if L >= 0 else W.global_tensor(source, n)
            t = types[n]
            if tuple(w.shape) != tuple(specs[n]):
                raise MoetraceError(f"tensor {n} of {source.model_id} is {tuple(w.shape)}; its config says {specs[n]}")
            written = 0
            # Rows the family's GGUF layout reorders (llama's attn_q/attn_k): quantization works per row,
            # so the rows of the quantized bytes are reordered, and the cache keeps transformers' order.
            rows = family.gguf_row_order(n, source.config) if L >= 0 else None
            if t in W.FLOAT_TYPES:
                W._check_finite(w.reshape(-1, w.shape[-1]).to(torch.float32), n, t, 0, w.shape[-2] if w.ndim > 1 else 1,
                                int(np.prod(w.shape[:-2])) if w.ndim > 2 else 1)
                data = _float_bytes(w, t)
                if rows is not None:
                    data = data[rows]
                data.tofile(fout)
                written = data.nbytes
            else:
                hits = ctx.cache.hits if ctx.cache is not None else 0
                chunks = W.quantized_stream(w, n, t, ctx)
                if rows is not None:
                    blocks = np.concatenate([q.reshape(-1, q.shape[-1]) for _, q in chunks])  # (rows, bytes per row)
                    chunks = [(None, blocks[rows])]
                for _, q in chunks:
                    q.tofile(fout)
                    written += q.nbytes
                if ctx.cache is not None and ctx.cache.hits > hits:
                    result.from_cache += 1
                else:
                    result.quantized += 1
            if written != sizes[n]:
                raise MoetraceError(f"internal: tensor {n} wrote {written} bytes, its table entry says {sizes[n]}")
            writer.write_padding(fout, written)
            del w
            if progress:
                progress(i + 1, len(order), n)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    result.file_bytes = path.stat().st_size
    return result
