"""GGUF files as model sources: architecture from the metadata, tensors under transformers names.

``--model FILE.gguf`` traces a GGUF file as the reference; ``--gguf FILE`` gives the weights of
the ``gguf-*`` variants. Either way the file is memory-mapped by ``gguf.GGUFReader`` and read one
decoder layer at a time: F32, F16 and BF16 tensors come back as they are stored, quantized ones
are dequantized to float32 with :func:`moetrace.kernels.dequantize` (bit-exact with ggml), one
expert at a time from the 3-D expert tensors.

Names and shapes come from the file's family (``general.architecture`` looked up in the family
registry, :mod:`moetrace.hooks.arch`); GGUFReader reverses ggml's ``ne``, so shapes are HF's
[out, in]. A fused transformers tensor is its GGUF tensors concatenated along rows: e.g.
``blk.N.ffn_gate_exps`` and ``ffn_up_exps`` (E, I, H) become ``mlp.experts.gate_up_proj`` (E, 2I, H).
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

import numpy as np
import torch

from moetrace.errors import MoetraceError
from moetrace.hooks import arch as arch_registry
_FLOAT = {"F32": None, "F16": None, "BF16": torch.bfloat16}


class GGUFSource:
    """A GGUF file as a model source (the same interface as :class:`~moetrace.tracer.sources.checkpoint.CheckpointSource`).

    Args:
        path: the ``.gguf`` file.
        model_id: the id recorded in traces (default: the resolved path).

    Raises:
        MoetraceError: a missing, truncated or corrupted file, an unsupported architecture, or
            metadata the architecture needs but the file lacks.
    """

    builtin = None

    def __init__(self, path: str | Path, model_id: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise MoetraceError(f"GGUF file {str(self.path)!r} does not exist")
        self.reader = _open_reader(self.path)
        self.arch = self._field("general.architecture", required=True)
        # The expert count tells apart families sharing an architecture (llama: Mixtral or dense Llama).
        n_experts = int(self._field(f"{self.arch}.expert_count", default=0) or 0)
        self.family = arch_registry.by_gguf_arch(self.arch, where=repr(str(self.path)), n_experts=n_experts)
        self._globals = self.family.global_names  # HF name -> GGUF name, outside the layers
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._validate()
        self.model_id = model_id or str(self.path.resolve())
        name = self._field("general.name")
        self.general_name = name if isinstance(name, str) else None
        self.model_hash = self._hash()
        self.tokenizer = self._tokenizer()

    # -- metadata ------------------------------------------------------------------------
    def _field(self, key: str, required: bool = False, default=None):
        f = self.reader.get_field(key)
        if f is None:
            if required:
                raise MoetraceError(f"GGUF file {str(self.path)!r} lacks the metadata key {key!r}")
            return default
        try:
            return f.contents()
        except Exception as e:  # a malformed field: name it
            raise MoetraceError(f"GGUF file {str(self.path)!r}: metadata key {key!r} is unreadable ({e})") from None

    def _validate(self) -> None:
        """Check the file against itself before anything is read: extents, metadata, tensor table.

        Sets ``self.config``. The order matters: byte extents first (so no tensor is read past
        the end), then the numeric metadata (so no loop runs over a corrupted block count), then
        the config and the tensor table against the family's names and shapes.
        """
        from moetrace.tracer.sources import validate

        size = self.path.stat().st_size
        odd = next((t.name for t in self.reader.tensors if not t.name.isprintable()), None)
        if odd is not None:  # a flipped byte in a name: refused, and never printed raw into a message
            raise MoetraceError(f"GGUF file {str(self.path)!r} has a corrupted tensor name {odd!r}")
        if len(self._tensors) != len(self.reader.tensors):
            names = [t.name for t in self.reader.tensors]
            dup = next(n for n in names if names.count(n) > 1)
            raise MoetraceError(f"GGUF file {str(self.path)!r} holds tensor {dup} twice")
        validate.check_gguf_extents(
            self.path, [(t.name, t.tensor_type.name, [int(x) for x in t.shape], t.data_offset - self.reader.data_offset)
                        for t in self.reader.tensors], self.reader.data_offset, size)
        validate.check_gguf_metadata(self.path, self.arch, self._field)
        try:
            self.config = self.family.config_from_gguf(self._field, self._tensors, str(self.path))
        except MoetraceError:
            raise
        except Exception as e:  # noqa: BLE001 - transformers' own config validation (rope, dtypes, ...)
            raise MoetraceError(f"GGUF file {str(self.path)!r}: its metadata makes no valid {self.family.name} "
                                f"config: {validate.one_line(e)}") from None
        cfg = self.config.to_dict()
        validate.check_config(cfg, self.path, what="GGUF file")
        validate.check_family_config(cfg, self.family, self.path, what="GGUF file")
        validate.check_gguf_tensors(self.path, self.family, self.config, self.shapes(), self.ggml_types())

    def _hash(self) -> str:
        # The metadata and tensor table (everything before the tensor data) plus the file size:
        # cheap, and changes whenever a tensor's type, shape or placement does.
        h = hashlib.sha256(bytes(self.reader.data[: self.reader.data_offset]))
        h.update(str(self.path.stat().st_size).encode())
        return h.hexdigest()[:16]

    def _tokenizer(self):
        from moetrace.tracer.sources.checkpoint import ByteTokenizer

        if self._field("tokenizer.ggml.model") in (None, "none"):  # "none": llama.cpp's "no vocabulary"
            return ByteTokenizer() if self.config.vocab_size == 256 else None
        return _GGUFTokenizer(self.path)

    # -- tensors -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def ggml_types(self) -> dict[str, str]:
        """GGUF tensor name -> GGML type name, for every tensor in the file."""
        return {name: t.tensor_type.name for name, t in self._tensors.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> shape in elements, as GGUFReader orders it (HF's [out, in])."""
        return {name: tuple(int(x) for x in reversed(t.shape.tolist())) for name, t in self._tensors.items()}

    def has(self, name: str) -> bool:
        g = self._globals.get(name)
        return g is not None and g in self._tensors

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor outside the decoder layers by its HF name (embedding, final norm, output head)."""
        if not self.has(name):
            raise MoetraceError(f"tensor {name!r} not found in {str(self.path)!r}")
        try:
            return self._read(self._globals[name])
        finally:
            self._drop_pages()

    def layer_state(self, layer: int, only=None) -> dict[str, torch.Tensor]:
        """Every tensor of decoder layer ``layer`` (or those named in ``only``) under its HF name inside the layer."""
        if not 0 <= layer < self.num_layers:
            raise MoetraceError(f"layer {layer} is outside {str(self.path)!r} (layers 0..{self.num_layers - 1})")
        out = {}
        try:
            for hf, g in self.family.gguf_layer_names(layer, self.config).items():
                if only is not None and hf not in only:
                    continue
                if isinstance(g, tuple) and self._row_blocks(hf, g):  # concatenated along rows, expert by expert
                    out[hf] = self._read_experts(list(g))
                elif isinstance(g, tuple) or hf in self.family.transposed:  # joined as transformers holds them
                    parts = [self._read_experts([n]) if len(self._get(n).shape) == 3 else self._read(n)
                             for n in (g if isinstance(g, tuple) else (g,))]
                    out[hf] = self.family.from_gguf(hf, parts, self.config)
                elif len(self._get(g).shape) == 3:  # 3-D expert tensors: one expert at a time
                    out[hf] = self._read_experts([g])
                else:
                    w = self._read(g)
                    order = self.family.gguf_row_order(g, self.config)
                    if order is not None:  # back from llama.cpp's rotary row layout
                        w = w[torch.from_numpy(np.argsort(order))]
                    out[hf] = w.reshape(self.family.hf_shape(hf, self.config)) if hf in self.family.gguf_vectors else w
        finally:
            self._drop_pages()
        return out

    def blocks(self, name: str):
        """A quantized tensor's GGUF block bytes, as a block-computing path takes them: a
        :class:`~moetrace.kernels.compute.BlockWeight` with data uint8 (n_mat, rows, bytes_per_row).

        The bytes are checked as the dense reads are (every block dequantizes to finite values), and
        rows that llama.cpp's converter regrouped (``attn_q``/``attn_k`` of some families) are put
        back in transformers' order, as a derived variant's blocks are: a block row is one
        weight row, so reordering rows reorders whole rows of blocks.
        """
        from moetrace.kernels.compute import BlockWeight

        t = self._get(name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        raw = np.asarray(t.data)
        data = np.array(raw, copy=True).reshape(shape[0] if len(shape) == 3 else 1, -1, raw.shape[-1])
        for i in range(data.shape[0]):  # the same check the dense reads make, one matrix at a time
            _decode(self.path, t, data[i], shape[-2:], expert=i if len(shape) == 3 else None)
        order = self.family.gguf_row_order(name, self.config)
        if order is not None:
            data = np.ascontiguousarray(data[:, np.argsort(order)])
        return BlockWeight(data, t.tensor_type.name, shape)

    def _row_blocks(self, hf: str, names: tuple) -> bool:
        """Whether fused ``hf`` is its 3-D GGUF tensors stacked along rows as they are (Family.from_gguf's
        default join), which _read_experts builds one expert at a time without a second copy."""
        fam = self.family
        return (fam.fuses_rows(hf) and hf not in fam.interleaved and hf not in fam.transposed
                and all(len(self._get(n).shape) == 3 for n in names))

    def _get(self, name: str):
        if name not in self._tensors:
            raise MoetraceError(f"GGUF file {str(self.path)!r} has no tensor {name}")
        return self._tensors[name]

    def _read(self, name: str) -> torch.Tensor:
        t = self._get(name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        return _decode(self.path, t, np.asarray(t.data), shape)

    def _read_experts(self, names: list[str]) -> torch.Tensor:
        """3-D expert tensors (E, rows, cols), concatenated along rows, one expert at a time."""
        ts = [self._get(n) for n in names]
        shapes = [tuple(int(x) for x in reversed(t.shape.tolist())) for t in ts]
        if any(len(s) != 3 for s in shapes) or len({(s[0], s[2]) for s in shapes}) != 1:
            raise MoetraceError(
                f"GGUF file {str(self.path)!r}: expert tensors {', '.join(names)} have shapes {shapes}; "
                f"expected (experts, rows, cols) with equal experts and cols"
            )
        e, cols = shapes[0][0], shapes[0][2]
        rows = [s[1] for s in shapes]
        dtypes = {_float_dtype(t) for t in ts}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        out = torch.empty((e, sum(rows), cols), dtype=dtype)  # (E, rows, cols)
        for i in range(e):
            r0 = 0
            for t, r in zip(ts, rows):
                out[i, r0:r0 + r] = _decode(self.path, t, np.asarray(t.data[i]), (r, cols), expert=i)
                r0 += r
        return out

    def _drop_pages(self) -> None:
        # The map stays open for the whole run; dropping the pages already copied out keeps
        # them from counting in resident memory (they come back from the page cache if needed).
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def check_matches(self, reference) -> None:
        """Check that this file's tensors have the reference model's names and shapes.

        Raises:
            MoetraceError: naming the first tensor (in model order) that is missing, extra or
                shaped differently, or the first hyperparameter that differs.
        """
        from moetrace.tracer.weights.derive import gguf_specs

        rf, ff = arch_registry.family_of(reference.config), self.family
        if rf is not ff:
            raise MoetraceError(
                f"GGUF file {str(self.path)!r} does not match the reference {reference.model_id}: the file is "
                f"{ff.name} (GGUF {self.arch}), the reference is {rf.name}"
            )
        rc, fc = reference.config, self.config
        for key, what, size in ((ff.keys.top_k, "expert_used_count", ff.top_k),
                                ("num_attention_heads", "attention.head_count", lambda c: c.num_attention_heads),
                                ("num_key_value_heads", "attention.head_count_kv", lambda c: c.num_key_value_heads),
                                ("head_dim", "attention.key_length", ff.head_dim)):
            if int(size(rc)) != int(size(fc)):
                raise MoetraceError(
                    f"GGUF file {str(self.path)!r} does not match the reference {reference.model_id}: "
                    f"{self.arch}.{what} is {size(fc)} in the file, the reference has {key}={size(rc)}"
                )
        if self.num_layers != reference.num_layers:
            raise MoetraceError(
                f"GGUF file {str(self.path)!r} does not match the reference {reference.model_id}: the file has "
                f"{self.num_layers} layers ({self.arch}.block_count), the reference has {reference.num_layers}"
            )
        want = gguf_specs(reference)
        have = self.shapes()
        for name, shape in want.items():
            if name not in have:
                raise MoetraceError(
                    f"GGUF file {str(self.path)!r} does not match the reference {reference.model_id}: "
                    f"tensor {name} {tuple(shape)} is missing from the file"
                )
            if tuple(have[name]) != tuple(shape):
                raise MoetraceError(
                    f"GGUF file {str(self.path)!r} does not match the reference {reference.model_id}: "
                    f"tensor {name} is {have[name]} in the file, the reference has {tuple(shape)}"
                )
        out_name = self._globals["lm_head.weight"]
        if out_name in have and out_name not in want:
            raise MoetraceError(
                f"GGUF file {str(self.path)!r} does not match the reference {reference.model_id}: the file has "
                f"{out_name}, the reference ties its output head to the embedding"
            )


class _GGUFTokenizer:
    """The tokenizer stored in a GGUF file's metadata, converted by transformers (local file only).

    Loaded on first use, so a file whose tokenizer transformers cannot convert still serves as
    the weights of a gguf variant; tokenizing text with it then fails with the reason.
    """

    def __init__(self, path: Path):
        self.path = path
        self._tok = None

    def _load(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                          local_files_only=True)
            except Exception as e:
                raise MoetraceError(f"cannot read the tokenizer in GGUF file {str(self.path)!r}: {e}") from None
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._load().encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self._load().decode([token_id])


class _Truncated(Exception):
    pass


def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """GGUFReader that never reads past the end of the file, and names a tensor whose data would.

        gguf-py's ``_get`` slices the memory map, and a slice past the end is silently short: a
        corrupted count then loops over empty reads (an array length of 2**60 never ends) or
        yields short arrays. Here every read that does not fit is an error.
        """

        def _get(self, offset, dtype, count=1, override_order=None):
            count, offset = int(count), int(offset)
            itemsize = np.dtype(dtype).itemsize
            if offset < 0 or count < 0 or offset + itemsize * count > len(self.data):
                raise _Truncated(f"its header is truncated or corrupted: a field at byte {offset} needs "
                                 f"{itemsize * count} bytes, the file has {len(self.data)}")
            return super()._get(offset, dtype, count, override_order)

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                try:
                    _, name, _, dims, raw_dtype, offset = field.parts
                    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
                    # Python integers: numpy's uint64 product wraps around on corrupted dims.
                    elems = 1
                    for d in dims.tolist():
                        elems *= int(d)
                    need = int(start_offs) + int(offset[0]) + elems * type_size // block
                except Exception:  # a layout this check does not know: leave it to GGUFReader
                    break
                if need > size:
                    raise _Truncated(f"it is truncated: tensor {bytes(name).decode(errors='replace')} needs bytes "
                                     f"up to {need}, the file has {size}")
            super()._build_tensors(start_offs, fields)

    return Reader


def _open_reader(path: Path):
    try:
        return _reader_class()(str(path))
    except _Truncated as e:
        raise MoetraceError(f"cannot read GGUF file {str(path)!r}: {e}") from None
    except Exception as e:  # bad magic, unsupported version, truncated header, bad tensor table
        what = str(e) or type(e).__name__
        if "magic" in what.lower():
            what = "it does not start with the GGUF magic bytes"
        else:
            what = f"its header is truncated or corrupted ({what})"
        raise MoetraceError(f"cannot read GGUF file {str(path)!r}: {what}") from None


def _float_dtype(t) -> torch.dtype:
    name = t.tensor_type.name
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(name, torch.float32)


def _decode(path: Path, t, raw: np.ndarray, shape: tuple[int, ...], expert: int | None = None) -> torch.Tensor:
    """One tensor (or one expert of it) from its stored bytes: floats as stored, quantized types dequantized to F32."""
    from moetrace.kernels import dequantize

    name = t.tensor_type.name
    if name in ("F32", "F16"):
        out = torch.from_numpy(np.array(raw, copy=True)).reshape(shape)
    elif name == "BF16":  # GGUFReader gives BF16 as raw bytes
        out = torch.from_numpy(np.array(raw, copy=True).view(np.int16)).view(torch.bfloat16).reshape(shape)
    else:
        try:
            q = torch.from_numpy(np.array(raw, copy=True)).reshape(-1, raw.shape[-1])  # (rows, bytes per row)
            out = dequantize(q, name, shape[-1]).reshape(shape)
        except MoetraceError as e:
            raise MoetraceError(f"GGUF file {str(path)!r}: cannot dequantize tensor {t.name} ({name}): {e}") from None
    _check_finite(path, t, out, expert)
    return out


def _check_finite(path: Path, t, w: torch.Tensor, expert: int | None) -> None:
    """Refuse weights holding NaN or Inf: a damaged block scale or value, never a weight to rank or trace.

    The audit used to rank such a matrix silently with cosine 0; a trace would carry NaN through
    every later layer. Refusing names the tensor (and expert) where the damage is.
    """
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        n_nan, n_inf = int(torch.isnan(w).sum()), int(bad.sum()) - int(torch.isnan(w).sum())
        where = f" expert {expert}" if expert is not None else ""
        scales = "" if t.tensor_type.name in ("F32", "F16", "BF16") else " (its block scales are not finite)"
        raise MoetraceError(f"GGUF file {str(path)!r}: tensor {t.name}{where} ({t.tensor_type.name}) holds "
                            f"{n_nan} NaN and {n_inf} Inf values{scales}")


def open_gguf(path) -> GGUFSource:
    """Open a GGUF file as a model source (see :class:`GGUFSource`)."""
    return GGUFSource(path)
