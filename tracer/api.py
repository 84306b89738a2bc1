"""The library calls behind the command line: run a trace, diff two stores, format tables."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.hooks.sites import ALL_SITES
from moetrace.tracer.analysis import compare as compare
from moetrace.tracer.execution.executor import RunConfig, run_trace
from moetrace.tracer.sources.prompts import DEMO_TEXT, read_prompts, tokenize
from moetrace.tracer.store import location as store_loc
from moetrace.tracer.store.zarr_store import open_trace


def default_run_name(model_id: str) -> str:
    name = model_id.split("/")[-1] if not model_id.startswith("builtin:") else model_id[len("builtin:"):]
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name) or "run"


@dataclass
class RunResult:
    run_dir: Path | str  # a local folder, or the run's URL
    reference: str
    stores: dict
    diffs: dict  # variant name -> diff Dataset (free mode)

    def summary_json(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "reference": self.reference,
            "stores": {k: str(v) for k, v in self.stores.items()},
            "diffs": {k: compare.diff_to_dict(d) for k, d in self.diffs.items()},
        }

    def summary_text(self) -> str:
        parts = [format_diff(d) for d in self.diffs.values()]
        parts.append(f"Traces in {self.run_dir}/ (open with moetrace.open_traces('{self.run_dir}') "
                     f"or xarray.open_zarr on one store).")
        return "\n\n".join(parts)


def _reusable_reference(path, model_hash: str, token_ids: np.ndarray, sites: list[str]) -> bool:
    if not store_loc.exists(path):
        return False
    try:
        ds = open_trace(path)
    except MoetraceError:
        return False
    return (ds.attrs.get("model_hash") == model_hash and np.array_equal(ds["token_id"].values, token_ids)
            and set(sites) <= set(ds.attrs.get("sites", [])))


def run(model="builtin:", variants=(), reference="orig-fp32", modes=("free",), text=None, prompts_file=None,
        max_tokens=None, plant=None, sites=None, out_dir="traces", run_name=None, seed=0, progress=None,
        log=None, gguf=None, resume=False) -> RunResult:
    """Trace ``variants`` of ``model`` against ``reference`` and diff them; see ``moetrace run --help``.

    ``gguf`` is the GGUF file of the ``gguf-*`` variants; ``resume`` continues the stores a stopped
    run with the same options left incomplete in the run folder.
    """
    from moetrace.tracer.sources.checkpoint import open_source

    log = log or (lambda msg: None)
    if not variants:
        raise MoetraceError("give at least one --variant (see `moetrace variants`)")
    if text is not None and prompts_file is not None:
        raise MoetraceError("give --text or --prompts, not both")
    if text is not None and not text.strip():
        raise MoetraceError("--text is empty; give text with at least one token")
    sites = list(sites) if sites else list(ALL_SITES)
    if gguf is not None and not Path(gguf).is_file():
        raise MoetraceError(f"GGUF file {str(gguf)!r} given with --gguf does not exist")
    config = RunConfig(model=model, variants=list(variants), reference=reference, modes=list(modes), sites=sites,
                       seed=seed, plant=plant, gguf=str(Path(gguf).resolve()) if gguf is not None else None)
    log(f"Opening model {model} ...")
    source = open_source(model, plant=plant)
    texts = read_prompts(prompts_file) if prompts_file else [text if text is not None else DEMO_TEXT]
    tokens = tokenize(texts, source.tokenizer, max_tokens)
    # A local folder (a Path, as before) or a URL such as s3://bucket/traces (a str).
    run_dir = store_loc.join(out_dir, run_name or default_run_name(source.model_id))
    ref_name = config.reference
    reuse = _reusable_reference(store_loc.join(run_dir, f"{ref_name}.zarr"), source.model_hash, tokens.ids, sites)
    log(f"Tracing {source.model_id}: {source.num_layers} layers, {tokens.n} tokens in {len(texts)} sequence(s); "
        f"reference {ref_name}{' (already recorded)' if reuse else ''}, variants {', '.join(config.variants)}")
    if resume and not any(n.endswith(".zarr") for n in store_loc.names(run_dir)):
        raise MoetraceError(f"nothing to resume: {str(run_dir)!r} holds no trace stores; run without --resume")

    def on_progress(event, **info):
        if event == "resume":
            left = f"continuing at layer {info['layer']} of {info['layers']}" if info["layer"] < info["layers"] \
                else "every layer is written; finishing"
            log(f"Resuming {run_dir}: {left}" + (f" (complete already: {', '.join(info['complete'])})"
                                                  if info["complete"] else ""))
        if progress:
            progress(event, **info)

    stores = run_trace(source, config, tokens, run_dir, progress=on_progress, write_reference=not reuse,
                       resume=resume)
    ref_ds = open_trace(store_loc.join(run_dir, f"{ref_name}.zarr"))
    diffs = {}
    for v in config.variants:
        if v == ref_name:
            continue
        diffs[v] = compare.diff(ref_ds, open_trace(stores[v]), "free")
    return RunResult(run_dir, ref_name, stores, diffs)


def diff_stores(reference, variant, mode="free"):
    """Open two stores and return :func:`moetrace.tracer.analysis.compare.diff` of them."""
    for p in (reference, variant):
        if not store_loc.exists(p):
            raise MoetraceError(f"trace store {str(p)!r} does not exist")
    return compare.diff(open_trace(reference), open_trace(variant), mode)


def format_diff(d) -> str:
    """A human table of a diff Dataset."""
    head = f"{d.attrs['variant']} vs {d.attrs['reference']} ({d.attrs['mode']} mode) on {d.attrs['model']}"
    cols = [("resid_rel_l2_mean", "relL2 mean", "{:.2e}"), ("resid_rel_l2_p99", "relL2 p99", "{:.2e}"),
            ("resid_cosine_mean", "cos mean", "{:.5f}"), ("resid_cosine_p1", "cos p1", "{:.5f}"),
            ("topk_overlap", "top-k overlap", "{:.3f}"), ("top1_flip", "top-1 flip", "{:.3f}")]
    cols = [c for c in cols if c[0] in d]
    lines = [head, "layer  " + "  ".join(f"{c[1]:>13}" for c in cols)]
    for i, L in enumerate(d["layer"].values):
        lines.append(f"{int(L):>5}  " + "  ".join(f"{c[2].format(float(d[c[0]].values[i])):>13}" for c in cols))
    if "kl_mean" in d:
        lines.append(f"output: KL(ref || variant) mean {float(d['kl_mean']):.3e} nats, "
                     f"top-1 agreement {100 * float(d['top1_agreement']):.1f}%")
    return "\n".join(lines)
