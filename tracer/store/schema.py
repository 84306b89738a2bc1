"""The trace store's schema: one Zarr v3 store per run and variant, ``RUN/VARIANT.zarr``.

This module is the one place the schema is defined. Every store opens with plain
``xarray.open_zarr(path_or_url)``.

=================  ===================================  =======  ==========================================
variable           dims                                 dtype    what
=================  ===================================  =======  ==========================================
``resid``          (mode, layer, token, hidden)         float32  the decoder layer's output hidden state
``attn_out``       (mode, layer, token, hidden)         float32  attention output, before the residual add
``moe_out``        (mode, moe_layer, token, hidden)     float32  MoE block output (shared expert included)
``shared_out``     (mode, moe_layer, token, hidden)     float32  the shared expert's output, gate applied
``mlp_out``        (mode, dense_layer, token, hidden)   float32  a dense layer's MLP output
``router_logits``  (mode, moe_layer, token, expert)     float32  router logits
``topk_idx``       (mode, moe_layer, token, k)          int16    chosen experts (-1 where not yet written)
``topk_weight``    (mode, moe_layer, token, k)          float32  their routing weights
``logits``         (mode, token, vocab)                 float32  final logits
``expert_error``   (mode, moe_layer, expert)            float32  per-expert table (teacher mode, see below)
``expert_tokens``  (mode, moe_layer, expert)            int32    tokens routed to each expert
``expert_weight``  (mode, moe_layer, expert)            float32  routing weight those tokens carry (sum)
``expert_sq``      (mode, moe_layer, expert)            float32  sum over its tokens of w^2 ||dy||^2
``experts_part``   (mode, moe_layer, token)             float32  ||sum_k w_k dy_k|| per token
=================  ===================================  =======  ==========================================

The per-expert table. In ``teacher`` mode every MoE layer's routed experts are run twice on the
variant's own expert inputs (the tokens its router sent to each expert): with the variant's
weights and with the reference's. ``dy`` is the difference of the two outputs (before the
routing weight), so the table isolates each expert matrix's error from everything upstream:
``expert_error`` is ``||dy|| / ||y_ref||`` over the expert's tokens (NaN where no token reached
it), ``expert_tokens`` and ``expert_weight`` say how much of the layer's traffic it carries, and
``expert_sq`` how much error energy it puts into the MoE output. ``experts_part`` is, per token,
the norm of the routed experts' combined weight error (``sum_k w_k dy_k``), which the component
view compares with the attention and whole-MoE errors. The table exists in stores with a
``teacher`` mode and MoE layers; the other modes' slabs are NaN (0 tokens).

Coordinates: ``mode`` (``free``, ``teacher``, ``routing``), ``layer``, ``token`` (0..T-1 over all
sequences), and along ``token``: ``token_id``, ``seq``, ``pos``, ``token_text``.

Layers without a router. A model may mix MoE layers and dense layers (Qwen3-MoE's
``mlp_only_layers`` / ``decoder_sparse_step``), or have no MoE layer at all (Qwen3, Llama). The
sites only one kind of layer has live on their own layer dimension, whose coordinate holds the
decoder-layer indices of that kind: ``moe_layer`` (the MoE layers, e.g. ``[1, 3]``) for the MoE
block, shared expert and router variables, ``dense_layer`` for ``mlp_out``. Nothing is stored for
a layer that has no such tensor: no fill values, no masks to remember. ``moe_out`` and
``shared_out`` are written only where the family has them (``shared_out``: a shared expert), and
a model without MoE layers has no router variables at all (nor ``expert``/``k`` dimensions).
``ds.topk_idx.sel(moe_layer=3)`` is layer 3's choice; analyses read these variables through
``moetrace.tracer.analysis.common`` (``reference``/``variant``), which renames the dimension to
``layer``, so per-layer results carry the true layer indices and cover MoE layers only. Stores of
earlier versions held the router variables along ``layer``; they read the same way.
Attributes: ``moetrace_version``, ``model``, ``model_hash``, ``variant``, ``modes``, ``sites``,
``seed``, ``torch_version``, ``transformers_version``, ``complete``, ``layers_done``, ``created``,
and ``config`` (the run's configuration as JSON).

Layout. Every array is created through zarr-python's ``create_array``: per-layer arrays hold one
(mode, layer) slab per chunk, one object per chunk (key ``c.M.L.0.0``); logits one chunk of tokens
per object (:func:`logit_chunk_tokens`). Every chunk is raw little-endian bytes followed by a
CRC-32C checksum (zarr's ``bytes`` then ``crc32c`` codecs), so a flipped byte or a truncated chunk
fails its read instead of returning other numbers (see tracer/store/reader.py, which also checks
that no chunk is missing: zarr would read a missing chunk as the fill value). Chunks are written
even where they equal the fill value (``write_empty_chunks``), so "every chunk present" is the
rule for a healthy store.

Per-chunk objects rather than zarr's sharding: zarr writes a shard whole, so adding one layer to a
shard of every layer rewrites all the layers before it; and a missing per-chunk object is
visible in the store's listing.

Progress. ``complete`` turns true only after the last layer and the logits are written, so a run
killed midway leaves a store that reads as incomplete. After every layer the writer creates an
empty marker object ``.moetrace-layers-done.N`` (and removes the one before), and at most every
:data:`ATTRS_INTERVAL_S` seconds it also copies N into the ``layers_done`` attribute; readers take
the larger (rewriting ``zarr.json`` after every layer costs more than the layer on a small model,
on ext4, where replacing a file with unwritten data starts its writeback at once).

Earlier layouts. Stores of earlier moetrace versions (raw chunks without checksum, one object per
chunk or one hand-written shard per array and mode) are read, with the same missing-chunk check,
but their bytes carry no checksum; ``--resume`` refuses them (see tracer/execution/resume.py).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

# Per-layer sites: name -> (last dimension, dtype). Dims are (mode, LAYER_DIM, token, last).
LAYER_VARS = {
    "resid": ("hidden", "float32"),
    "attn_out": ("hidden", "float32"),
    "moe_out": ("hidden", "float32"),
    "shared_out": ("hidden", "float32"),
    "mlp_out": ("hidden", "float32"),
    "router_logits": ("expert", "float32"),
    "topk_idx": ("k", "int16"),
    "topk_weight": ("k", "float32"),
}
# The layer dimension of each per-layer site (see "Layers without a router" above); sizes key of its layer list.
LAYER_DIMS = {"resid": "layer", "attn_out": "layer", "moe_out": "moe_layer", "shared_out": "moe_layer",
              "mlp_out": "dense_layer", "router_logits": "moe_layer", "topk_idx": "moe_layer",
              "topk_weight": "moe_layer"}
LAYER_DIM_NAMES = ("layer", "moe_layer", "dense_layer")
# The per-expert table (see "The per-expert table" above): name -> (last dimension, dtype); dims
# (mode, moe_layer, last). Stored where ``sizes["expert_table"]`` is true (a teacher mode, MoE layers).
TABLE_VARS = {
    "expert_error": ("expert", "float32"),
    "expert_tokens": ("expert", "int32"),
    "expert_weight": ("expert", "float32"),
    "expert_sq": ("expert", "float32"),
    "experts_part": ("token", "float32"),
}
LAYER_DIMS.update({name: "moe_layer" for name in TABLE_VARS})
_LAYER_LISTS = {"moe_layer": "moe_layers", "dense_layer": "dense_layers"}


def layer_list(sizes: dict, dim: str) -> list[int]:
    """The decoder-layer indices along ``dim`` (``layer``: all of them; ``moe_layer``, ``dense_layer``)."""
    if dim == "layer":
        return list(range(sizes["layers"]))
    if _LAYER_LISTS[dim] in sizes:
        return [int(i) for i in sizes[_LAYER_LISTS[dim]]]
    return list(range(sizes["layers"])) if dim == "moe_layer" else []  # sizes of a pure MoE model


def stored_sites(sites, sizes: dict) -> list[str]:
    """The per-layer and final sites of ``sites`` the store holds: a site on a layer dimension with no
    layers (router sites of a dense model, ``mlp_out`` of a pure MoE model) is not stored, nor
    ``shared_out`` where the family has no shared expert (``sizes["shared"]`` false)."""
    out = []
    for name in sites:
        if name in LAYER_DIMS and not layer_list(sizes, LAYER_DIMS[name]):
            continue
        if name == "shared_out" and not sizes.get("shared"):
            continue
        out.append(name)
    return out
LOCK_NAME = ".moetrace-writer.lock"
PROGRESS_PREFIX = ".moetrace-layers-done."
# The layers_done attribute of an incomplete store is refreshed at most this often (seconds);
# the marker object is exact after every layer.
ATTRS_INTERVAL_S = 2.0
# Chunk keys "c.M.L.0.0": one flat folder per array. With "/" every chunk needs its own nested
# folders, and creating them cost more than writing the chunks (measured: 48 one-megabyte chunks
# in 150 ms nested, 20 ms flat).
CHUNK_SEPARATOR = "."
# Coordinates along ``token`` besides the dimension itself (xarray's "coordinates" group attribute).
TOKEN_COORDS = ("pos", "seq", "token_id", "token_text")
# Logits are chunked along tokens so a chunk stays near this size whatever the vocabulary
# (a real vocabulary of 152k entries over 100k tokens would otherwise be one 60 GB chunk).
LOGIT_CHUNK_BYTES = 64 << 20
CHECKSUM_BYTES = 4  # the crc32c codec appends 4 bytes to every chunk


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


@dataclass(frozen=True)
class ArraySpec:
    """One data array of the schema: its shape, chunk shape, dtype, fill value and dimension names."""

    name: str
    shape: tuple
    chunks: tuple
    dtype: str
    fill: float | int
    dims: tuple


def logit_chunk_tokens(n_tokens: int, vocab: int) -> int:
    return max(1, min(n_tokens, LOGIT_CHUNK_BYTES // (4 * vocab)))


def data_specs(sizes: dict, n_modes: int, n_tokens: int, sites) -> list[ArraySpec]:
    """The data arrays of a store recording ``sites``.

    Args:
        sizes: ``layers``, ``hidden``, ``expert``, ``k``, ``vocab``, and ``moe_layers``, ``dense_layers``
            (layer index lists; absent: every layer MoE), ``shared`` (a shared expert).
    """
    m, T = n_modes, n_tokens
    sites = stored_sites(sites, sizes)
    out = []
    for name, (last, dtype) in LAYER_VARS.items():
        if name in sites:
            n, dim = sizes[last], LAYER_DIMS[name]
            L = len(layer_list(sizes, dim))
            out.append(ArraySpec(name, (m, L, T, n), (1, 1, T, n), dtype, -1 if dtype == "int16" else float("nan"),
                                 ("mode", dim, "token", last)))
    if sizes.get("expert_table") and layer_list(sizes, "moe_layer"):
        L = len(layer_list(sizes, "moe_layer"))
        for name, (last, dtype) in TABLE_VARS.items():
            n = T if last == "token" else sizes[last]
            out.append(ArraySpec(name, (m, L, n), (1, 1, n), dtype, 0 if dtype == "int32" else float("nan"),
                                 ("mode", "moe_layer", last)))
    if "logits" in sites:
        V = sizes["vocab"]
        out.append(ArraySpec("logits", (m, T, V), (1, logit_chunk_tokens(T, V), V), "float32", float("nan"),
                             ("mode", "token", "vocab")))
    return out


def coordinates(modes, sizes: dict, tokens: Tokens, sites=()) -> dict:
    """name -> (dims, values) of the store's coordinate arrays (a ``moe_layer``/``dense_layer`` coordinate
    where a stored site lies along it)."""
    dims = {LAYER_DIMS[s] for s in stored_sites(sites, sizes) if s in LAYER_DIMS} - {"layer"}
    if sizes.get("expert_table") and layer_list(sizes, "moe_layer"):
        dims.add("moe_layer")
    extra = {d: ((d,), np.array(layer_list(sizes, d), dtype=np.int64)) for d in sorted(dims)}
    return {
        "mode": (("mode",), np.array(list(modes), dtype=object)),
        "layer": (("layer",), np.arange(sizes["layers"], dtype=np.int64)),
        **extra,
        "token": (("token",), np.arange(tokens.n, dtype=np.int64)),
        "token_id": (("token",), tokens.ids.astype(np.int64)),
        "seq": (("token",), tokens.seq.astype(np.int32)),
        "pos": (("token",), tokens.pos.astype(np.int32)),
        "token_text": (("token",), np.asarray(tokens.text, dtype=object)),
    }


def base_attrs(attrs: dict, modes, sites) -> dict:
    """The store's attributes: versions, modes, sites, progress, creation time, then ``attrs``."""
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
        "coordinates": " ".join(TOKEN_COORDS),
    }
    out.update(attrs)
    return out


_QUIET = [
    # zarr warns that consolidated metadata and string dtypes are not yet in the v3 spec, and that
    # the lock and progress markers are no Zarr nodes; xarray reads the stores, and the warnings
    # would bury moetrace's own output.
    ".*[Cc]onsolidated metadata.*",
    ".*not recognized as a component of a Zarr hierarchy.*",
    ".*(vlen-utf8|VariableLengthUTF8|string).*Zarr format 3.*",
]


@contextmanager
def quiet():
    """Silence zarr's warnings about these stores (see ``_QUIET``).

    The filters are installed process-wide and left in place: zarr warns from its own event loop
    thread and moetrace writes from another, and ``warnings.catch_warnings`` restoring the filters
    from one thread would undo them in the other.
    """
    for pattern in _QUIET:  # re-added each time (no duplicates): a test harness may reset the filters
        warnings.filterwarnings("ignore", message=pattern)
    yield
