"""Derive a variant's weights from the reference: assign GGML types, quantize, dequantize, cast.

The quantization is ggml's, bit for bit (moetrace.kernels); dequantized values are computed in
float32 and then cast to the variant's compute dtype, as an engine that dequantizes to BF16 does.

Every quantized tensor goes through :func:`quantized_stream`, which quantizes a bounded number
of rows at a time (3-D expert tensors one expert, or a few, at a time), names the tensor in every
error (NaN or Inf, a row length the type cannot take), and keeps the block bytes in the
quantized-weight cache (:mod:`moetrace.tracer.weights.qcache`) when a :class:`~moetrace.tracer.weights.qcache.QuantContext`
is given. :func:`tensor_types` attaches the source's context to the types it returns, so
:func:`variant_layer_state` and :func:`variant_global` use the cache without new arguments.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import torch

from moetrace.errors import MoetraceError
from moetrace.hooks import arch
from moetrace.tracer.variants import Variant
from moetrace.tracer.weights.stream import Dequantizing

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# Rows are quantized in chunks of about this many elements: bounds the float32 temporaries of
# the K-quant searches (a few times the chunk) whatever the tensor's size.
CHUNK_ELEMENTS = 1 << 22

_BLK = re.compile(r"blk\.(\d+)\.(.+)\.(?:weight|bias)$")


class TensorTypes(dict):
    """GGUF tensor name -> GGML type name, plus the :class:`QuantContext` to derive weights with.

    A plain dict to every caller; ``context`` (None for no cache) and ``family`` (the model's
    :class:`~moetrace.hooks.arch.Family`) travel with it, so the executor's
    ``variant_layer_state(ref, layer, variant, types)`` finds the cache and the tensor names on its own.
    """

    context = None
    family = None
    config = None  # the model's config: a family whose GGUF layout splits a tensor by its sizes needs it


def never_quantized(gguf_name: str, ndim: int) -> bool:
    """llama.cpp keeps 1-D tensors, norms, the router and every tensor whose name does not end in
    ``weight`` (biases, also GPT-OSS's 2-D expert biases) as they are."""
    return (ndim < 2 or "_norm.weight" in gguf_name or "ffn_gate_inp.weight" in gguf_name
            or not gguf_name.endswith("weight"))


def tensor_types(source, variant: Variant, *, has_imatrix: bool = False, context=True) -> TensorTypes:
    """GGUF tensor name -> GGML type name for every weight of the model under ``variant``.

    Args:
        source: a model source.
        variant: the variant (or its weights part is all that matters).
        has_imatrix: type as llama-quantize does when given an importance matrix (changes
            ffn_down of the Q4_0 and Q5_0 file types).
        context: the quantization context attached to the result: True for the source's
            default (the quantized-weight cache), None/False for none, or a QuantContext.
    """
    out = TensorTypes(_types(source, variant, has_imatrix))
    out.family = family_of(source)
    out.config = source.config
    if context is True:
        from moetrace.tracer.weights.qcache import context_for

        context = context_for(source) if out else None
    out.context = context or None
    return out


def _types(source, variant: Variant, has_imatrix: bool) -> dict[str, str]:
    if variant.weights == "orig" or variant.gguf_name is not None:  # gguf: the file's own types, not derived
        return {}
    specs = gguf_specs(source)
    overrides = getattr(variant, "overrides", ())
    if variant.pure_type is not None:
        from moetrace.kernels import recipes
        from moetrace.kernels.base import BLOCK_SIZES

        t = variant.pure_type
        out, used = {}, set()
        for name, shape in specs.items():
            hit = None if never_quantized(name, len(shape)) else recipes.match_override(name, overrides)
            if never_quantized(name, len(shape)):
                out[name] = "F32"
            elif hit is not None:  # llama-quantize --pure --tensor-type: the override wins, with the row fallback
                used.add(hit[0])
                out[name] = recipes._fallback(recipes.TensorSpec(name, shape), hit[1])
            elif shape[-1] % BLOCK_SIZES[t][0]:
                raise MoetraceError(
                    f"tensor {name} has rows of {shape[-1]} elements, which {t} blocks of {BLOCK_SIZES[t][0]} cannot take"
                )
            else:
                out[name] = t
        recipes.check_overrides_used(overrides, used, [recipes.TensorSpec(n, s) for n, s in specs.items()])
        return out
    from moetrace.kernels import recipes

    return recipes.assign_types(
        [recipes.TensorSpec(n, s) for n, s in specs.items()], variant.weights, model_shape(source),
        has_imatrix=has_imatrix, overrides=overrides,
    )


def file_type_types(source, file_type: str, *, has_imatrix: bool = False, context=True, overrides=()) -> TensorTypes:
    """:func:`tensor_types` for a llama.cpp file-type name (``q4_k_m``, ``pure_q8_0``) and optional
    per-tensor overrides (``PATTERN=TYPE`` strings or (pattern, TYPE) pairs, as ``--tensor-type``).

    Raises:
        MoetraceError: an unknown file type (the message lists the valid ones), a bad override.
    """
    from moetrace.kernels import recipes

    ft = recipes.parse_file_type(file_type)
    return tensor_types(source, Variant(ft.name, "fp32", overrides=tuple(overrides)), has_imatrix=has_imatrix,
                        context=context)


def family_of(source) -> arch.Family:
    """The family of a source (its own, or looked up from its config's model type)."""
    return getattr(source, "family", None) or arch.family_of(source.config)


def model_shape(source):
    """The hyperparameters llama.cpp's type rules consult (a ``recipes.ModelShape``), read through the family."""
    from moetrace.kernels import recipes

    return recipes.model_shape_of(family_of(source), source.config)


def gguf_specs(source) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape as gguf.GGUFReader reports it (HF's [out, in]; (E, rows, row length) for experts)."""
    return family_of(source).gguf_specs(source.config)


def tensor_order(names) -> list[str]:
    """GGUF names in llama.cpp's processing order: tensors outside the layers, then by layer, then by name."""
    def key(n):
        m = _BLK.match(n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


def recipe_summary(source, file_type: str, *, has_imatrix: bool = False, overrides=()):
    """llama.cpp's types for ``file_type`` (and ``--tensor-type`` overrides) on this model, with sizes
    (a ``recipes.RecipeSummary``)."""
    from moetrace.kernels import recipes
    from moetrace.tracer.variants import canonical_overrides

    specs = [recipes.TensorSpec(n, s) for n, s in gguf_specs(source).items()]
    return recipes.summarize(specs, file_type, model_shape(source), has_imatrix=has_imatrix,
                             overrides=canonical_overrides(overrides))


def config_source(model: str, plant: str | None = None):
    """A stand-in source with only ``config``, ``model_id`` and ``model_hash``, for work that needs shapes only.

    Built-in models are described from their preset without generating their weights (so
    ``moetrace recipe builtin:qwen3-30b-a3b:layers=48`` writes nothing); a folder or GGUF file is
    opened as usual.
    """
    from moetrace.tracer.sources import builtin as builtin

    if model.startswith("builtin:") or model in builtin.PRESETS:
        m = builtin.parse_builtin(model, plant)
        return SimpleNamespace(config=SimpleNamespace(**builtin.hf_config_dict(m.shape)), model_id=m.model_id,
                               model_hash=m.content_hash)
    from moetrace.tracer.sources.checkpoint import open_source

    return open_source(model, plant=plant)


# -- quantizing and dequantizing one tensor ------------------------------------------------

def _mats(w: torch.Tensor) -> torch.Tensor:
    """(..., rows, cols) -> (n_mat, rows, cols); a 2-D tensor is one matrix."""
    if w.ndim < 2:
        raise MoetraceError(f"cannot quantize a {w.ndim}-D tensor; GGML block types take matrices")
    return w.reshape(-1, w.shape[-2], w.shape[-1])


def _named(err: Exception, name: str, where: str = "") -> MoetraceError:
    from moetrace.kernels.errors import FormatError

    return FormatError(f"tensor {name}{where}: {err}")


def _check_finite(x: torch.Tensor, name: str, type_name: str, row0: int, rows_per_mat: int, n_mat: int) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        from moetrace.kernels.errors import FormatError

        n_bad = int(bad.sum())
        r, c = (int(v) for v in torch.nonzero(bad)[0])
        row = row0 + r
        where = f"expert {row // rows_per_mat}, row {row % rows_per_mat}" if n_mat > 1 else f"row {row}"
        raise FormatError(
            f"tensor {name} holds {n_bad} NaN/Inf value(s) in this chunk (first at {where}, column {c}: "
            f"{float(x[r, c])}); refusing to quantize it to {type_name}"
        )


def _imatrix_rows(imatrix, n_mat: int, cols: int, name: str) -> torch.Tensor | None:
    """The importance matrix as (n_mat, cols) float32, or None."""
    if imatrix is None:
        return None
    im = torch.as_tensor(np.asarray(imatrix, dtype=np.float32))
    if im.ndim == 1 and im.numel() == cols:
        return im.expand(n_mat, cols)
    if im.ndim == 2 and im.shape == (n_mat, cols):
        return im
    raise MoetraceError(
        f"imatrix entry of tensor {name} has shape {tuple(im.shape)}; expected ({cols},) or ({n_mat}, {cols})"
    )


def quantized_shape(w_shape: tuple[int, ...], name: str, type_name: str) -> tuple[int, int, int]:
    """(n_mat, rows, bytes_per_row) of a tensor's block bytes; names the tensor if its rows do not fit the type."""
    from moetrace.kernels import row_bytes
    from moetrace.kernels.errors import FormatError

    if len(w_shape) < 2:
        raise MoetraceError(f"tensor {name} is {len(w_shape)}-D; GGML block types take matrices")
    rows, cols = w_shape[-2], w_shape[-1]
    n_mat = int(np.prod(w_shape[:-2])) if len(w_shape) > 2 else 1
    try:
        return n_mat, rows, row_bytes(type_name, cols)
    except FormatError as e:
        raise _named(e, name) from None


def _quantize_rows(mats: torch.Tensor, name: str, type_name: str, imat: torch.Tensor | None):
    """Yield (first flat row, uint8 numpy (n, bytes_per_row)) for ``mats`` (n_mat, rows, cols), chunk by chunk.

    Rows are quantized independently, so how they are grouped into chunks changes no byte.
    """
    from moetrace.kernels import quantize
    from moetrace.kernels.errors import FormatError

    n_mat, rows_per_mat, cols = mats.shape
    total = n_mat * rows_per_mat
    step = max(1, CHUNK_ELEMENTS // cols)
    # Without an imatrix every row is alike; with one, each expert has its own, so chunks stay inside one matrix.
    # So do they where the matrices are not contiguous (one part of a fused tensor): flattening would copy it.
    whole = imat is None and mats.is_contiguous()
    flat = mats.view(-1, cols) if whole else None  # (n_mat * rows, cols)
    spans = [(0, total)] if whole else [(m * rows_per_mat, (m + 1) * rows_per_mat) for m in range(n_mat)]
    for start, end in spans:
        qv = None if imat is None else imat[start // rows_per_mat]
        for r0 in range(start, end, step):
            r1 = min(end, r0 + step)
            rows = flat[r0:r1] if whole else mats[start // rows_per_mat, r0 - start:r1 - start]
            x = rows.to(torch.float32)  # (n, cols)
            _check_finite(x, name, type_name, r0, rows_per_mat, n_mat)
            try:
                q = quantize(x, type_name, imatrix=qv)
            except FormatError as e:
                raise _named(e, name) from None
            yield r0, q.numpy()


def quantized_stream(w: torch.Tensor, name: str, type_name: str, context=None, imatrix=None):
    """The block bytes of ``w`` as ``type_name``, chunk by chunk, from the cache or freshly quantized.

    Args:
        w: (rows, cols) or (E, rows, cols) reference weights (any float dtype).
        name: the GGUF tensor name (cache key and error messages).
        type_name: a quantized GGML type.
        context: a QuantContext (cache and imatrix), or None.
        imatrix: importance values, (cols,) or (E, cols); default: the context's entry for ``name``.

    Yields:
        (first row, uint8 array (n, bytes_per_row)) in order; rows count across experts.
    """
    cache = context.cache if context is not None else None
    if imatrix is None and context is not None:
        imatrix = context.imatrix_for(name)
    shape = quantized_shape(tuple(w.shape), name, type_name)
    n_mat, rows, nb = shape
    mats = _mats(w)  # (n_mat, rows, cols)
    key = None
    if cache is not None:
        from moetrace.tracer.weights.qcache import tensor_hash

        key = context.key(name, type_name, tensor_hash(mats))
    if key is not None:
        hit = cache.get(key, shape)
        if hit is not None:
            flat = hit.reshape(-1, nb)
            step = max(1, (CHUNK_ELEMENTS // 4) // nb)
            for r0 in range(0, flat.shape[0], step):
                yield r0, np.array(flat[r0:r0 + step])
            return
    imat = _imatrix_rows(imatrix, n_mat, mats.shape[-1], name)
    if key is None:
        yield from _quantize_rows(mats, name, type_name, imat)
        return
    with cache.writer(key, shape) as out:
        for r0, q in _quantize_rows(mats, name, type_name, imat):
            out.write(r0, q)
            yield r0, q


def quantized_bytes(w: torch.Tensor, name: str, type_name: str, context=None, imatrix=None) -> np.ndarray:
    """All block bytes of ``w`` as ``type_name``: uint8 (n_mat, rows, bytes_per_row); see :func:`quantized_stream`."""
    shape = quantized_shape(tuple(w.shape), name, type_name)
    out = np.empty(shape, dtype=np.uint8)
    flat = out.reshape(-1, shape[-1])
    for r0, q in quantized_stream(w, name, type_name, context, imatrix):
        flat[r0:r0 + q.shape[0]] = q
    return out


def dequantized(w: torch.Tensor, name: str, type_name: str | None, context=None, imatrix=None) -> torch.Tensor:
    """What ``w`` stored as ``type_name`` in a GGUF file dequantizes to, in float32, shaped like ``w``.

    F32 (or None) is ``w`` itself; F16/BF16 are a rounding; quantized types go through
    :func:`quantized_stream` (so through the cache when ``context`` has one).
    """
    from moetrace.kernels import dequantize

    if type_name is None or type_name == "F32":
        return w.to(torch.float32)
    if type_name in FLOAT_TYPES:
        return w.to(FLOAT_TYPES[type_name]).to(torch.float32)
    cols = w.shape[-1]
    out = torch.empty(w.shape, dtype=torch.float32)
    flat = out.view(-1, cols)
    for r0, q in quantized_stream(w, name, type_name, context, imatrix):
        flat[r0:r0 + q.shape[0]] = dequantize(torch.from_numpy(q), type_name, cols)
    return out


def apply_type(w: torch.Tensor, type_name: str | None, imatrix: torch.Tensor | None = None, *,
               name: str | None = None, context=None) -> torch.Tensor:
    """What a tensor stored as ``type_name`` dequantizes to, in float32.

    Args:
        w: (..., n_per_row) reference weights; 3-D expert tensors are quantized a bounded
            number of rows at a time, which is the same as one expert at a time.
        type_name: GGML type, or None/F32 for the tensor as it is.
        imatrix: optional importance values, (n_per_row,) or (E, n_per_row) for an expert tensor.
        name: the GGUF name, for error messages and the cache key.
        context: a QuantContext; its cache is used only when ``name`` is given.
    """
    return dequantized(w, name or "(unnamed)", type_name, context if name else None, imatrix)


class LayerState(dict):
    """A layer's weights by name inside the layer, plus ``roles``: name -> weight role (moetrace.kernels.compute)."""

    roles: dict[str, str] = {}
    fp32: frozenset = frozenset()  # names the compute path holds in float32 (Family.fp32_tensors)


def layer_roles(layer: int, family) -> dict[str, str]:
    """Name inside decoder layer ``layer`` -> its weight role (``attention``, ``experts``, ...), from its GGUF name."""
    from moetrace.kernels.compute import role_of

    return {key: role_of(g[0] if isinstance(g, tuple) else g) for key, g in family.gguf_layer_names(layer).items()}


def takes_blocks(path, family, key: str, g, types: dict) -> bool:
    """Whether tensor ``key`` (GGUF name ``g``, or a fused tensor's names) goes to compute ``path`` as GGUF
    block bytes: its role's form takes blocks, every part has a quantized type in ``types``, and a
    fused tensor's parts are rows of it (else the path gets it dense)."""
    from moetrace.kernels.compute import role_of

    if g is None:
        return False
    parts = g if isinstance(g, tuple) else (g,)
    if not path.weight_form(role_of(parts[0])).blocks:
        return False
    if any(types.get(n) in (None, *FLOAT_TYPES) for n in parts):
        return False
    return not isinstance(g, tuple) or family.fuses_rows(key)


def _blocks(w: torch.Tensor, name: str, type_name: str, ctx):
    from moetrace.kernels.compute import BlockWeight

    return BlockWeight(quantized_bytes(w, name, type_name, ctx), type_name, tuple(w.shape))


def variant_layer_state(ref: dict[str, torch.Tensor], layer: int, variant: Variant, types: dict[str, str], *,
                        context=None, cast: bool = True, family=None, defer: bool = False) -> LayerState:
    """A decoder layer's weights under ``variant``, in the form its compute path asks for per role.

    Dense forms are dequantized in float32 and rounded to the form's dtype; a block form gives
    the GGUF block bytes (:class:`moetrace.kernels.compute.BlockWeight`) of every quantized tensor
    (a fused tensor: a tuple of its parts, in its GGUF tensors' order), and float-typed tensors dense.

    Args:
        ref: the reference layer state, keyed by name inside the layer.
        types: GGUF name -> GGML type (empty for ``orig``).
        context: a QuantContext (cache, imatrix); default: the one ``types`` carries.
        family: the model's family; default: the one ``types`` carries.
        cast: False leaves the rounding of dense weights to the compute path
            (``ComputePath.load``): tensors kept as they are stored (F32 types) come back as the
            reference's own tensors, others in float32. The path then rounds while copying into
            reused buffers, which saves allocating (and the kernel zeroing) a new layer's worth
            of memory per layer.
        defer: with ``cast`` False, tensors that need dequantizing come back as
            :class:`~moetrace.tracer.weights.stream.Dequantizing` weights, which the path's ``load``
            fills into the module's tensors chunk by chunk: no float32 copy of the layer is made.
    """
    ctx = context if context is not None else getattr(types, "context", None)
    family = family or getattr(types, "family", None)
    if family is None:
        from moetrace.errors import InternalError

        raise InternalError("variant_layer_state needs the model's family (types from tensor_types carry it)")
    names = family.gguf_layer_names(layer)
    path = variant.path
    out = LayerState()
    out.roles = layer_roles(layer, family)
    out.fp32 = frozenset(family.fp32_tensors) & set(ref)
    for key, w in ref.items():
        g = names.get(key)
        form = path.weight_form(out.roles.get(key, "other"))
        if isinstance(g, tuple):  # fused, e.g. gate_up (E, 2F, H) = gate (E, F, H) ++ up (E, F, H)
            ts = [types.get(n, "F32") for n in g]
            config = getattr(types, "config", None)
            parts = family.to_gguf(key, w, config)  # in the GGUF tensors' layout ([out, in])
            # a block-computing path takes a fused tensor's parts only where they are rows of it;
            # DeepSeek's kv_b (attn_k_b, attn_v_b) comes to it dense, its parts dequantized and merged
            if takes_blocks(path, family, key, g, types):
                out[key] = tuple(_blocks(part, n, t, ctx) for part, n, t in zip(parts, g, ts))
                continue
            if all(t == "F32" for t in ts):
                v = w.to(torch.float32) if cast else w
            elif defer and not cast and family.fuses_rows(key):  # filled through views of the module's tensor
                v = Dequantizing(tuple(zip(parts, g, ts)), ctx, tuple(w.shape), _gguf_views(family, key, config))
            else:
                v = family.from_gguf(key, [dequantized(part, n, t, ctx) for part, n, t in zip(parts, g, ts)], config)
        else:
            t = types.get(g) if g else None
            wg = family.to_gguf(key, w)[0] if key in family.transposed else w  # quantized along GGUF rows
            if takes_blocks(path, family, key, g, types):
                out[key] = _blocks(wg, g, t, ctx)
                continue
            if not cast and t in (None, "F32"):
                v = w
            elif defer and not cast:  # Dequantizing fills GGUF's row layout (a transposed view where transposed)
                v = Dequantizing(((wg, g or key, t),), ctx, tuple(w.shape), _gguf_views(family, key, None))
            else:
                v = dequantized(wg, g or key, t, ctx)
                v = family.from_gguf(key, [v]) if key in family.transposed else v
        if key in out.fp32:  # kept in float32 by every path, as transformers and llama.cpp keep it
            v = v.dense() if isinstance(v, Dequantizing) else v
            out[key] = v.to(torch.float32) if cast else v
            continue
        out[key] = v.to(form.dtype) if cast and form.dtype is not None else v
    return out


def _gguf_views(family, key: str, config):
    """Destination (as transformers holds ``key``) -> its parts as views in GGUF's layout: the family's
    ``to_gguf``, which slices and transposes without copying, for a :class:`Dequantizing` weight."""
    return lambda dst: family.to_gguf(key, dst, config)


def variant_global(source, variant: Variant, types: dict[str, str], *, context=None) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output head under ``variant`` (HF names), dense and rounded to
    the dequantization dtype of their role, or the GGUF block bytes (:class:`BlockWeight`) where
    the path asks for blocks and the tensor's type is quantized."""
    from moetrace.kernels.compute import role_of

    ctx = context if context is not None else getattr(types, "context", None)
    path = variant.path
    out = {}
    for hf, g in family_of(source).global_names.items():
        if not source.has(hf):
            continue
        form = path.weight_form(role_of(g))
        t = types.get(g)
        if takes_blocks(path, None, hf, g, types):
            out[hf] = _blocks(source.tensor(hf), g, t, ctx)
            continue
        w = dequantized(source.tensor(hf), g, t, ctx)
        dtype = form.dtype
        out[hf] = w.to(dtype) if dtype is not None else w
    return out


# -- reference tensors under GGUF names ---------------------------------------------------

def gguf_tensors_of_layer(layer_state: dict[str, torch.Tensor], layer: int, family, config=None
                          ) -> dict[str, torch.Tensor]:
    """A layer's reference tensors under GGUF names, fused tensors split into their GGUF tensors and transposed
    ones transposed (views where they can be; ``config``: the model's, for a family that splits a tensor by
    its sizes)."""
    out = {}
    for key, g in family.gguf_layer_names(layer).items():
        if key not in layer_state:
            continue
        w = layer_state[key]
        if isinstance(g, tuple):
            out.update(zip(g, family.to_gguf(key, w, config)))
        elif key in family.transposed:
            out[g] = family.to_gguf(key, w, config)[0]
        else:
            out[g] = w.reshape(-1) if key in family.gguf_vectors else w
    return out


def global_tensor(source, gguf_name: str) -> torch.Tensor:
    """A tensor outside the decoder layers (``token_embd``, ``output_norm``, ``output``) by GGUF name."""
    return source.tensor(hf_global_name(gguf_name, family_of(source)))


def hf_global_name(gguf_name: str, family) -> str:
    """The HF name of a tensor outside the decoder layers (``token_embd.weight`` -> ``model.embed_tokens.weight``)."""
    return {g: hf for hf, g in family.global_names.items()}[gguf_name]


def layer_of(gguf_name: str) -> int:
    """The layer number in ``blk.N.*`` names; -1 for tensors outside the layers."""
    m = _BLK.match(gguf_name)
    return int(m.group(1)) if m else -1
