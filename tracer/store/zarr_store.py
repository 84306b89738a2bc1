"""The trace store: one Zarr v3 store per run and variant, ``traces/RUN/VARIANT.zarr``.

Every store opens with plain ``xarray.open_zarr(path)``. The schema, the one place it is defined:

=================  ===============================  =======  =============================================
variable           dims                             dtype    what
=================  ===============================  =======  =============================================
``resid``          (mode, layer, token, hidden)     float32  the decoder layer's output hidden state
``attn_out``       (mode, layer, token, hidden)     float32  attention output, before the residual add
``moe_out``        (mode, layer, token, hidden)     float32  MoE block output, before the residual add
``router_logits``  (mode, layer, token, expert)     float32  router logits
``topk_idx``       (mode, layer, token, k)          int16    chosen experts (-1 where not yet written)
``topk_weight``    (mode, layer, token, k)          float32  their routing weights
``logits``         (mode, token, vocab)             float32  final logits
=================  ===============================  =======  =============================================

Coordinates: ``mode`` (``free``, ``teacher``, ``routing``), ``layer``, ``token`` (0..T-1 over all
sequences), and along ``token``: ``token_id``, ``seq``, ``pos``, ``token_text``.
Attributes: ``moetrace_version``, ``model``, ``model_hash``, ``variant``, ``modes``, ``sites``,
``seed``, ``torch_version``, ``transformers_version``, ``complete``, ``layers_done``, ``created``,
and ``config`` (the run's configuration as JSON).

Per-layer arrays are chunked one (mode, layer) slab per chunk, stored in one shard file per array
and mode (see :class:`_ShardFile`). ``complete`` turns true only after
the last layer and the logits are written, so a run killed midway leaves a store that reads as
incomplete; :func:`open_trace` refuses such a store unless asked to read it anyway.

How far an incomplete store got: after every layer the writer creates an empty marker file
``.moetrace-layers-done.N`` (and removes the one before), and at most every
:data:`ATTRS_INTERVAL_S` seconds it also copies N into the ``layers_done`` attribute.
:func:`layers_done` reads the larger of the two. Rewriting ``zarr.json`` after every layer would
cost more than the layer on a small model: on ext4, replacing a file that has unwritten data
starts its writeback at once (``auto_da_alloc``), and the file creations after it then wait on the
journal (measured: a trace's 97 chunk-file opens took 44 ms instead of 4 ms).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from moetrace.errors import MoetraceError

LAYER_VARS = {
    "resid": ("hidden", "float32"),
    "attn_out": ("hidden", "float32"),
    "moe_out": ("hidden", "float32"),
    "router_logits": ("expert", "float32"),
    "topk_idx": ("k", "int16"),
    "topk_weight": ("k", "float32"),
}
LOCK_NAME = ".moetrace-writer.lock"
PROGRESS_PREFIX = ".moetrace-layers-done."
# The layers_done attribute of an incomplete store is refreshed at most this often (seconds);
# the marker file is exact after every layer.
ATTRS_INTERVAL_S = 2.0


@dataclass
class Tokens:
    """The tokens of a run, flattened over sequences.

    Attributes:
        ids: (token,) int64 token ids.
        seq: (token,) sequence index of each token.
        pos: (token,) position of each token inside its sequence.
        text: (token,) the token's text (its byte for built-in models).
    """

    ids: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    text: np.ndarray

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    def sequences(self) -> list[np.ndarray]:
        """The token ids of each sequence, in order."""
        return [self.ids[self.seq == s] for s in np.unique(self.seq)]


def _quiet():
    # zarr warns that consolidated metadata and string dtypes are not yet in the v3 spec;
    # xarray reads both, and the warnings would bury moetrace's own output.
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", module="zarr")
    warnings.filterwarnings("ignore", message=".*[Cc]onsolidated.*")
    return ctx


class TraceWriter:
    """Writes one variant's trace, one (mode, layer) slab at a time.

    Args:
        path: the ``.zarr`` folder to create.
        sizes: ``layers``, ``hidden``, ``expert``, ``k``, ``vocab``.
        tokens: the run's tokens.
        modes: mode names (the ``mode`` coordinate).
        sites: layer sites to store (plus ``logits`` if listed).
        attrs: attributes to store (model, variant, config, ...).
    """

    def __init__(self, path, sizes: dict, tokens: Tokens, modes, sites, attrs: dict):
        self.path = Path(path)
        self.modes = list(modes)
        self.sites = list(sites)
        self.sizes = dict(sizes)
        self._take_lock()
        coords = {
            "mode": np.array(self.modes, dtype=object),
            "layer": np.arange(sizes["layers"], dtype=np.int64),
            "token": np.arange(tokens.n, dtype=np.int64),
            "token_id": tokens.ids.astype(np.int64),
            "seq": tokens.seq.astype(np.int32),
            "pos": tokens.pos.astype(np.int32),
            "token_text": np.asarray(tokens.text, dtype=object),
        }
        group_attrs = {**_base_attrs(attrs, self.modes, self.sites), "coordinates": " ".join(TOKEN_COORDS)}
        # The data arrays' metadata is written as the Zarr v3 spec states it (what zarr's own
        # create_array writes for these settings; a test compares them): a few JSON files,
        # where creating them through zarr's event loop took longer than a small model's forward.
        m, L, T = len(self.modes), sizes["layers"], tokens.n
        metas = {}
        for name, (last, dtype) in LAYER_VARS.items():
            if name in self.sites:
                fill = -1 if dtype == "int16" else np.nan
                metas[name] = _sharded_meta((m, L, T, sizes[last]), (1, L, T, sizes[last]), (1, 1, T, sizes[last]),
                                            dtype, fill,
                                          ("mode", "layer", "token", last))
        if "logits" in self.sites:
            V = sizes["vocab"]
            metas["logits"] = _array_meta((m, T, V), (1, logit_chunk_tokens(T, V), V), "float32", np.nan,
                                          ("mode", "token", "vocab"))
        self._attach(metas)
        self._markers, self._done = set(_markers(self.path)), 0  # an earlier store's markers go with it
        # Created by the writer thread, first in its queue, while the first layer computes.
        self._submit(self._create, group_attrs, coords, metas)

    def _create(self, group_attrs: dict, coords: dict, metas: dict) -> None:
        """Write the group, its coordinate arrays and the data arrays' metadata.

        Everything is written as the Zarr v3 spec states it, the way xarray lays out a dataset
        (a test compares the result with xarray's own ``to_zarr`` of the same coordinates): a
        few small files, where going through xarray and zarr's event loop took as long as a
        small model's forward pass, holding the interpreter lock the forward needs.
        """
        # Replace an earlier store of the same name, but keep this writer's lock file.
        for child in self.path.iterdir():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        for name, values in coords.items():
            dims = (name,) if name in ("mode", "layer", "token") else ("token",)
            if values.dtype == object:
                meta = _array_meta(values.shape, values.shape, "string", "", dims)
                meta["codecs"] = [{"name": "vlen-utf8", "configuration": {}}]
                data = _vlen_utf8(values)
            else:
                meta = _array_meta(values.shape, values.shape, values.dtype.name, 0, dims)
                data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
            _write_json(self.path / name / "zarr.json", meta)
            with open(self.path / name / CHUNK_SEPARATOR.join(["c", "0"]), "wb") as fh:
                fh.write(data)
        for name, meta in metas.items():
            _write_json(self.path / name / "zarr.json", meta)
        _write_json(self.path / "zarr.json", {"attributes": group_attrs, "zarr_format": 3, "node_type": "group"})

    def _attach(self, metas: dict | None = None) -> None:
        """Set up writing into the store at ``self.path`` (also used to reopen a store, tracer/execution/resume.py).

        Args:
            metas: the arrays' metadata, where the caller creates them; None reads it from disk.
        """
        # Arrays whose chunks are plain little-endian bytes (every array this version creates):
        # their chunks are written straight to the chunk file the Zarr v3 spec names, without
        # zarr's codec pipeline and event loop. Others (stores of earlier versions) go through zarr.
        if metas is None:
            metas = {}
            for name in list(LAYER_VARS) + ["logits"]:
                f = self.path / name / "zarr.json"
                if name in self.sites and f.is_file():
                    metas[name] = json.loads(f.read_text())
        self._meta = dict(metas)
        self._raw_chunks = {name for name, meta in self._meta.items() if _plain_chunks(meta)}
        self._sharded = {name for name, meta in self._meta.items() if _our_shards(meta)}
        self._shards: dict[tuple[str, int], _ShardFile] = {}  # (array, mode index) -> open shard, writer thread only
        self._zarr_arrays: dict = {}
        # One background thread writes, in submission order, while the next layer computes;
        # layers_done is set by that same thread after the layer's chunks, so it never runs ahead.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetrace-store")
        self._pending: list = []  # writes of the layer being traced
        self._older: list = []  # writes of the layer before
        self._markers = set(_markers(self.path))  # progress markers present (a resumed store has one)
        self._done = layers_done(self.path) if self._markers else 0
        self._attrs_at = time.monotonic()  # when the layers_done attribute was last written

    def _chunk_path(self, name: str, index: tuple) -> Path:
        """The file of chunk ``index`` of array ``name``: the Zarr v3 default chunk key encoding."""
        sep = self._meta[name]["chunk_key_encoding"]["configuration"]["separator"]
        return self.path / name / sep.join(["c", *map(str, index)])

    def _zarr_array(self, name: str):
        if name not in self._zarr_arrays:
            import zarr

            ctx = _quiet()
            try:
                self._zarr_arrays[name] = zarr.open_array(self.path / name, mode="r+")
            finally:
                ctx.__exit__(None, None, None)
        return self._zarr_arrays[name]

    def _set_attrs(self, **values) -> None:
        """Update the store's attributes in its group metadata (one atomic file replace)."""
        f = self.path / "zarr.json"
        meta = json.loads(f.read_text())
        meta.setdefault("attributes", {}).update(values)
        _write_json(f, meta)

    def _submit(self, fn, *args):
        for f in self._pending + self._older:
            if f.done() and f.exception() is not None:
                raise f.exception()
        self._pending.append(self._pool.submit(fn, *args))

    def flush(self) -> None:
        """Wait for every submitted write; re-raise the first write error."""
        pending, self._older, self._pending = self._older + self._pending, [], []
        for f in pending:
            f.result()

    def _take_lock(self):
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_NAME
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock.read_text().strip() if lock.exists() else "?"
            if pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # a killed run's lock: stale
                return self._take_lock()
            raise MoetraceError(
                f"{self.path} is being written by another moetrace run (process {pid}); "
                f"wait for it, or remove {lock} if that process is gone"
            ) from None
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)

    def release(self):
        """Stop writing (after the writes already submitted) and drop the writer lock."""
        try:
            self._pool.shutdown(wait=True)
        except AttributeError:  # failed before the pool existed
            pass
        if hasattr(self, "_shards"):
            self._close_shards()
        (self.path / LOCK_NAME).unlink(missing_ok=True)

    def write_layer(self, mode: str, layer: int, record: dict) -> None:
        """Store one layer's recorded sites (tensors of shape (token, n)) for one mode."""
        mi = self.modes.index(mode)
        chunks = []  # written by one task: a handoff to the writer thread per layer, not per site
        for name in LAYER_VARS:
            if name in self.sites and name in record:
                arr = record[name].detach().to("cpu", dtype=_torch_dtype(LAYER_VARS[name][1])).numpy()
                if name in self._sharded:
                    chunks.append((name, mi, layer, arr))
                elif name in self._raw_chunks:
                    self._submit(_write_chunk, self._chunk_path(name, (mi, layer, 0, 0)), arr)
                else:
                    self._submit(self._zarr_array(name).__setitem__, (mi, layer), arr)
        if chunks:
            self._submit(self._write_inner, chunks)

    def _write_inner(self, chunks: list) -> None:
        """(array, mode index, layer, values) -> that layer's slot in the mode's shard file (writer thread)."""
        for name, mi, layer, arr in chunks:
            key = (name, mi)
            if key not in self._shards:
                meta = self._meta[name]
                self._shards[key] = _ShardFile(self._chunk_path(name, (mi, 0, 0, 0)), meta["shape"][1],
                                               int(np.prod(meta["shape"][2:])) * np.dtype(meta["data_type"]).itemsize)
            self._shards[key].write(layer, arr)

    def _close_shards(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards = {}

    def write_logits(self, mode: str, logits) -> None:
        """Store the (token, vocab) logits of one mode, one chunk of tokens per file."""
        if "logits" not in self.sites:
            return
        arr = logits.detach().float().cpu().numpy()
        mi = self.modes.index(mode)
        if "logits" not in self._raw_chunks:
            self._submit(self._zarr_array("logits").__setitem__, mi, arr)
            return
        tc = self._meta["logits"]["chunk_grid"]["configuration"]["chunk_shape"][1]
        for j, a in enumerate(range(0, arr.shape[0], tc)):
            part = arr[a:a + tc]
            if part.shape[0] < tc:  # the edge chunk is stored at full chunk size, padded with the fill
                part = np.concatenate([part, np.full((tc - part.shape[0], arr.shape[1]), np.nan, np.float32)])
            self._submit(_write_chunk, self._chunk_path("logits", (mi, j, 0)), part)

    def mark_layers_done(self, n: int) -> None:
        """Record that layers 0..n-1 are fully written (every mode), once their writes have landed."""
        writes = self._older + self._pending  # this layer's writes, the layer before's and its mark

        def mark():
            # The pool runs one task at a time, in order: these are finished. A write that failed
            # after the main thread last looked must not be covered by layers_done (resume trusts it).
            for f in writes:
                if f.exception() is not None:
                    raise f.exception()
            self._mark(int(n))

        self._submit(mark)
        # Bound memory: at most two layers' writes in flight.
        older, self._older, self._pending = self._older, self._pending, []
        for f in older:
            f.result()

    def _mark(self, n: int) -> None:
        """Record n layers done: a new marker file (empty, so creating it is cheap), then the old ones go."""
        marker = self.path / f"{PROGRESS_PREFIX}{n}"
        os.close(os.open(marker, os.O_CREAT | os.O_WRONLY, 0o644))
        for old in self._markers - {marker.name}:
            (self.path / old).unlink(missing_ok=True)
        self._markers = {marker.name}
        self._done = n
        now = time.monotonic()
        if now - self._attrs_at >= ATTRS_INTERVAL_S:
            self._set_attrs(layers_done=n)
            self._attrs_at = now

    def finish(self) -> None:
        self.flush()
        self._pool.shutdown()
        self._close_shards()
        # One rewrite of the group metadata: complete, the final count, and the arrays' metadata.
        _consolidate(self.path, complete=True, layers_done=self._done)
        for old in self._markers:
            (self.path / old).unlink(missing_ok=True)
        self._markers = set()
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The per-layer arrays are sharded (Zarr v3 "sharding_indexed"): one shard file per array and mode
# holds every layer's chunk, so a run creates a few files per store instead of one per layer and
# site (creating them, on ext4, cost as much as writing their bytes: builtin:mini, all sites,
# 97 chunk files per run, 17% over recording nothing; one file, 8%). Readers still get one chunk
# per layer (xarray's dask chunks are the inner chunks). The layout inside a shard file is this
# writer's choice, which the shard index (at the start, raw little-endian uint64 pairs) describes:
# layer l's bytes at DIRECT_ALIGN-aligned offset ``data_start + l * stride``, so a layer's slot is
# known before it is written and can be written, and rewritten on resume, in place.
DIRECT_ALIGN = 4096  # memory, length and offset alignment every Linux block device accepts for O_DIRECT
_EMPTY = np.iinfo(np.uint64).max  # the index entry of a chunk not written (reads as the fill value)
_SHARD_CODEC = "sharding_indexed"


def _sharded_meta(shape, shard, inner, dtype: str, fill, dims) -> dict:
    meta = _array_meta(shape, shard, dtype, fill, dims)
    meta["codecs"] = [{"name": _SHARD_CODEC, "configuration": {
        "chunk_shape": list(inner),
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "index_location": "start",
    }}]
    return meta


def _our_shards(meta: dict) -> bool:
    """True for a per-layer array sharded as this writer lays it out: (1, L, ...) shards of (1, 1, ...) raw chunks."""
    codecs = meta.get("codecs") or []
    if len(codecs) != 1 or codecs[0].get("name") != _SHARD_CODEC or meta.get("storage_transformers"):
        return False
    cfg = codecs[0]["configuration"]
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}]
    return (cfg.get("codecs") == raw and cfg.get("index_codecs") == raw and cfg.get("index_location") == "start"
            and len(shard) == 4 and shard[0] == 1 and shard[1] == meta["shape"][1]
            and cfg["chunk_shape"] == [1, 1, *shard[2:]]
            and meta.get("chunk_key_encoding", {}).get("name") == "default")


