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

Per-layer arrays are chunked one (mode, layer) slab per chunk. ``complete`` turns true only after
the last layer and the logits are written, so a run killed midway leaves a store that reads as
incomplete; :func:`open_trace` refuses such a store unless asked to read it anyway.
"""

from __future__ import annotations

import json
import os
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
        import xarray as xr
        import zarr

        self.path = Path(path)
        self.modes = list(modes)
        self.sites = list(sites)
        self.sizes = dict(sizes)
        self._take_lock()
        coords = xr.Dataset(
            coords={
                "mode": np.array(self.modes, dtype=object),
                "layer": np.arange(sizes["layers"]),
                "token": np.arange(tokens.n),
                "token_id": ("token", tokens.ids.astype(np.int64)),
                "seq": ("token", tokens.seq.astype(np.int32)),
                "pos": ("token", tokens.pos.astype(np.int32)),
                "token_text": ("token", np.asarray(tokens.text, dtype=object)),
            }
        )
        coords.attrs.update(_base_attrs(attrs, self.modes, self.sites))
        ctx = _quiet()
        try:
            coords.to_zarr(self.path, mode="w", zarr_format=3, consolidated=False)
            g = zarr.open_group(self.path, mode="r+")
            m, L, T = len(self.modes), sizes["layers"], tokens.n
            for name, (last, dtype) in LAYER_VARS.items():
                if name not in self.sites:
                    continue
                n = sizes[last]
                fill = -1 if dtype == "int16" else np.nan
                g.create_array(
                    name, shape=(m, L, T, n), chunks=(1, 1, T, n), dtype=dtype, fill_value=fill,
                    dimension_names=("mode", "layer", "token", last), compressors=_compressors(dtype),
                )
            if "logits" in self.sites:
                g.create_array(
                    "logits", shape=(m, T, sizes["vocab"]), chunks=(1, T, sizes["vocab"]), dtype="float32",
                    fill_value=np.nan, dimension_names=("mode", "token", "vocab"), compressors=None,
                )
        finally:
            ctx.__exit__(None, None, None)
        self._attach(g)

    def _attach(self, g) -> None:
        """Set up writing into the opened group ``g`` (also used to reopen a store, tracer/resume.py)."""
        self._group = g
        # Array handles opened once: each group lookup reads metadata through zarr's event loop.
        self._arrays = {name: g[name] for name in list(LAYER_VARS) + ["logits"] if name in self.sites and name in g}
        # Arrays whose chunks are plain little-endian bytes: their (mode, layer) chunks are
        # written straight to the chunk file the Zarr v3 spec names, which costs a third of
        # going through zarr's codec pipeline and its event loop for every slab.
        self._raw_chunks = {name for name in LAYER_VARS if name in self._arrays and _plain_chunks(self._arrays[name])}
        # One background thread writes, in submission order, while the next layer computes;
        # layers_done is set by that same thread after the layer's chunks, so it never runs ahead.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetrace-store")
        self._pending: list = []  # writes of the layer being traced
        self._older: list = []  # writes of the layer before

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
        (self.path / LOCK_NAME).unlink(missing_ok=True)

    def write_layer(self, mode: str, layer: int, record: dict) -> None:
        """Store one layer's recorded sites (tensors of shape (token, n)) for one mode."""
        mi = self.modes.index(mode)
        for name in LAYER_VARS:
            if name in self.sites and name in record:
                arr = record[name].detach().to("cpu", dtype=_torch_dtype(LAYER_VARS[name][1])).numpy()
                if name in self._raw_chunks:
                    self._submit(_write_chunk, self.path / name / "c" / str(mi) / str(layer) / "0" / "0", arr)
                else:
                    self._submit(self._arrays[name].__setitem__, (mi, layer), arr)

    def write_logits(self, mode: str, logits) -> None:
        if "logits" in self.sites:
            arr = logits.detach().float().cpu().numpy()
            self._submit(self._arrays["logits"].__setitem__, self.modes.index(mode), arr)

    def mark_layers_done(self, n: int) -> None:
        """Record that layers 0..n-1 are fully written (every mode), once their writes have landed."""
        writes = self._older + self._pending  # this layer's writes, the layer before's and its mark

        def mark():
            # The pool runs one task at a time, in order: these are finished. A write that failed
            # after the main thread last looked must not be covered by layers_done (resume trusts it).
            for f in writes:
                if f.exception() is not None:
                    raise f.exception()
            self._group.attrs["layers_done"] = int(n)

        self._submit(mark)
        # Bound memory: at most two layers' writes in flight.
        older, self._older, self._pending = self._older, self._pending, []
        for f in older:
            f.result()

    def finish(self) -> None:
        import zarr

        self.flush()
        self._pool.shutdown()
        self._group.attrs["complete"] = True
        ctx = _quiet()
        try:
            zarr.consolidate_metadata(self.path)
        finally:
            ctx.__exit__(None, None, None)
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _plain_chunks(arr) -> bool:
    """True if the array stores each chunk as its raw little-endian bytes under c/i/j/k/l."""
    meta = arr.metadata.to_dict()
    return (
        meta.get("codecs") == [{"name": "bytes", "configuration": {"endian": "little"}}]
        and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}}
        and not meta.get("storage_transformers")
    )


def _write_chunk(path: Path, arr: np.ndarray) -> None:
    """Write one full chunk's bytes atomically (a reader sees the old chunk or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
    os.replace(tmp, path)


def _compressors(dtype: str):
    # Float activations barely compress (noise in the low mantissa bits) and compressing them
    # cost as much as the forward pass; integer expert ids compress well.
    return None if dtype == "float32" else "auto"


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
