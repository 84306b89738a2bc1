"""The weight audit: every weight matrix, reference vs what a file type dequantizes it to.

For each matrix (per expert and projection for the MoE experts) the four figures of
:data:`moetrace.tracer.analysis.common.ERROR_METRICS` (the same names and definitions as the
hidden-state comparison), from the reference (as stored, usually BF16) and the dequantized
weights (float32, or rounded to a compute dtype when one is asked for); see
:func:`matrix_metrics` for the arithmetic:

- ``cosine``: <a, b> / (|a| |b|); 1 for an exact copy, 0 when the dequantized matrix is all zeros;
- ``rel_error``: |b - a| / |a|;
- ``sqnr_db``: 10 log10(|a|^2 / |b - a|^2), +inf for an exact copy;
- ``max_abs_error``: max |b - a|.

The model is read one decoder layer at a time and the expert metrics are batched over experts
(torch reductions over whole (experts, rows, cols) blocks, not a loop per expert). Matrices
whose cosine is below the threshold (default 0.98, the original investigation's cut) are
flagged. The result is an xarray Dataset, stored as Zarr:

| variable | dims | what |
|---|---|---|
| ``cosine``, ``rel_error``, ``sqnr_db``, ``max_abs_error`` | (layer, expert, proj) | expert matrices, proj = gate, up, down |
| ``flagged`` | (layer, expert, proj) | cosine below the threshold |
| ``type`` | (layer, proj) | the GGML type of the expert tensor |
| ``tensor_cosine``, ``tensor_rel_error``, ``tensor_sqnr_db``, ``tensor_max_abs_error`` | (tensor) | every other matrix (attention, router, embedding, output) |
| ``tensor_flagged``, ``tensor_type``, ``tensor_layer`` | (tensor) | flag, GGML type, layer (-1 outside the layers) |

Attributes: ``model``, ``model_hash``, ``weights`` (file type), ``compute``, ``threshold``,
``imatrix``, ``n_flagged``, ``moetrace_version``, ``created``, ``complete``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from moetrace.errors import MoetraceError
from moetrace.tracer.analysis.common import ERROR_METRICS, METRIC_NAMES
from moetrace.tracer.render.table import Column, Table

METRICS = METRIC_NAMES  # cosine, rel_error, sqnr_db, max_abs_error: the names compare's hidden_error uses
PROJS = ("gate", "up", "down")
_PROJ_OF = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
DEFAULT_THRESHOLD = 0.98
# Matrices per batch: about this many elements at a time (bounds the float32 copies).
_BATCH_ELEMENTS = 1 << 23


def matrix_metrics(ref: torch.Tensor, deq: torch.Tensor) -> dict[str, np.ndarray]:
    """The four metrics per matrix, batched.

    Squared norms of the reference a, the dequantized weights b and d = b - a are float32 dot
    products per row summed over rows in float64 (relative error about 1e-8); the rest is
    float64. The cosine comes from them as 1 - (|d|^2 - (|a| - |b|)^2) / (2 |a| |b|), which is
    <a, b> / (|a| |b|) rearranged so that 1 - cosine is as accurate as |d|^2 (a direct dot
    product would lose it for cosines near 1). float32 passes, no float64 copy of the weights.

    Args:
        ref: (n_mat, rows, cols) or (rows, cols) reference weights, any float dtype.
        deq: the same shape, the dequantized weights.

    Returns:
        ``{metric: float64 array (n_mat,)}`` (shape (1,) for a single matrix).
    """
    if ref.shape != deq.shape:
        raise MoetraceError(f"internal: reference {tuple(ref.shape)} and dequantized {tuple(deq.shape)} differ")
    n_mat = int(np.prod(ref.shape[:-2])) if ref.ndim > 2 else 1
    rows, cols = ref.shape[-2], ref.shape[-1]
    a_all = ref.reshape(n_mat, rows, cols)
    b_all = deq.reshape(n_mat, rows, cols)
    step = max(1, _BATCH_ELEMENTS // max(1, rows * cols))
    out = torch.empty((4, n_mat), dtype=torch.float64)  # |a|^2, |b|^2, |d|^2, max |d|

    def sq(x):  # (k, rows, cols) -> (k,): float32 dot per row, float64 sum over rows
        return torch.linalg.vecdot(x, x, dim=-1).to(torch.float64).sum(-1)

    for i in range(0, n_mat, step):
        a = a_all[i:i + step].to(torch.float32)  # (k, rows, cols)
        b = b_all[i:i + step].to(torch.float32)
        d = b - a
        out[0, i:i + step] = sq(a)
        out[1, i:i + step] = sq(b)
        out[2, i:i + step] = sq(d)
        out[3, i:i + step] = d.abs().amax((1, 2)).to(torch.float64)
        del a, b, d
    aa, bb, dd, mx = out.numpy()
    na, nb, nd = np.sqrt(aa), np.sqrt(bb), np.sqrt(dd)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = na * nb
        cos = 1.0 - (nd * nd - (na - nb) ** 2) / (2.0 * np.where(denom > 0, denom, 1.0))
        # Zero matrices: identical zeros are a perfect copy; a nonzero matrix dequantized to all
        # zeros (a block scale lost to fp16 underflow) has cosine 0, not NaN.
        cos = np.where(denom > 0, cos, np.where(nd == 0, 1.0, 0.0))
        rel = np.where(na > 0, nd / np.where(na > 0, na, 1.0), np.where(nd == 0, 0.0, np.inf))
        sqnr = np.where(nd > 0, 20.0 * np.log10(np.where(nd > 0, na / np.where(nd > 0, nd, 1.0), 1.0)), np.inf)
        sqnr = np.where((na == 0) & (nd > 0), -np.inf, sqnr)
    return {"cosine": np.clip(cos, -1.0, 1.0), "rel_error": rel, "sqnr_db": sqnr, "max_abs_error": mx}


def parse_weights(text: str) -> tuple[str, str | None]:
    """``q4_k_m``, ``q4_k_m-bf16`` or ``q4_k_m-bf16w-fp32`` -> (file type, dtype name the weights are
    dequantized to, or None); a name with a compute part is parsed as a variant (moetrace.tracer.variants).
    Errors list the valid choices."""
    from moetrace.kernels import recipes
    from moetrace.tracer.variants import Variant, split_weights

    t = text.strip().lower()
    dequant = None
    if "-" in t.partition("+")[0] or "-" in t.rpartition("=")[2]:
        v = Variant.parse(t)
        t, dequant = v.weights, v.dequant
    else:
        t = split_weights(t)[0]
    if t == "gguf":  # the tensors of a GGUF file (audit(gguf=...))
        return "gguf", dequant
    if t == "orig":
        raise MoetraceError("--variant orig has nothing to audit: the weights are the reference; give a file type "
                            f"({', '.join(recipes.FILE_TYPES)})")
    return recipes.parse_file_type(t).name, dequant


def audit_name(text: str) -> str:
    """The default store name of an audit of ``text``: weights, overrides (hashed where not plain, as
    a variant's store name) and the dequantization dtype if any (``q4_k_m-bf16``)."""
    from moetrace.tracer.variants import Variant

    ftype, dequant = parse_weights(text)
    if ftype == "gguf":
        return "gguf" + (f"-{dequant}" if dequant else "")
    v = Variant(ftype, "fp32", overrides=weights_overrides(text))
    base = v.store_name[: -len("-fp32")]
    return base + (f"-{dequant}" if dequant else "")


def weights_overrides(text: str) -> tuple:
    """The per-tensor overrides a weights text carries (``q4_k_m+blk.9.ffn_down_exps=q8_0[-bf16]``)."""
    from moetrace.tracer.variants import Variant, split_weights

    t = text.strip().lower()
    if "-" in t.partition("+")[0] or "-" in t.rpartition("=")[2]:
        return Variant.parse(t).overrides
    return split_weights(t)[1]


def audit(source, weights: str, *, threshold: float = DEFAULT_THRESHOLD, imatrix_file=None, cache=True,
          progress=None, gguf=None):
    """Audit every weight matrix of ``source`` under a file type, or as a GGUF file holds it.

    Args:
        source: a model source.
        weights: a file type (``q4_k_m``), optionally with a compute dtype (``q4_k_m-bf16``): the
            dequantized weights are then rounded to it, as that variant runs them; or ``gguf``
            (``gguf-bf16``, ...) for the tensors of the file ``gguf``, dequantized.
        gguf: a GGUF file of the same model (for ``weights="gguf"``): whatever wrote it (another
            quantizer, another engine's conversion), its tensors are compared with the reference.
        threshold: matrices with a cosine below it are flagged.
        imatrix_file: an importance-matrix file the quantization uses.
        cache: True for the quantized-weight cache, False for none, or a QuantCache.
        progress: optional ``progress(layer_done, n_layers)``.

    Returns:
        an xarray Dataset (see the module docstring).
    """
    import datetime

    import xarray as xr

    import moetrace
    from moetrace.tracer.weights import derive as W
    from moetrace.tracer.weights.gguf_writer import load_imatrix_for
    from moetrace.tracer.weights.qcache import context_for
    from moetrace.tracer.variants import COMPUTE_DTYPES, overrides_text

    if not 0.0 < threshold <= 1.0:
        raise MoetraceError(f"--threshold {threshold} must be a cosine in (0, 1]")
    ftype, compute = parse_weights(weights)
    file = None
    if ftype == "gguf":
        from moetrace.tracer.sources.gguf import GGUFSource

        if gguf is None:
            raise MoetraceError("--variant gguf audits the tensors of a GGUF file; give --gguf FILE")
        if imatrix_file:
            raise MoetraceError("--imatrix applies to quantizing; a GGUF file's tensors are already quantized")
        file = GGUFSource(gguf)
        file.check_matches(source)
        ctx, types = None, file.ggml_types()
    else:
        if gguf is not None:
            raise MoetraceError(f"--gguf {gguf} is given but --variant is {weights}; use --variant gguf")
        imatrix, _ = load_imatrix_for(source, imatrix_file)
        ctx = context_for(source, imatrix, str(imatrix_file) if imatrix_file else None, cache=cache)
        types = W.file_type_types(source, ftype, has_imatrix=imatrix is not None, context=ctx,
                                  overrides=weights_overrides(weights))
    dtype = COMPUTE_DTYPES[compute] if compute else None
    c, family = source.config, W.family_of(source)
    n_layer, n_exp = int(c.num_hidden_layers), family.n_experts(c)

    ex = {m: np.full((n_layer, n_exp, len(PROJS)), np.nan) for m in METRICS}
    ex_type = np.full((n_layer, len(PROJS)), "", dtype=object)
    rows: list[tuple[str, int, str, dict]] = []  # (name, layer, type, metrics)

    for name in ("token_embd.weight", "output.weight"):
        if name in types:
            deq = None if file is None else {name: file.tensor(W.hf_global_name(name, family))}
            _, _, other = audit_tensors({name: W.global_tensor(source, name)}, types, ctx, dtype, deq)
            rows += [(n, -1, t, met) for n, t, met in other]
    for L in range(n_layer):
        deq = None if file is None else W.gguf_tensors_of_layer(file.layer_state(L), L, family, c)
        experts, etypes, other = audit_tensors(W.gguf_tensors_of_layer(source.layer_state(L), L, family, c), types, ctx, dtype,
                                               deq)
        for proj, met in experts.items():
            p = PROJS.index(proj)
            for m in METRICS:
                ex[m][L, :, p] = met[m]
            ex_type[L, p] = etypes[proj]
        rows += [(n, L, t, met) for n, t, met in other]
        if progress:
            progress(L + 1, n_layer)

    names = [r[0] for r in rows]
    data = {m: (("layer", "expert", "proj"), ex[m]) for m in METRICS}
    data["flagged"] = (("layer", "expert", "proj"), ex["cosine"] < threshold)
    data["type"] = (("layer", "proj"), ex_type)
    for m in METRICS:
        data[f"tensor_{m}"] = ("tensor", np.array([r[3][m] for r in rows], dtype=np.float64))
    data["tensor_flagged"] = ("tensor", data["tensor_cosine"][1] < threshold)
    data["tensor_type"] = ("tensor", np.array([r[2] for r in rows], dtype=object))
    data["tensor_layer"] = ("tensor", np.array([r[1] for r in rows], dtype=np.int32))
    n_flagged = int(data["flagged"][1].sum() + data["tensor_flagged"][1].sum())
    ds = xr.Dataset(
        data,
        coords={"layer": np.arange(n_layer), "expert": np.arange(n_exp), "proj": np.array(PROJS, dtype=object),
                "tensor": np.array(names, dtype=object)},
        attrs={
            "model": getattr(source, "model_id", ""), "model_hash": getattr(source, "model_hash", ""),
            "weights": ftype, "compute": compute or "fp32", "threshold": float(threshold),
            "overrides": "" if file is not None else overrides_text(weights_overrides(weights)),
            "gguf": str(gguf) if gguf is not None else "",
            "imatrix": str(imatrix_file) if imatrix_file else "", "n_flagged": n_flagged,
            "moetrace_version": moetrace.__version__, "complete": True,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return ds


def audit_tensors(tensors: dict, types: dict, context=None, dtype=None, dequantized: dict | None = None):
    """The metrics of a set of tensors (one layer's, or the embedding and output), reference vs dequantized.

    Args:
        tensors: GGUF name -> reference tensor (see ``weights.gguf_tensors_of_layer``); 1-D
            tensors (norms) are skipped.
        types: GGUF name -> GGML type (missing: F32).
        context: a QuantContext (cache, imatrix) or None.
        dtype: a compute dtype to round the dequantized weights to, or None.
        dequantized: GGUF name -> the tensor to compare with (a GGUF file's, dequantized);
            None quantizes each reference tensor to its type and dequantizes it.

    Returns:
        (experts, expert_types, others): ``{proj: {metric: (E,) float64}}`` and ``{proj: type}``
        for the 3-D expert tensors, and ``[(name, type, {metric: float})]`` for the other matrices.
    """
    from moetrace.tracer.weights import derive as W

    experts, expert_types, others = {}, {}, []
    for name in W.tensor_order(tensors):
        w = tensors[name]
        if w.ndim < 2:
            continue  # norms: vectors, never quantized
        t = types.get(name, "F32")
        deq = W.dequantized(w, name, t, context) if dequantized is None else dequantized[name].to(torch.float32)
        if dtype is not None:
            deq = deq.to(dtype).to(torch.float32)
        met = matrix_metrics(w, deq)  # (E,) per metric for an expert tensor, (1,) otherwise
        del deq
        stem = name.split(".")[2] if name.startswith("blk.") else ""
        if stem in _PROJ_OF and w.ndim == 3:
            experts[_PROJ_OF[stem]], expert_types[_PROJ_OF[stem]] = met, t
        else:
            others.append((name, t, _first(met)))
    return experts, expert_types, others


def _first(met: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(v[0]) for k, v in met.items()}


def ranked(ds) -> list[dict]:
    """Every audited matrix as a row, worst (lowest cosine) first."""
    out = []
    E = ds.sizes["expert"]
    ex = {m: ds[m].values for m in METRICS}
    flagged, types = ds["flagged"].values, ds["type"].values
    stems = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
    for li, L in enumerate(ds["layer"].values):
        for p, proj in enumerate(PROJS):
            name, t = f"blk.{int(L)}.{stems[proj]}.weight", str(types[li, p])
            for e in range(E):
                row = {"tensor": name, "layer": int(L), "expert": e, "proj": proj, "type": t}
                row.update({m: float(ex[m][li, e, p]) for m in METRICS})
                row["flagged"] = bool(flagged[li, e, p])
                out.append(row)
    tv = {m: ds[f"tensor_{m}"].values for m in METRICS}
    t_layer, t_type, t_flag = ds["tensor_layer"].values, ds["tensor_type"].values, ds["tensor_flagged"].values
    for i, name in enumerate(ds["tensor"].values):
        row = {"tensor": str(name), "layer": int(t_layer[i]), "expert": None, "proj": None, "type": str(t_type[i])}
        row.update({m: float(tv[m][i]) for m in METRICS})
        row["flagged"] = bool(t_flag[i])
        out.append(row)
    out.sort(key=lambda r: (math.isnan(r["cosine"]), r["cosine"]))
    return out


# The ranked rows' columns: every key of a :func:`ranked` row is a JSON column; the rank is the table's own.
AUDIT_COLUMNS = (
    Column("rank", "rank", "{:d}", json=False),
    Column("tensor", "tensor", str, align="left"),
    Column("layer", "layer", "{:d}", table=False),
    Column("expert", "expert", "{:d}", missing=""),
    Column("proj", "proj", str, table=False),
    Column("type", "type", str),
    *(Column(m.name, m.header, m.fmt, m.description) for m in ERROR_METRICS),
    Column("flagged", "", lambda f: "FLAGGED" if f else "", "cosine below the threshold", align="left"),
)


def audit_table(ds, top: int | None = None) -> Table:
    """The audited matrices, worst first (:func:`ranked`); only the first ``top`` when given."""
    rows = ranked(ds)
    t = Table(list(AUDIT_COLUMNS))
    for i, r in enumerate(rows if top is None else rows[:top]):
        t.add({"rank": i + 1, **r})
    return t


def summary_json(ds, path=None, top: int = 10) -> dict:
    """The audit's summary for scripts: counts, the worst ``top`` rows and every flagged row (inf/NaN as null)."""
    rows = audit_table(ds).records()
    return {
        "model": ds.attrs["model"], "weights": ds.attrs["weights"], "compute": ds.attrs["compute"],
        "threshold": ds.attrs["threshold"], "store": str(path) if path else None,
        "n_expert_matrices": int(ds["cosine"].size), "n_other_matrices": int(ds.sizes["tensor"]),
        "n_flagged": int(ds.attrs["n_flagged"]), "worst": rows[:top], "flagged": [r for r in rows if r["flagged"]],
    }


def format_audit(ds, path=None, top: int = 10) -> str:
    """A human summary: counts, the worst ``top`` matrices, per-type cosine ranges."""
    rows = ranked(ds)
    a = ds.attrs
    L, E = ds.sizes["layer"], ds.sizes["expert"]
    table = audit_table(ds, top)
    table.title = (
        f"Weight audit of {a['model']} "
        f"{'as stored in ' + a['gguf'] if a.get('gguf') else 'under ' + a['weights'] + a.get('overrides', '')}, dequantized to {a['compute']}: "
        f"{L * E * len(PROJS)} expert matrices ({L} layers x {E} experts x {len(PROJS)}) and "
        f"{ds.sizes['tensor']} other matrices; {a['n_flagged']} below cosine {a['threshold']:g}"
    )
    lines = [table.to_text()]
    flagged_beyond = [r for r in rows[top:] if r["flagged"]]
    if flagged_beyond:
        lines.append(f"  ... and {len(flagged_beyond)} more flagged matrices (see --json or the store)")
    by_type: dict[str, list[float]] = {}
    for r in rows:
        by_type.setdefault(r["type"], []).append(r["cosine"])
    parts = [f"{t} {len(v)} matrices, cosine min {min(v):.5f} median {float(np.median(v)):.5f}"
             for t, v in sorted(by_type.items(), key=lambda kv: min(kv[1]))]
    lines.append("By type: " + "; ".join(parts))
    if path is not None:
        lines.append(f"Full table in {path} (xarray.open_zarr; dims layer, expert, proj and tensor).")
    return "\n".join(lines)


def save_audit(ds, path) -> Path:
    """Write the audit Dataset as a Zarr v3 store (replacing one at ``path``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoetraceError(f"cannot write the audit store {str(path)!r}: {e.strerror or e}") from None
    with warnings.catch_warnings():
        # zarr warns that string dtypes are not yet in the v3 spec; xarray reads them.
        warnings.filterwarnings("ignore", module="zarr")
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated.*")
        warnings.filterwarnings("ignore", message=".*string.*")
        try:
            ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)
        except OSError as e:
            raise MoetraceError(f"cannot write the audit store {str(path)!r}: {e.strerror or e}") from None
    return path


def open_audit(path):
    """Open an audit store written by :func:`save_audit`."""
    import xarray as xr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise MoetraceError(f"{str(path)!r} is not an audit store (no zarr.json)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="zarr")
        ds = xr.open_zarr(path, consolidated=False)
    if "tensor_cosine" not in ds:
        raise MoetraceError(f"{str(path)!r} is a Zarr store but not a moetrace weight audit")
    return ds
