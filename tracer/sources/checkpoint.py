"""Model sources: where the reference weights and the architecture come from.

A source gives the transformers config and reads tensors lazily by name, one decoder layer at
a time, from memory-mapped safetensors, so a model far larger than memory can be traced.
``builtin:NAME`` sources are checkpoint folders that moetrace generates and caches.
"""

from __future__ import annotations

import hashlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from moetrace.errors import MoetraceError
from moetrace.hooks import arch
from moetrace.tracer.sources import builtin as builtin
from moetrace.tracer.sources import validate
from moetrace.tracer.sources.packed import packed_names, read_packed


class ByteTokenizer:
    """Byte-level tokenizer of the built-in models: token id = byte value, any text is a prompt."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_text(self, token_id: int) -> str:
        b = bytes([token_id])
        return b.decode("utf-8") if token_id < 128 else f"<0x{token_id:02X}>"


class HFTokenizer:
    """A checkpoint's own tokenizer, from its local files only."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id])


class CheckpointSource:
    """A transformers checkpoint folder (config.json + safetensors, one file or sharded with an index)."""

    def __init__(self, folder: str | Path, model_id: str | None = None, model_hash: str | None = None):
        from transformers import AutoConfig

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MoetraceError(f"model folder {str(self.folder)!r} does not exist")
        if not (self.folder / "config.json").is_file():
            raise MoetraceError(f"{str(self.folder)!r} has no config.json; a model is a transformers checkpoint folder")
        raw = validate.read_json(self.folder / "config.json", "config")
        validate.check_config(raw, self.folder / "config.json")
        self.family = arch.by_model_type(raw.get("model_type"), where=repr(str(self.folder)))
        validate.check_family_config(raw, self.family, self.folder / "config.json")
        # Through transformers' own config class, so its defaults and derived values exist;
        # sizes are then read through the family (family.head_dim(config), ...), never the raw dict.
        try:
            self.config = AutoConfig.from_pretrained(str(self.folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - the file boundary: whatever transformers finds wrong
            # transformers' own parsing and validation of fields this boundary does not know (its
            # strict dataclass checks, its dtype and rope parsing) fail with many exception types,
            # often with multi-line messages: any of them means config.json is not a usable config.
            raise MoetraceError(f"config {str(self.folder / 'config.json')!r} is not a valid "
                                f"{raw.get('model_type')} config: {validate.one_line(e)}") from None
        self.model_id = model_id or str(self.folder.resolve())
        self._headers: dict[str, tuple[dict, int]] = {}  # shard -> (checked safetensors header, data offset)
        self._index = self._read_index()
        validate.check_layer_count(self._index, self.family, int(self.config.num_hidden_layers),
                                   repr(str(self.folder)))
        self._session_maps: dict | None = None  # shard -> map, inside mapped()
        self.model_hash = model_hash or self._hash()
        self.tokenizer = self._tokenizer()

    # -- tensors -------------------------------------------------------------------------
    def _read_index(self) -> dict[str, str]:
        """tensor name -> safetensors file name."""
        from safetensors import safe_open

        idx_file = self.folder / "model.safetensors.index.json"
        if idx_file.is_file():
            weight_map = validate.weight_map(validate.read_json(idx_file, "index"), idx_file)
            for shard in sorted(set(weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise MoetraceError(f"shard {shard!r} named in {idx_file} is missing")
                # Every shard's header checked on open (headers only: cheap even for a 61 GB model),
                # so nothing later (the hash, a layer read) meets a header that lies about its size.
                self._headers[shard] = validate.safetensors_header(self.folder / shard)
            return dict(weight_map)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise MoetraceError(f"{str(self.folder)!r} holds no .safetensors files")
        index = {}
        for f in files:
            header, data_start = validate.safetensors_header(f)
            self._headers[f.name] = (header, data_start)
            for k in header:
                index[k] = f.name
        return index

    def _hash(self) -> str:
        # Config plus every shard's header and size: cheap, and changes whenever a tensor does
        # in practice (a byte-level hash of 61 GB would take minutes).
        h = hashlib.sha256((self.folder / "config.json").read_bytes())
        for shard in sorted(set(self._index.values())):
            p = self.folder / shard
            with open(p, "rb") as fh:
                n = self._headers[shard][1] - 8  # checked on open: fits the file
                fh.seek(8)
                h.update(fh.read(n))
            h.update(str(p.stat().st_size).encode())
        return h.hexdigest()[:16]

    @contextmanager
    def _reader(self):
        """A function reading tensors by HF name, with each shard opened once for the block.

        Tensors are views of a private (copy-on-write) memory map of their shard, not copies:
        the executor casts them straight into its layer buffers, so a layer is read from the page
        cache once, with no allocation. A map lives as long as a tensor that views it; its pages
        are the file's page cache, which the kernel can drop. Tensors the map cannot hold as a
        view (an unaligned offset, a dtype torch cannot view) are copied out by safetensors.
        """
        from safetensors import safe_open

        session = self._session_maps
        maps: dict[str, _MappedShard] = session if session is not None else {}
        handles: dict[str, object] = {}

        def read(name: str) -> torch.Tensor:
            if name not in self._index:
                raise MoetraceError(f"tensor {name!r} not found in {str(self.folder)!r}")
            shard = self._index[name]
            if shard not in maps:
                maps[shard] = _MappedShard(self.folder / shard, self._headers)
            t = maps[shard].get(name)
            if t is not None:
                return t
            if shard not in handles:
                handles[shard] = safe_open(str(self.folder / shard), framework="pt").__enter__()
            return handles[shard].get_tensor(name)

        try:
            yield read
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)
            handles.clear()
            if session is None:
                maps.clear()  # each map closes when the last tensor viewing it is gone

    @contextmanager
    def mapped(self):
        """Keep each shard's memory map open for the block instead of one map per read.

        The executor reads every layer inside one such block: unmapping a shard after each layer
        cost more than a third of reading the layer (measured on builtin:mini, 16 layers: 38-45 ms
        with a map per layer, 27-32 ms with one map for the run). The pages stay mapped until the
        block ends; they are the file's page cache, clean, so the kernel can still reclaim them.
        """
        if self._session_maps is not None:  # nested: the outer block owns the maps
            yield
            return
        self._session_maps = {}
        try:
            yield
        finally:
            self._session_maps = None  # each map closes when the last tensor viewing it is gone

    def release_layer(self, layer: int) -> int:
        """Drop this process's mapped pages of decoder layer ``layer``'s tensors; returns the bytes advised.

        Inside :meth:`mapped`, every page of a shard that a layer read stays in this process's
        resident set (as file-backed RSS) until the map closes at the end of the run, so peak RSS
        grows with depth by the checkpoint's size. ``madvise(MADV_DONTNEED)`` on the layer's byte
        range unmaps those pages from the process; they stay in the page cache (another run or
        process still finds them there), unlike ``posix_fadvise(POSIX_FADV_DONTNEED)``, which
        evicts the cache but leaves pages this process has mapped resident. The maps are private
        (copy-on-write): a page written through a view would lose its write, so the range is
        rounded inward to whole pages and the executor calls this only once the layer's weights
        were copied into its modules and the layer's states are gone. A view used afterwards reads
        the file again; nothing in moetrace writes to them. Outside :meth:`mapped` it does nothing
        (each read's map closes with its tensors).
        """
        prefix = self.family.layer_prefix(layer)
        return self._release_names([name for name in self._index if name.startswith(prefix)])

    def _release_names(self, names) -> int:
        """:meth:`release_layer` for the tensors ``names`` (HF names); the bytes advised."""
        maps = self._session_maps
        if not maps:
            return 0
        ranges: dict[str, list[tuple[int, int]]] = {}
        for name in names:
            shard = self._index[name]
            if shard in maps:
                ranges.setdefault(shard, []).append(maps[shard].byte_range(name))
        return sum(maps[shard].release(spans) for shard, spans in ranges.items())

    def has(self, name: str) -> bool:
        return name in self._index

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor by its HF name, in its stored dtype."""
        with self._reader() as read:
            t = read(name)
        validate.check_global(t, name, self.family, self.config, repr(str(self.folder)))
        return t

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Every tensor of decoder layer ``layer``, keyed by its name inside the layer.

        Per-expert keys (the family's ``fusion.key``, e.g. ``mlp.experts.E.{gate,up,down}_proj.weight``)
        are fused on read into transformers 5.x's fused tensors (``fusion.fused``: e.g.
        ``mlp.experts.gate_up_proj`` (E, 2I, H), gate in [:, :I] and up in [:, I:], and
        ``mlp.experts.down_proj`` (E, H, I)), as transformers' own conversion mapping fuses them
        in ``from_pretrained``.
        """
        prefix = self.family.layer_prefix(layer)
        fusion = self.family.fusion
        state: dict[str, torch.Tensor] = {}
        experts: dict[tuple[str, int], str] = {}  # (proj, expert) -> HF name
        packed = {n: (key, fmt) for key, fmt in self.family.packed.items() for n in packed_names(key, fmt)}
        with self._reader() as read:
            for k in self._index:
                if not k.startswith(prefix):
                    continue
                if k[len(prefix):] in packed:
                    continue  # read below, whole
                m = fusion.match(k[len(prefix):]) if fusion is not None else None
                if m:
                    experts[m] = k
                else:  # under transformers 5's name (Mixtral's block_sparse_moe.gate is mlp.gate)
                    inner = k[len(prefix):]
                    state[fusion.rename(inner) if fusion is not None else inner] = read(k)
            if experts:
                if any(key in state for key in fusion.fused):
                    raise MoetraceError(
                        f"layer {layer} of {str(self.folder)!r} holds both fused and per-expert expert weights; "
                        f"a checkpoint has one or the other"
                    )
                state.update(self._fuse_experts(layer, experts, read))
            state.update(self._unpack(prefix, read))
        validate.check_layer(state, self.family, self.config, layer, repr(str(self.folder)))
        return state

    def _unpack(self, prefix: str, read) -> dict[str, torch.Tensor]:
        """The family's packed keys of one layer (MXFP4 blocks and scales), dequantized exactly
        (see moetrace.tracer.sources.packed) and laid out as transformers holds them. BF16 holds
        every MXFP4 value exactly, at half float32's memory."""
        out = {}
        for key, fmt in self.family.packed.items():
            names = [prefix + n for n in packed_names(key, fmt)]
            have = [n in self._index for n in names]
            if not any(have):
                continue  # stored plain (a dequantized copy of the checkpoint)
            if not all(have):
                raise MoetraceError(f"{str(self.folder)!r} has {names[have.index(True)]} but lacks "
                                    f"{names[have.index(False)]}; a {fmt} tensor needs both")
            if prefix + key in self._index:
                raise MoetraceError(f"{str(self.folder)!r} holds {prefix + key} both plain and as {fmt} blocks")
            out[key] = self._unpack_one(key, fmt, [read(n) for n in names], prefix + key)
        return out

    def _unpack_one(self, key: str, fmt: str, parts: list[torch.Tensor], name: str) -> torch.Tensor:
        """One packed key in transformers' layout, decoded expert by expert straight into it.

        The checkpoint holds the [out, in] layout; where transformers holds the transpose (the
        family's ``transposed``), each expert's decoded (out, in) matrix is written through a
        transposed view, so memory holds the layer's tensor and one expert's, not a second whole copy.
        """
        whole = lambda: self.family.from_gguf(key, [read_packed(fmt, parts, name, torch.bfloat16)])  # noqa: E731
        if parts[0].ndim < 3 or any(p.shape[0] != parts[0].shape[0] for p in parts):  # no expert axis to go by
            return whole()  # or its error, naming the whole tensors' shapes
        first = read_packed(fmt, [p[0] for p in parts], name, torch.bfloat16)  # (out, in), exact
        if first.ndim != 2:  # not (E, ...) of matrices: as a whole, where validation names the shape
            return whole()
        n = parts[0].shape[0]
        hf = (n, *first.shape[::-1]) if key in self.family.transposed else (n, *first.shape)
        w = torch.empty(hf, dtype=torch.bfloat16)
        gguf = w.transpose(-1, -2) if key in self.family.transposed else w  # (E, out, in): a view
        gguf[0] = first
        for e in range(1, n):
            gguf[e] = read_packed(fmt, [p[e] for p in parts], name, torch.bfloat16)
        return w

    def _fuse_experts(self, layer: int, keys: dict[tuple[str, int], str], read) -> dict[str, torch.Tensor]:
        fusion = self.family.fusion
        n = self.family.n_experts(self.config)
        prefix = self.family.layer_prefix(layer)
        for e in range(n):
            for proj in fusion.projs:
                if (proj, e) not in keys:
                    raise MoetraceError(
                        f"{str(self.folder)!r} lacks {prefix}{fusion.per_expert_key(e, proj)}; a per-expert "
                        f"checkpoint needs {', '.join(fusion.projs)} for experts 0..{n - 1}"
                    )
        extra = sorted(e for _, e in keys if e >= n)
        if extra:
            raise MoetraceError(
                f"layer {layer} of {str(self.folder)!r} has expert {extra[0]}, but config.json says "
                f"{self.family.keys.experts}={n}"
            )
        return {fused: self._fuse_one(projs, n, keys, read) for fused, projs in fusion.fused.items()}

    def _fuse_one(self, projs: tuple[str, ...], n: int, keys, read) -> torch.Tensor:
        """(E, sum of rows, cols): the projections ``projs`` of every expert stacked along rows, expert by expert.

        Peak memory is the fused tensor plus one expert's matrices: each expert's mapped checkpoint
        pages leave the resident set once copied (see :meth:`release_layer`; the copy owns the values).
        """
        out = None
        for e in range(n):
            mats = [read(keys[(p, e)]) for p in projs]  # each (rows, cols)
            if out is None:
                rows = mats[0].shape[0]
                out = torch.empty((n, rows * len(projs), mats[0].shape[1]), dtype=mats[0].dtype)  # (E, rows*P, cols)
            rows = out.shape[1] // len(projs)
            for i, (p, t) in enumerate(zip(projs, mats)):
                want = (rows, out.shape[2])
                if tuple(t.shape) != want or t.dtype != out.dtype:
                    raise MoetraceError(
                        f"{keys[(p, e)]} in {str(self.folder)!r} is {t.dtype} {tuple(t.shape)}; "
                        f"expert 0 makes it {out.dtype} {want}"
                    )
                out[e, i * rows:(i + 1) * rows] = t
            del mats, t
            self._release_names([keys[(p, e)] for p in projs])
        return out

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def _tokenizer(self):
        if any((self.folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            return HFTokenizer(self.folder)
        if getattr(self.config, "vocab_size", None) == 256:
            return ByteTokenizer()
        return None


# safetensors dtype names -> torch dtypes viewable straight from the file's bytes.
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _MappedShard:
    """One safetensors file, memory-mapped copy-on-write: tensors are views of the file's bytes.

    Writing to such a tensor changes private pages of this process only, never the file.
    """

    def __init__(self, path: Path, headers: dict):
        import mmap

        self.path = path
        if path.name not in headers:  # parsed and checked once per source: a real shard's header is large
            headers[path.name] = validate.safetensors_header(path)
        self.header, self.base = headers[path.name]
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > self.base else None

    def byte_range(self, name: str) -> tuple[int, int]:
        """(start, end) of tensor ``name``'s bytes in the file."""
        start, end = self.header[name]["data_offsets"]
        return self.base + start, self.base + end

    def release(self, spans: list[tuple[int, int]]) -> int:
        """``madvise(MADV_DONTNEED)`` on the whole pages inside the merged ``spans``; returns the bytes advised."""
        import mmap

        if self.mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return 0
        page = mmap.PAGESIZE
        done = 0
        for start, end in _merge(spans):
            lo, hi = -(-start // page) * page, min(end, len(self.mm)) // page * page  # inward: whole pages only
            if hi > lo:
                self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                done += hi - lo
        return done

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor as a view, or None where it cannot be one (the caller copies it out instead)."""
        info = self.header.get(name)
        if info is None:
            raise MoetraceError(f"tensor {name!r} is not in {str(self.path)!r}, though the index names that shard")
        validate.check_weight_dtype(self.path, name, info["dtype"])
        dtype = _ST_DTYPES.get(info["dtype"]) if info else None
        if dtype is None or self.mm is None or sys.byteorder != "little":
            return None
        start, end = info["data_offsets"]
        item = torch.empty(0, dtype=dtype).element_size()
        if (self.base + start) % item or (end - start) % item or end <= start:
            return None
        t = torch.frombuffer(self.mm, dtype=dtype, count=(end - start) // item, offset=self.base + start)
        return t.reshape(info["shape"])


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, touching or overlapping (start, end) spans joined."""
    out: list[list[int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def open_source(spec: str, plant: str | None = None, progress=None):
    """Open ``builtin:NAME``, a checkpoint folder or a ``.gguf`` file.

    Raises:
        MoetraceError: an unknown built-in name, a missing folder, an unsupported architecture,
            or ``--plant`` given for a model that is not built in.
    """
    if spec.startswith("builtin:") or spec in builtin.PRESETS:
        model = builtin.parse_builtin(spec, plant)
        folder = builtin.materialize(model, progress)
        src = CheckpointSource(folder, model_id=model.model_id, model_hash=model.content_hash)
        src.builtin = model
        return src
    if plant:
        raise MoetraceError("--plant applies to built-in models only (builtin:NAME)")
    if spec.lower().endswith(".gguf"):
        from moetrace.tracer.sources.gguf import GGUFSource

        return GGUFSource(spec)
    src = CheckpointSource(spec)
    src.builtin = None
    return src
