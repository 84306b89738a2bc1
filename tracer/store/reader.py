"""Reading trace stores, with the integrity checks every moetrace command goes through.

:func:`open_trace` is the one door: it checks, from the store's listing, that every chunk the
store's progress promises is present and of its encoded size (zarr would read a missing chunk as
the fill value, NaN, and the comparisons would then print numbers), and it wraps every data
variable so that a chunk failing its CRC-32C checksum on read raises a one-line
:class:`MoetraceError` naming the store, the variable and the layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.hooks.sites import FINAL_SITES
from moetrace.tracer.store import location as loc_
from moetrace.tracer.store import schema as S
from moetrace.tracer.store.schema import quiet


def layers_done(path, storage_options: dict | None = None) -> int:
    """How many layers of the store at ``path`` are fully written (0..layers_done-1 can be trusted).

    The larger of the ``layers_done`` attribute and the progress markers (see tracer/store/schema.py).
    """
    attr = 0
    try:
        with quiet():
            attr = int(_group(path, storage_options).attrs.get("layers_done", 0))
    except Exception:  # no group metadata (yet): only the markers tell
        pass
    tail = [n[len(S.PROGRESS_PREFIX):] for n in loc_.names(path, storage_options) if n.startswith(S.PROGRESS_PREFIX)]
    return max([attr, *(int(t) for t in tail if t.isdigit())])


def _group(path, storage_options=None):
    import zarr

    return zarr.open_group(loc_.zarr_store(path, read_only=True, storage_options=storage_options), mode="r")


def open_trace(path, allow_incomplete: bool = False, storage_options: dict | None = None):
    """Open one variant's trace as an xarray Dataset (lazily), checked (see the module docstring).

    Args:
        path: the store: a local folder or a URL.
        storage_options: fsspec options for a URL (None: from the environment).

    Raises:
        MoetraceError: the path is no trace store, the store is incomplete (unless
            ``allow_incomplete``), or it is damaged (a chunk missing, truncated, or failing its checksum).
    """
    import xarray as xr

    import moetrace.tracer.analysis  # noqa: F401 (registers the ds.moetrace accessor on what this returns)

    path = loc_.as_location(path)
    if not loc_.exists(loc_.join(path, "zarr.json"), storage_options):
        raise MoetraceError(f"{str(path)!r} is not a moetrace trace store (no zarr.json)")
    with quiet():
        try:
            group = _group(path, storage_options)
            ds = xr.open_zarr(loc_.zarr_store(path, read_only=True, storage_options=storage_options),
                              consolidated=group.metadata.consolidated_metadata is not None)
        except (ValueError, KeyError, json.JSONDecodeError, OSError) as e:
            raise MoetraceError(f"{str(path)!r} is a damaged trace store: its metadata does not open ({e})") from None
    if "variant" not in ds.attrs:
        raise MoetraceError(f"{str(path)!r} is a Zarr store but not a moetrace trace (no 'variant' attribute)")
    if not ds.attrs.get("complete"):
        ds.attrs["layers_done"] = layers_done(path, storage_options)  # the attribute may lag the progress marker
    if not ds.attrs.get("complete") and not allow_incomplete:
        raise MoetraceError(
            f"{str(path)!r} is incomplete ({ds.attrs.get('layers_done', 0)} of {ds.sizes.get('layer', '?')} layers "
            f"written): the run that wrote it stopped; continue it with `moetrace run --resume`"
        )
    done = ds.sizes.get("layer", 0) if ds.attrs.get("complete") else int(ds.attrs.get("layers_done", 0))
    check_chunks_present(path, group, list(ds.data_vars), bool(ds.attrs.get("complete")), done, storage_options)
    out = _checked_reads(ds, group, str(path), None if ds.attrs.get("complete") else done)
    out.encoding["source"] = str(path)  # messages name the store a trace came from (analysis.common.store_name)
    return out


def _encoded_size(meta) -> int | None:
    """The byte size of every stored chunk of an array, where the codecs fix it (None for sharded arrays)."""
    names = [c.to_dict()["name"] for c in meta.codecs]
    raw = int(np.prod(meta.chunk_grid.chunk_shape)) * meta.dtype.to_native_dtype().itemsize
    if names == ["bytes", "crc32c"]:
        return raw + S.CHECKSUM_BYTES
    if names == ["bytes"]:
        return raw
    return None


def _slab(dims, mode_names, index, layers=None) -> str:
    parts = []
    for d, i in zip(dims, index):
        if d in ("layer", "moe_layer", "dense_layer"):
            L = layers[d][i] if layers and d in layers and i < len(layers[d]) else i
            parts.insert(0, f"of layer {L}")
        elif d == "mode":
            parts.append(f"({mode_names[i]})")
    return " ".join(parts)


def check_chunks_present(path, group, names, complete: bool, done: int, storage_options=None) -> None:
    """Every chunk the store's progress promises exists with its encoded size.

    Arrays with a ``layer`` dimension must hold the chunks of layers ``0..done-1``; the others
    (and coordinates) every chunk once the store is complete.

    Raises:
        MoetraceError: naming the store, the variable and the layer of the first bad chunk.
    """
    present = loc_.listing(path, storage_options)
    modes = [str(m) for m in group["mode"][...]] if "mode" in group else []
    layers = {d: [int(x) for x in group[d][...]] for d in ("moe_layer", "dense_layer") if d in group}
    for name in names:
        a = group[name]
        meta = a.metadata
        dims = list(meta.dimension_names or [])
        grid = [-(-s // c) for s, c in zip(a.shape, meta.chunk_grid.chunk_shape)]
        if "layer" in dims:
            li = dims.index("layer")
            grid[li] = -(-done // meta.chunk_grid.chunk_shape[li])
        elif set(dims) & set(layers):  # only the layers of one kind: those below `done` are promised
            li = next(i for i, d in enumerate(dims) if d in layers)
            n = sum(1 for L in layers[dims[li]] if L < done)
            grid[li] = -(-n // meta.chunk_grid.chunk_shape[li])
        elif not complete:
            continue
        want = _encoded_size(meta)
        for index in np.ndindex(*grid):
            key = f"{name}/{meta.chunk_key_encoding.encode_chunk_key(index)}"
            got = present.get(key)
            if got is None or (want is not None and got != want):
                what = "missing" if got is None else f"truncated or padded ({got} bytes, {want} expected)"
                where = _slab(dims, modes, index, layers)
                raise MoetraceError(f"{str(path)!r} is damaged: {name} {where} - chunk {key} is {what}; trace it again")


class _Checked:
    """A zarr array whose reads name the store, variable and layer when a chunk fails to decode.

    ``done``: in an incomplete store, the number of layers fully written. A layer at or after it
    reads as the array's fill value (NaN) without its chunks being read: the run may have been
    killed while writing them, and a torn chunk there is expected, not damage. So do the logits,
    which a run writes after its last layer.
    """

    def __init__(self, array, store: str, name: str, dims, modes, layers=None, done: int | None = None):
        self.array, self.store, self.name, self.dims, self.modes = array, store, name, list(dims), modes
        self.layers = layers
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.layer_axis = next((i for i, d in enumerate(self.dims) if d in ("layer", "moe_layer", "dense_layer")),
                               None)
        self.done = done if self.layer_axis is not None else None
        # The final sites (the logits) are written after the last layer: an incomplete store has none to trust.
        self.unwritten = done is not None and name in FINAL_SITES

    def __getitem__(self, key):
        if self.unwritten:
            return np.full(_shape_of(self.shape, key), self.array.fill_value, dtype=self.dtype)
        if self.done is not None and isinstance(key, tuple) and len(key) == self.ndim \
                and all(isinstance(k, slice) for k in key):  # Dask's reads: a slice per dimension
            return self._read_finished(key)
        return self._read(key)

    def _layer(self, pos: int) -> int:
        d = self.dims[self.layer_axis]
        return self.layers[d][pos] if self.layers and d in self.layers else pos

    def _read_finished(self, key):
        """The slab ``key`` with its unfinished layers (a suffix: layers are stored ascending) filled."""
        li = self.layer_axis
        positions = range(*key[li].indices(self.shape[li]))
        n_done = sum(1 for p in positions if self._layer(p) < self.done)
        if n_done == len(positions):
            return self._read(key)
        shape = _shape_of(self.shape, key)
        out = np.full(shape, self.array.fill_value, dtype=self.dtype)
        if n_done:
            head = list(key)
            head[li] = slice(positions.start, positions.start + n_done * positions.step, positions.step)
            index = [slice(None)] * len(shape)
            index[li] = slice(0, n_done)
            out[tuple(index)] = self._read(tuple(head))
        return out

    def _read(self, key):
        try:
            with quiet():
                return self.array[key]
        except Exception as e:  # a checksum mismatch (ValueError) or a chunk that cannot be decoded
            start = [k.start or 0 if isinstance(k, slice) else int(k) for k in key]
            where = _slab(self.dims, self.modes, start, self.layers)
            msg = " ".join(str(e).split())  # one line
            raise MoetraceError(f"{self.store!r} is damaged: {self.name} {where} does not read back "
                                f"({type(e).__name__}: {msg}); trace it again") from None


def _shape_of(shape: tuple, key) -> tuple:
    """The shape that indexing an array of ``shape`` with ``key`` gives (numpy's rules, nothing allocated)."""
    return np.broadcast_to(np.empty((), np.uint8), shape)[key].shape


def _checked_reads(ds, group, store: str, done: int | None = None):
    """``ds`` with every data variable read through :class:`_Checked`, in the same Dask chunks.

    ``done``: layers fully written, for an incomplete store (None when complete).
    """
    import dask.array as da
    import xarray as xr

    modes = [str(m) for m in ds["mode"].values] if "mode" in ds.coords else []
    layers = {d: [int(x) for x in ds[d].values] for d in ("moe_layer", "dense_layer") if d in ds.coords}
    out = {}
    for name, var in ds.data_vars.items():
        checked = _Checked(group[name], store, name, var.dims, modes, layers, done)
        data = da.from_array(checked, chunks=var.chunks, name=f"moetrace-{store}-{name}", lock=False,
                             asarray=True, fancy=False)
        out[name] = xr.Variable(var.dims, data, attrs=var.attrs, encoding=var.encoding)
    return ds.assign(out)


def list_stores(run_dir, storage_options: dict | None = None) -> list:
    """The trace stores (``*.zarr`` with a ``zarr.json``) of a run folder or URL, sorted by name."""
    run_dir = loc_.as_location(run_dir)
    if isinstance(run_dir, Path) and not run_dir.is_dir() or not loc_.exists(run_dir, storage_options):
        raise MoetraceError(f"run folder {str(run_dir)!r} does not exist")
    stores = []
    for name in sorted(loc_.names(run_dir, storage_options)):
        p = loc_.join(run_dir, name)
        if name.endswith(".zarr") and loc_.exists(loc_.join(p, "zarr.json"), storage_options):
            stores.append(p)
    if not stores:
        raise MoetraceError(f"run folder {str(run_dir)!r} holds no trace stores (*.zarr)")
    return stores


def open_traces(run_dir, allow_incomplete: bool = False, storage_options: dict | None = None):
    """All variants of a run as one Dataset along a new ``variant`` dimension.

    The reference has only the ``free`` mode; variants missing a mode are NaN there.
    """
    import xarray as xr

    datasets = [open_trace(p, allow_incomplete, storage_options) for p in list_stores(run_dir, storage_options)]
    names = [d.attrs["variant"] for d in datasets]
    out = xr.concat(datasets, dim="variant", join="outer", combine_attrs="drop_conflicts",
                    coords="minimal", compat="override")
    return out.assign_coords(variant=np.array(names, dtype=object))
