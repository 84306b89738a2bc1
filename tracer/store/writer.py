"""The trace writer: a store created and filled through zarr-python's public API (schema: tracer/store/schema.py).

One background thread does every store operation, in submission order, while the next layer
computes; the executor's calls only convert tensors and hand them over.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from moetrace.tracer.store import lock as _lock
from moetrace.tracer.store import location as loc_
from moetrace.tracer.store import schema as S
from moetrace.tracer.store.schema import Tokens, quiet


def create_data_array(group, spec: S.ArraySpec):
    """One data array: a chunk per (mode, layer) slab, raw little-endian bytes then a CRC-32C checksum."""
    from zarr.codecs import BytesCodec, Crc32cCodec

    return group.create_array(
        spec.name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=spec.fill,
        serializer=BytesCodec(), compressors=[Crc32cCodec()], filters=None, dimension_names=spec.dims,
        chunk_key_encoding={"name": "default", "separator": S.CHUNK_SEPARATOR},
        # Written even where a chunk equals the fill value (a NaN layer), so every chunk of a
        # healthy store is present and a missing one means damage (tracer/store/reader.py).
        config={"write_empty_chunks": True},
    )


class TraceWriter:
    """Writes one variant's trace, one (mode, layer) slab at a time.

    Args:
        path: the ``.zarr`` store to create: a local folder or a URL (``s3://bucket/run/v.zarr``).
        sizes: ``layers``, ``hidden``, ``expert``, ``k``, ``vocab``.
        tokens: the run's tokens.
        modes: mode names (the ``mode`` coordinate).
        sites: layer sites to store (plus ``logits`` if listed).
        attrs: attributes to store (model, variant, config, ...).
        storage_options: fsspec options for a URL (None: from the environment).
    """

    def __init__(self, path, sizes: dict, tokens: Tokens, modes, sites, attrs: dict,
                 storage_options: dict | None = None):
        self.path = loc_.as_location(path)
        self.storage_options = storage_options
        self.modes = list(modes)
        self.sizes = dict(sizes)
        self.sites = S.stored_sites(sites, self.sizes)
        _lock.acquire(self.path, storage_options)
        self._locked = True
        specs = S.data_specs(sizes, len(self.modes), tokens.n, self.sites)
        coords = S.coordinates(self.modes, sizes, tokens, self.sites)
        self._index_layers(sizes)
        group_attrs = S.base_attrs(attrs, self.modes, self.sites)
        self._start(markers=set(), done=0)
        # Created by the writer thread, first in its queue, while the first layer computes.
        self._submit(self._create, group_attrs, coords, specs)

    def _start(self, markers: set, done: int) -> None:
        """Start the writer thread (also used to reopen a store, tracer/execution/resume.py)."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetrace-store")
        self._pending: list = []  # writes of the layer being traced
        self._older: list = []  # writes of the layer before
        self._markers = set(markers)  # progress markers present (a resumed store has one)
        self._done = done
        self._attrs_at = time.monotonic()  # when the layers_done attribute was last written

    def _store(self):
        return loc_.zarr_store(self.path, read_only=False, storage_options=self.storage_options, chunk_writes=True)

    def _create(self, group_attrs: dict, coords: dict, specs: list) -> None:
        """Replace an earlier store of the same name (but keep this writer's lock) and create the arrays."""
        import zarr

        for name in loc_.names(self.path, self.storage_options):
            if name != S.LOCK_NAME:
                loc_.remove(self.path, name, self.storage_options)
        with quiet(), compact_metadata():
            group = zarr.create_group(self._store(), attributes=group_attrs, zarr_format=3)
            for name, (dims, values) in coords.items():
                a = group.create_array(name, shape=values.shape, chunks=values.shape,
                                       dtype=str if values.dtype == object else values.dtype,
                                       dimension_names=dims, compressors=None, fill_value=None)
                a[...] = values
            self._group = group
            self._arrays = {spec.name: create_data_array(group, spec) for spec in specs}

    def _index_layers(self, sizes: dict) -> None:
        """Per layer dimension: decoder-layer index -> position along it."""
        self._pos = {d: {L: i for i, L in enumerate(S.layer_list(sizes, d))} for d in S.LAYER_DIM_NAMES}

    def attach(self, group) -> None:
        """Write into an existing store's ``group`` (a resumed run; called on the writer thread)."""
        self._group = group
        self._arrays = {name: group[name] for name in [*S.LAYER_VARS, "logits"]
                        if name in self.sites and name in group}
        # The table's slabs of modes that do not compute it are all fill values; the config that writes such
        # chunks anyway (create_data_array) is not stored with an array, so a reopened one is told again.
        self._arrays.update({name: group[name].with_config({"write_empty_chunks": True})
                             for name in S.TABLE_VARS if name in group})

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

    def write_layer(self, mode: str, layer: int, record: dict) -> None:
        """Store one layer's recorded sites (tensors of shape (token, n)) for one mode."""
        mi = self.modes.index(mode)
        slabs = []  # one task per layer: a handoff to the writer thread per layer, not per site
        for name, (_, dtype) in S.LAYER_VARS.items():
            if name in self.sites and name in record:
                i = self._pos[S.LAYER_DIMS[name]].get(layer)
                if i is None:
                    from moetrace.errors import InternalError

                    raise InternalError(f"site {name} recorded at layer {layer}, which its store has no slab for")
                slabs.append((name, i, record[name].detach().to("cpu", dtype=_torch_dtype(dtype)).numpy()))
        for name, (_, dtype) in S.TABLE_VARS.items():  # the per-expert table: stores that have it
            if name in record and self.sizes.get("expert_table"):
                slabs.append((name, self._pos["moe_layer"][layer],
                              record[name].detach().to("cpu", dtype=_torch_dtype(dtype)).numpy()))
        if slabs:
            self._submit(self._write_slabs, mi, layer, slabs)

    def _write_slabs(self, mi: int, layer: int, slabs: list) -> None:
        """One layer's chunks, every array's at once: one round trip to zarr's event loop for the layer,
        where a synchronous ``array[mi, i] = x`` per site costs one each (and the chunks' encoding and
        file writes then overlap each other)."""
        import asyncio

        from zarr.core.sync import sync  # what zarr's synchronous Array runs its coroutines with

        async def write_all():
            # (token, n) each: exactly one chunk of its array, handed over with the chunk's own
            # (1, 1, token, n) shape, which zarr encodes as it is (any other shape is first
            # copied into a new chunk-shaped buffer).
            await asyncio.gather(*(self._arrays[name].async_array.setitem(
                (slice(mi, mi + 1), slice(i, i + 1)), arr[None, None]) for name, i, arr in slabs))

        with quiet():
            sync(write_all())

    def write_logits(self, mode: str, logits) -> None:
        """Store the (token, vocab) logits of one mode."""
        if "logits" not in self.sites:
            return
        arr = logits.detach().float().cpu().numpy()  # (token, vocab)
        self._submit(self._write_logits, self.modes.index(mode), arr)

    def _write_logits(self, mi: int, arr: np.ndarray) -> None:
        with quiet():
            self._arrays["logits"][mi] = arr

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
        """Record n layers done: a new marker object (empty, so creating it is cheap), then the old ones go."""
        marker = f"{S.PROGRESS_PREFIX}{n}"
        loc_.touch(self.path, marker, self.storage_options)
        for old in self._markers - {marker}:
            loc_.remove(self.path, old, self.storage_options)
        self._markers = {marker}
        self._done = n
        now = time.monotonic()
        if now - self._attrs_at >= S.ATTRS_INTERVAL_S:
            with quiet(), compact_metadata():
                self._group.attrs.update({"layers_done": n})
            self._attrs_at = now

    def finish(self, attrs: dict | None = None) -> None:
        """Wait for the writes, mark the store complete (adding ``attrs``, e.g. the run's findings),
        consolidate its metadata, drop the lock."""
        import zarr

        self.flush()
        self._pool.shutdown()
        with quiet(), compact_metadata():
            self._group.attrs.update({**(attrs or {}), "complete": True, "layers_done": self._done})
            zarr.consolidate_metadata(self._store())
        for old in self._markers:
            loc_.remove(self.path, old, self.storage_options)
        self._markers = set()
        self.release()

    def release(self) -> None:
        """Stop writing (after the writes already submitted) and drop the writer lock."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        if getattr(self, "_locked", False):
            _lock.release(self.path, self.storage_options)
            self._locked = False


def compact_metadata():
    """zarr's metadata documents written on one line while this context lasts.

    zarr indents them by default (``json_indent`` 2), which sends every document through Python's
    pure-Python JSON encoder: a store's creation and its consolidated metadata then cost more CPU
    than a layer's chunks on builtin:mini (measured with yappi over benchmarks/bench_store_write.py).
    Without indentation the C encoder writes the same content.
    """
    import zarr

    return zarr.config.set({"json_indent": None})


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "int16": torch.int16, "int32": torch.int32}[name]