class _ShardFile:
    """One shard file of a per-layer array (one mode, every layer), written a layer at a time.

    The data goes in with O_DIRECT where the file system takes it (see :func:`_write_chunk`);
    the index, a few hundred bytes rewritten after every layer, through the page cache (a second,
    buffered descriptor: the ranges never overlap, and an O_DIRECT write waits for the disk, which
    at the end of a run the main thread waited for). A layer's bytes are written before its index
    entry, so the index never points at a slot not yet written; a layer written again (a resumed
    run) is overwritten in place.
    """

    def __init__(self, path: Path, n_chunks: int, chunk_bytes: int):
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.index_bytes = n_chunks * 16
        self.data_start = _align(self.index_bytes)
        self.stride = _align(chunk_bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.index = np.full((n_chunks, 2), _EMPTY, dtype="<u8")
        existing = path.is_file()
        if existing:  # a resumed store: keep the entries already written
            with open(path, "rb") as fh:
                raw = fh.read(self.index_bytes)
            if len(raw) == self.index_bytes:
                self.index = np.frombuffer(raw, dtype="<u8").reshape(n_chunks, 2).copy()
        self.direct = _direct_io_wanted()
        self.fd = self._open()
        self.index_fd = os.open(path, os.O_WRONLY)
        if not existing:
            self._write_index()

    def _open(self) -> int:
        if self.direct:
            try:
                return os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
        return os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o644)

    def _write(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if self.direct:
            try:
                _pwrite_direct(self.fd, data, offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.fd)  # this file system opened with O_DIRECT but cannot write that way
                self.direct = False
                self.fd = self._open()
        done = 0
        while done < n:
            done += os.pwrite(self.fd, data[done:], offset + done)

    def write(self, layer: int, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        data = memoryview(arr).cast("B")
        if len(data) != self.chunk_bytes:
            raise ValueError(f"{self.path}: layer {layer} has {len(data)} bytes, its chunk {self.chunk_bytes}")
        offset = self.data_start + layer * self.stride
        self._write(offset, data)
        self.index[layer] = (offset, self.chunk_bytes)
        self._write_index()

    def _write_index(self) -> None:
        data = memoryview(self.index).cast("B")
        done = 0
        while done < len(data):
            done += os.pwrite(self.index_fd, data[done:], done)

    def close(self) -> None:
        for name in ("fd", "index_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _align(n: int) -> int:
    return -(-n // DIRECT_ALIGN) * DIRECT_ALIGN


def _plain_chunks(meta: dict) -> bool:
    """True if an array stores each chunk as its raw little-endian bytes under a default key (c.i.j... or c/i/j/...)."""
    return (
        meta.get("codecs") == [{"name": "bytes", "configuration": {"endian": "little"}}]
        and meta.get("chunk_key_encoding", {}).get("name") == "default"
        and meta["chunk_key_encoding"].get("configuration", {}).get("separator") in ("/", ".")
        and not meta.get("storage_transformers")
    )


# Chunk keys "c.M.L.0.0": one flat folder per array. With "/" every chunk needs its own nested
# folders, and creating them cost more than writing the chunks (measured: 48 one-megabyte chunks
# in 150 ms nested, 20 ms flat).
CHUNK_SEPARATOR = "."


def _array_meta(shape, chunks, dtype: str, fill, dims) -> dict:
    """Zarr v3 array metadata: a regular chunk grid, default chunk keys with '.', raw little-endian bytes."""
    return {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": CHUNK_SEPARATOR}},
        "fill_value": "NaN" if isinstance(fill, float) and np.isnan(fill) else fill,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": {},
        "dimension_names": list(dims),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


# Coordinates along ``token`` besides the dimension itself (xarray's "coordinates" group attribute).
TOKEN_COORDS = ("pos", "seq", "token_id", "token_text")


def _vlen_utf8(values) -> bytes:
    """The Zarr ``vlen-utf8`` chunk encoding: item count, then each item's byte length and UTF-8 bytes."""
    parts = [len(values).to_bytes(4, "little")]
    for v in values.reshape(-1):
        b = str(v).encode("utf-8")
        parts += [len(b).to_bytes(4, "little"), b]
    return b"".join(parts)


def _consolidate(path: Path, **attrs) -> None:
    """Inline every array's metadata in the group's zarr.json, as zarr's consolidate_metadata does
    (a test compares the two), so readers open the store with one file read; ``attrs`` are set in
    the same write."""
    group = json.loads((path / "zarr.json").read_text())
    group.setdefault("attributes", {}).update(attrs)
    metadata = {}
    for child in sorted(path.iterdir()):
        f = child / "zarr.json"
        if child.is_dir() and f.is_file():
            metadata[child.name] = json.loads(f.read_text())
    group["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": metadata}
    _write_json(path / "zarr.json", group)


def _markers(path: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(path) if e.name.startswith(PROGRESS_PREFIX)]
    except FileNotFoundError:
        return []


def layers_done(path) -> int:
    """How many layers of the store at ``path`` are fully written (0..layers_done-1 can be trusted).

    The larger of the ``layers_done`` attribute and the progress marker files (see the module's
    docstring); a store without either has 0.
    """
    path = Path(path)
    try:
        attr = int(json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("layers_done", 0))
    except (OSError, ValueError):
        attr = 0
    marks = [int(m[len(PROGRESS_PREFIX):]) for m in _markers(path) if m[len(PROGRESS_PREFIX):].isdigit()]
    return max([attr, *marks])


def _write_json(path: Path, obj: dict) -> None:
    """Write a metadata file atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# Logits are chunked along tokens so a chunk stays near this size whatever the vocabulary
# (a real vocabulary of 152k entries over 100k tokens would otherwise be one 60 GB chunk).
LOGIT_CHUNK_BYTES = 64 << 20


def logit_chunk_tokens(n_tokens: int, vocab: int) -> int:
    return max(1, min(n_tokens, LOGIT_CHUNK_BYTES // (4 * vocab)))


# Chunk files are written with O_DIRECT where the file system takes it: the bytes go from an
# aligned staging buffer to the disk without passing through the page cache, so writing costs the
# writer thread little CPU and leaves no dirty pages for the kernel's writeback to process later,
# both of which compete with the forward passes for the cores. Buffered writes remain for file
# systems that refuse O_DIRECT (tmpfs, some network file systems) and with MOETRACE_DIRECT_IO=0.
# Measured on 2 cores, ext4, outputs kept (benchmarks/bench_trace_overhead.py): see README.
_direct = threading.local()


def _direct_io_wanted() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("MOETRACE_DIRECT_IO", "1") != "0"


# The staging buffer holds at most this much: a large chunk (a long run's resid: 8 KiB per token
# at Qwen3-30B-A3B's width) goes through it in pieces rather than doubling its memory.
STAGING_BYTES = 8 << 20


def _staging(n: int) -> memoryview:
    """This thread's page-aligned buffer of at least ``n`` bytes (anonymous mmap memory is page aligned)."""
    import mmap

    buf = getattr(_direct, "buf", None)
    if buf is None or len(buf) < n:
        buf = _direct.buf = mmap.mmap(-1, max(n, 1 << 20))
    return memoryview(buf)


def _pwrite_direct(fd: int, data: memoryview, offset: int) -> int:
    """Write ``data`` at ``offset`` (aligned) to an O_DIRECT descriptor, in staged pieces, the last one
    padded with zeros to the alignment. Returns the padded length written."""
    n = len(data)
    stage = _staging(min(_align(n), STAGING_BYTES))
    pos = 0
    while pos < n:
        k = min(n - pos, STAGING_BYTES)
        padded = _align(k)
        stage[:k] = data[pos:pos + k]
        if padded > k:
            stage[k:padded] = bytes(padded - k)
        done = 0
        while done < padded:  # a short write returns what the device took; write the rest
            done += os.pwrite(fd, stage[done:padded], offset + pos + done)
        pos += padded
    return _align(n)


def _write_direct(tmp: Path, data: memoryview) -> bool:
    """Write ``data`` to a new file ``tmp`` with O_DIRECT; False where the file system refuses it."""
    n = len(data)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        if n and _pwrite_direct(fd, data, 0) > n:
            os.ftruncate(fd, n)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EINVAL:  # opened, but this file system cannot write that way
            return False
        raise
    os.close(fd)
    return True


def _write_chunk(path: Path, arr: np.ndarray) -> None:
    """Write one full chunk's bytes atomically (a reader sees the old chunk or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))  # no copy on little-endian machines
    data = memoryview(arr).cast("B")
    use_direct = _direct_io_wanted() and getattr(_direct, "works", True)
    if not (use_direct and _write_direct(tmp, data)):
        if use_direct:
            _direct.works = False  # refused: this writer thread (one per store) writes buffered from now on
        with open(tmp, "wb") as fh:
            fh.write(data)
    os.replace(tmp, path)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "int16": torch.int16}[name]


def _base_attrs(attrs: dict, modes, sites) -> dict:
    import torch
    import transformers

    import moetrace

    out = {
        "moetrace_version": moetrace.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "modes": list(modes),
        "sites": list(sites),
        "complete": False,
        "layers_done": 0,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.update(attrs)
    return out


def open_trace(path, allow_incomplete: bool = False):
    """Open one variant's trace as an xarray Dataset (lazily).

    Raises:
        MoetraceError: the path is no trace store, or the store is incomplete (unless
            ``allow_incomplete``).
    """
    import xarray as xr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise MoetraceError(f"{str(path)!r} is not a moetrace trace store (no zarr.json)")
    ctx = _quiet()
    try:
        consolidated = "consolidated_metadata" in json.loads((path / "zarr.json").read_text())
        ds = xr.open_zarr(path, consolidated=consolidated if consolidated else False)
    finally:
        ctx.__exit__(None, None, None)
    if "variant" not in ds.attrs:
        raise MoetraceError(f"{str(path)!r} is a Zarr store but not a moetrace trace (no 'variant' attribute)")
    if not ds.attrs.get("complete"):
        ds.attrs["layers_done"] = layers_done(path)  # the attribute may lag the progress marker
    if not ds.attrs.get("complete") and not allow_incomplete:
        raise MoetraceError(
            f"{str(path)!r} is incomplete ({ds.attrs.get('layers_done', 0)} of {ds.sizes.get('layer', '?')} layers "
            f"written): the run that wrote it stopped; continue it with `moetrace run --resume`"
        )
    return ds


def list_stores(run_dir) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MoetraceError(f"run folder {str(run_dir)!r} does not exist")
    stores = sorted(p for p in run_dir.glob("*.zarr") if (p / "zarr.json").is_file())
    if not stores:
        raise MoetraceError(f"run folder {str(run_dir)!r} holds no trace stores (*.zarr)")
    return stores


def open_traces(run_dir, allow_incomplete: bool = False):
    """All variants of a run as one Dataset along a new ``variant`` dimension.

    The reference has only the ``free`` mode; variants missing a mode are NaN there.
    """
    import xarray as xr

    datasets = [open_trace(p, allow_incomplete) for p in list_stores(run_dir)]
    names = [d.attrs["variant"] for d in datasets]
    out = xr.concat(datasets, dim="variant", join="outer", combine_attrs="drop_conflicts",
                    coords="minimal", compat="override")
    return out.assign_coords(variant=np.array(names, dtype=object))
