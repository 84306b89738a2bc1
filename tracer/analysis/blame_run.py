"""``moetrace blame RUN VARIANT``: the library call behind the command (search, audit cross-check, budget).

The run folder's stores give everything: the model (the variant store's ``config``), the tokens,
the reference's logits and every layer's recorded input. The result is also saved beside the
stores (``RUN/blame-VARIANT.json``), where ``moetrace report`` finds it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.tracer.analysis import blame as B

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)


def parse_budget(text: str) -> int:
    """``50MB`` (decimal: 50e6), ``50MiB`` / ``50M`` (binary), ``1.5GB``, or plain bytes -> bytes."""
    m = _SIZE.fullmatch(str(text))
    if not m or (m.group(3) and not m.group(2)):
        raise MoetraceError(f"--budget {text!r} is no size; give e.g. 50MB, 50MiB, 1.5GB or a byte count")
    value, unit, binary, b = float(m.group(1)), m.group(2).lower(), m.group(3), m.group(4)
    power = "kmgt".index(unit) + 1 if unit else 0
    base = 1000 if (b and not binary) else 1024
    return int(value * base ** power)


def open_run(run_dir, variant: str):
    """(source, reference store, variant store) of ``variant`` in ``run_dir``.

    Raises:
        MoetraceError: no such store, a GGUF variant under a block-computing path, no reference.
    """
    from moetrace.tracer.sources.checkpoint import open_source
    from moetrace.tracer.store.reader import open_trace
    from moetrace.tracer.variants import Variant

    run_dir = Path(run_dir)
    v = Variant.parse(variant)
    path = run_dir / f"{v.store_name}.zarr"
    if not path.exists():
        have = sorted(p.name[:-5] for p in run_dir.glob("*.zarr")) if run_dir.is_dir() else []
        raise MoetraceError(f"{str(run_dir)!r} holds no store of variant {v.name}; stores there: "
                            f"{', '.join(have) or 'none'}")
    if v.gguf_name is not None and v.path.takes_blocks():
        raise MoetraceError(f"variant {v.name}: blame restores parts of a GGUF file's variant under a dense compute "
                            f"path only (e.g. gguf-bf16), not under {v.compute!r}, which takes block bytes")
    var_ds = open_trace(path)
    cfg = var_ds.attrs.get("config") or {}
    cfg = json.loads(cfg) if isinstance(cfg, str) else cfg
    ref = Variant.parse(var_ds.attrs.get("reference") or cfg.get("reference", "orig-fp32"))
    ref_ds = open_trace(run_dir / f"{ref.store_name}.zarr")
    if "logits" not in ref_ds or "resid" not in var_ds or "logits" not in var_ds:
        raise MoetraceError("blame needs the resid and logits sites of the reference and the variant; trace them "
                            "(the default --sites)")
    source = open_source(cfg.get("model", var_ds.attrs.get("model")), plant=cfg.get("plant"))
    if source.model_hash != var_ds.attrs.get("model_hash"):
        raise MoetraceError(f"the model {source.model_id} no longer matches the one {path} was traced with")
    return source, ref_ds, var_ds, cfg


def gguf_of_run(cfg: dict, source, variant: str):
    """The GGUF file a ``gguf``/``gguf_NAME`` variant of a run was traced from, opened and checked
    against the model (None for any other variant).

    Raises:
        MoetraceError: the run does not name the file, or the file is gone or no longer matches.
    """
    from moetrace.tracer.sources.gguf import open_gguf
    from moetrace.tracer.variants import Variant

    name = Variant.parse(variant).gguf_name
    if name is None:
        return None
    file = cfg.get("gguf") if name == "" else (cfg.get("ggufs") or {}).get(name)
    if not file:
        raise MoetraceError(f"variant {variant}: the run does not record which GGUF file it traced")
    if not Path(file).is_file():
        raise MoetraceError(f"variant {variant}: the GGUF file {file!r} the run traced is no longer there")
    gguf = open_gguf(file)
    gguf.check_matches(source)
    return gguf


def _flagged(source, variant, threshold: float) -> list[dict]:
    from moetrace.tracer.weights.audit import audit, ranked

    ds = audit(source, variant.weights + "".join(f"+{p}={t.lower()}" for p, t in variant.overrides)
               + f"-{variant.compute}", threshold=threshold)
    return [r for r in ranked(ds) if r["flagged"]]


def _token_file(var_ds, folder: Path) -> Path:
    """The run's tokens as JSONL (one sequence per line), to trace the same tokens again."""
    seq, ids = var_ds["seq"].values, var_ds["token_id"].values
    path = folder / ".blame-tokens.jsonl"
    path.write_text("".join(json.dumps({"ids": ids[seq == s].tolist()}) + "\n" for s in np.unique(seq)))
    return path


