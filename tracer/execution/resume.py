"""Resuming a run that stopped: reopen its stores and read back the hidden states to start from.

A store's progress (``layers_done``: its marker, and the attribute, see tracer/store/schema.py) is
set by the store's writer thread only after every chunk of those layers has landed, so layers ``0..layers_done-1`` are complete and
can be trusted; everything from ``layers_done`` on is computed again and overwritten. The
executor needs, at the resume layer L, the input of layer L for every stream: that is the
``resid`` of layer L-1, stored in float32, which holds bf16/fp16 streams exactly, so the resumed
run computes bit for bit what the uninterrupted run would have.
"""

from __future__ import annotations

import numpy as np
import torch

from moetrace.errors import MoetraceError
from moetrace.tracer.store import location as loc_
from moetrace.tracer.store import lock as _lock
from moetrace.tracer.store import schema as S
from moetrace.tracer.store.reader import layers_done as _layers_done
from moetrace.tracer.store.schema import Tokens, quiet
from moetrace.tracer.store.writer import TraceWriter


def _open(path, mode: str = "r"):
    import zarr

    return zarr.open_group(loc_.zarr_store(path, read_only=mode == "r"), mode=mode)


class ResumedWriter(TraceWriter):
    """A :class:`TraceWriter` on an existing, incomplete store (opened read-write, not recreated).

    It takes the store's writer lock like a new writer, so a second run on the same store
    refuses with the same message. Stores of earlier layouts (chunks without checksum) are
    refused: one array cannot mix chunks with and without a checksum.
    """

    def __init__(self, path):  # noqa: D107 -- deliberately not calling TraceWriter.__init__ (which recreates)
        self.path = loc_.as_location(path)
        self.storage_options = None
        _lock.acquire(self.path)
        self._locked = True
        try:
            with quiet():
                g = _open(self.path, "r+")
            self.modes = list(g.attrs["modes"])
            self.sites = list(g.attrs["sites"])
            present = [n for n in S.LAYER_VARS if n in self.sites and n in g]
            for name in present + (["logits"] if "logits" in g else []):
                codecs = [c.to_dict()["name"] for c in g[name].metadata.codecs]
                if codecs != ["bytes", "crc32c"]:
                    raise MoetraceError(
                        f"cannot resume {str(self.path)!r}: it was written by an earlier moetrace version (array "
                        f"{name} has codecs {codecs}, this version writes ['bytes', 'crc32c']); run it again "
                        f"without --resume"
                    )
            self.sizes = {"layers": g[present[0]].shape[1]} if present else {}
            if "layer" in g:
                self.sizes["layers"] = int(g["layer"].shape[0])
            for dim in ("moe_layer", "dense_layer"):  # a store of earlier versions: router variables along layer
                if dim in g:
                    self.sizes[dim + "s"] = [int(x) for x in g[dim][...]]
                elif any(S.LAYER_DIMS[n] == dim for n in present):
                    self.sizes[dim + "s"] = list(range(self.sizes["layers"]))
            self.sizes["expert_table"] = "expert_error" in g  # the per-expert table, where the store has it
            self._index_layers(self.sizes)
            marks = {n for n in loc_.names(self.path) if n.startswith(S.PROGRESS_PREFIX)}
            self._start(markers=marks, done=_layers_done(self.path))
            self.attach(g)
        except BaseException:
            self.release()
            raise

    @property
    def layers_done(self) -> int:
        return _layers_done(self.path)


def store_state(path) -> dict | None:
    """The attributes of the store at ``path`` (None where there is none)."""
    if not loc_.exists(loc_.join(path, "zarr.json")):
        return None
    try:
        with quiet():
            attrs = dict(_open(path).attrs)
        attrs["layers_done"] = _layers_done(path)  # the attribute may lag the progress marker
        return attrs
    except Exception as e:  # a store too damaged to open cannot be resumed
        msg = " ".join(str(e).split())
        raise MoetraceError(f"cannot resume {str(path)!r}: the store does not open ({msg})") from None


def check_resumable(path, attrs: dict, model_hash: str, config: dict | None, tokens: Tokens) -> None:
    """Refuse to resume a store written for another model, configuration or tokens.

    Args:
        config: the run configuration to compare with the stored one (None to skip, for a
            complete reference store reused from another run).
    """
    if attrs.get("model_hash") != model_hash:
        raise MoetraceError(
            f"cannot resume {str(path)!r}: it traces model {attrs.get('model')} (hash {attrs.get('model_hash')}), "
            f"this run has hash {model_hash}"
        )
    if config is not None:
        stored = attrs.get("config", {})
        for key in config:
            if stored.get(key) != config[key]:
                raise MoetraceError(
                    f"cannot resume {str(path)!r}: it was written with {key}={stored.get(key)!r}, this run asks "
                    f"for {key}={config[key]!r}; give the stopped run's options again, or start a new run"
                )
    with quiet():
        g = _open(path)
        same = all(np.array_equal(np.asarray(g[name][...]), want)
                   for name, want in (("token_id", tokens.ids), ("seq", tokens.seq), ("pos", tokens.pos)))
    if not same:
        raise MoetraceError(
            f"cannot resume {str(path)!r}: its tokens differ from this run's; give the stopped run's text or prompts"
        )


def read_streams(path, mode: str, layer: int, tokens: Tokens, dtype: torch.dtype) -> list[torch.Tensor]:
    """The ``resid`` of ``layer`` in ``mode``, split per sequence: a list of (1, T_s, H) in ``dtype``."""
    with quiet():
        g = _open(path)
        modes = list(g.attrs["modes"])
        if "resid" not in g:
            raise MoetraceError(f"cannot resume from {str(path)!r}: it does not record the resid site")
        try:
            flat = np.asarray(g["resid"][modes.index(mode), layer])  # (token, hidden) float32
        except ValueError as e:  # its checksum does not match
            raise MoetraceError(f"cannot resume from {str(path)!r}: resid of layer {layer} ({mode}) is damaged "
                                f"({' '.join(str(e).split())}); run it again without --resume") from None
    if not np.isfinite(flat).all():
        raise MoetraceError(
            f"cannot resume from {str(path)!r}: resid of layer {layer} ({mode}) is not fully written, "
            f"though layers_done says it is"
        )
    out = []
    for s in np.unique(tokens.seq):
        h = torch.from_numpy(flat[tokens.seq == s].copy()).unsqueeze(0)  # (1, T_s, H)
        if h.to(dtype).to(torch.float32).ne(h).any():
            raise MoetraceError(f"cannot resume from {str(path)!r}: its resid is not exactly {dtype}")
        out.append(h.to(dtype))
    return out