def verify(run_dir, cfg: dict, var_ds, ref_ds, overrides: list[tuple[str, str]]) -> dict:
    """Trace the variant with ``overrides`` for real (a new store in the run folder) and measure its KL."""
    from moetrace.tracer import api
    from moetrace.tracer.execution.restore import _kl
    from moetrace.tracer.store.reader import open_trace
    from moetrace.tracer.variants import Variant

    v = Variant.parse(var_ds.attrs["variant"])
    new = Variant(v.weights, v.compute, v.dequant, tuple(overrides) + tuple(v.overrides))
    run_dir = Path(run_dir)
    tokens = _token_file(var_ds, run_dir)
    try:
        result = api.run(model=cfg.get("model", "builtin:"), variants=[new.name], reference=ref_ds.attrs["variant"],
                         modes=["free"], tokens_file=str(tokens), plant=cfg.get("plant"), out_dir=run_dir.parent,
                         run_name=run_dir.name, sites=["resid", "logits"])
    finally:
        tokens.unlink(missing_ok=True)
    ds = open_trace(result.stores[new.name])
    kl = _kl(ref_ds["logits"].sel(mode="free").values.astype(np.float64),
             ds["logits"].sel(mode="free").values.astype(np.float64))
    return {"variant": new.name, "store": str(result.stores[new.name]), "kl": float(np.mean(kl))}


def quantize_args(overrides: list[tuple[str, str]]) -> str:
    """The llama-quantize arguments reproducing the overrides."""
    return " ".join(f"--tensor-type {p}={t.lower()}" for p, t in overrides)


def run_blame(run_dir, variant: str, to: str = "ref", layers: int = 1, level: str = "expert",
              budget: str | None = None, audit: bool = False, threshold: float = 0.98, progress=None) -> dict:
    """Blame ``variant`` of the run in ``run_dir``; see ``moetrace blame --help``.

    Returns:
        ``{"result": BlameResult, "cross_check": [lines], "budget": {...} or None, "saved": path}``.
    """
    budget_bytes = parse_budget(budget) if budget is not None else None
    source, ref_ds, var_ds, cfg = open_run(run_dir, variant)
    gguf = gguf_of_run(cfg, source, variant)
    if gguf is not None and (budget is not None or audit):
        raise MoetraceError(f"variant {variant} comes from a GGUF file: blame ranks its parts, but --budget and "
                            f"--audit derive the variant's weights from the model, which this file may not match; "
                            f"leave them out")
    res = B.blame(source, ref_ds, var_ds, to=to, layers=layers, level=level, progress=progress, gguf=gguf)
    out = {"result": res, "cross_check": [], "budget": None}
    if audit:
        from moetrace.tracer.variants import Variant

        out["cross_check"] = B.cross_check(res, _flagged(source, Variant.parse(variant), threshold))
    if budget_bytes is not None:
        to_type = res.to_type
        chosen = B.propose(res, budget_bytes)
        info = {"budget_bytes": budget_bytes, "to_type": to_type, "chosen": [r["part"] for r in chosen],
                "added_bytes": sum(r["added_bytes"] for r in chosen)}
        if chosen:
            overrides = B.overrides_of(chosen, to_type)
            info["predicted"] = B.predict(res, chosen)
            info["real"] = verify(run_dir, cfg, var_ds, ref_ds, overrides)
            info["real"]["kl_recovered"] = info["predicted"]["kl_variant"] - info["real"]["kl"]
            p = info["predicted"]
            info["within"] = bool(p["ci_low"] <= info["real"]["kl_recovered"] <= p["ci_high"])
            info["llama_quantize"] = quantize_args(overrides)
        out["budget"] = info
    saved = Path(run_dir) / f"blame-{res.variant}.json"
    saved.write_text(json.dumps(to_dict(out), indent=2))
    out["saved"] = saved
    return out


def to_dict(out: dict) -> dict:
    from moetrace.tracer.analysis.common import json_number

    d = B.blame_to_dict(out["result"])
    d["cross_check"] = out["cross_check"]
    if out["budget"] is not None:
        d["budget"] = json.loads(json.dumps(out["budget"], default=lambda x: json_number(x)))
    return d


def budget_lines(info: dict | None) -> list[str]:
    if info is None:
        return []
    head = f"Budget {info['budget_bytes'] / 1e6:.2f} MB, restored to {info['to_type'].lower()}:"
    if not info["chosen"]:
        return [f"{head} no measured tensor fits (the smallest adds more); raise --budget or search more layers "
                f"(--layers)"]
    p, r = info["predicted"], info["real"]
    return [
        f"{head} {', '.join(info['chosen'])} (+{info['added_bytes'] / 1e6:.2f} MB)",
        f"  predicted: KL {p['kl_variant']:.4f} -> {p['kl']:.4f} nats, recovered {p['kl_recovered']:.4f} "
        f"(95% CI [{p['ci_low']:.4f}, {p['ci_high']:.4f}])",
        f"  real run ({r['variant']}): KL {r['kl']:.4f} nats, recovered {r['kl_recovered']:.4f} - "
        + ("within the predicted interval" if info["within"] else "OUTSIDE the predicted interval"),
        f"  reproduce: llama-quantize {info['llama_quantize']} MODEL.gguf OUT.gguf {r['variant'].split('+')[0].upper()}",
    ]
