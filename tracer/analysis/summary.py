"""A run's analysis: every variant against the reference, headline figures, and the noise floor.

The **noise floor** is ``orig-bf16`` against ``orig-fp32``: the original weights, only computed
in BF16, i.e. the error of compute precision alone. A quantized variant's figure divided by the
floor's says how many times worse than "just BF16" it is; a difference between two variants that
is small against the floor is a difference of no practical weight. Error-like figures (larger is
worse) are expressed as multiples of the floor; agreement is turned into disagreement first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import xarray as xr

from moetrace.errors import MoetraceError
from moetrace.tracer.analysis import compare as compare
from moetrace.tracer.analysis import stats as stats
from moetrace.tracer.analysis.common import (check_comparable, floor_fmt, floor_multiple, json_number, reference,
                                             require_mode, variant)
from moetrace.tracer.analysis.decompose import decompose, max_local_layer, plant_of
from moetrace.tracer.analysis.output import output_metrics, output_tokens
from moetrace.tracer.analysis.routing import routing_diff
from moetrace.tracer.render.table import Column, Table

FLOOR_VARIANT = "orig-bf16"
FLOOR_REFERENCE = "orig-fp32"

# The headline figures of a variant, in table order; the keys are ``VariantAnalysis.figures`` keys.
FIGURES = (
    Column("final_rel_l2", "final relL2", "{:.3e}", "relative L2 error of the last layer's output, token mean"),
    Column("max_local", "max local", "{:.3e}", "the highest local (teacher-forced) error of any layer"),
    Column("max_local_layer", "at layer", "{:d}", "the layer of that error"),
    Column("any_flip", "set flips", "{:.3f}", "share of (layer, token) pairs whose expert set changed"),
    Column("kl_mean", "KL mean", "{:.3e}", "KL(ref || variant) of the next-token distributions, nats, mean"),
    Column("kl_p99", "KL p99", "{:.3e}", "KL, 99th percentile over tokens"),
    Column("top1_agreement", "top-1 agree", "{:.3f}", "share of tokens with the same most likely next token"),
    Column("top1_disagreement", "top-1 disagree", "{:.3f}", "1 - top-1 agreement"),
    Column("abs_dp_next_mean", "|dp next|", "{:.2e}", "mean |change| of the probability of the real next token"),
    Column("dnll_next_mean", "dNLL next", "{:+.2e}", "mean change of the real next token's NLL, nats"),
)
# Figures where larger is worse: shown as multiples of the noise floor.
ERROR_LIKE = frozenset({"final_rel_l2", "max_local", "any_flip", "kl_mean", "kl_p99", "top1_disagreement",
                        "abs_dp_next_mean"})
CI_KEYS = ("final_rel_l2", "kl_mean", "top1_agreement", "dnll_next_mean")


@dataclass
class VariantAnalysis:
    """Everything moetrace derives for one variant (free mode unless said otherwise).

    Attributes:
        name: the variant.
        diff: :func:`moetrace.tracer.analysis.compare.diff` (free mode).
        decomposition: :func:`moetrace.tracer.analysis.decompose.decompose`, None without a teacher mode.
        routing: :func:`moetrace.tracer.analysis.routing.routing_diff`, None without routing sites.
        output: :func:`moetrace.tracer.analysis.output.output_metrics`, None without logits.
        kl_tokens: (token,) KL per token, for histograms.
        figures: headline figures, ``FIGURES`` keys; ``ci``: (lo, hi) for ``CI_KEYS``.
        x_floor: error-like figures as multiples of the noise floor (empty without one).
    """

    name: str
    diff: xr.Dataset
    decomposition: xr.Dataset | None
    routing: xr.Dataset | None
    output: xr.Dataset | None
    kl_tokens: np.ndarray | None
    figures: dict = field(default_factory=dict)
    ci: dict = field(default_factory=dict)
    x_floor: dict = field(default_factory=dict)


def analyze_variant(ref: xr.Dataset, var: xr.Dataset, n_resamples: int = stats.N_RESAMPLES,
                    seed: int = 0, score_positions: str | None = None) -> VariantAnalysis:
    """Diff, decomposition, routing diff and output metrics of ``var``, and its headline figures."""
    modes = [str(m) for m in var["mode"].values]
    # The headline figures are free-running where that mode was recorded; a run of another mode
    # alone (--mode routing) gets them in its own mode, and its name says so.
    mode = "free" if "free" in modes else modes[0]
    name = var.attrs.get("variant", "?") + ("" if mode == "free" else f" ({mode} mode)")
    d = compare.diff(ref, var, mode, score_positions)
    dec = decompose(ref, var) if {"free", "teacher"} <= set(modes) and "resid" in var else None
    rd = routing_diff(ref, var, mode) if "topk_idx" in var and "router_logits" in var else None
    om = (output_metrics(ref, var, mode, n_resamples, seed, score_positions=score_positions)
          if "logits" in var else None)
    a = VariantAnalysis(name, d, dec, rd, om, None)
    if "resid" in var:
        last = ref["layer"].values[-1]
        err = compare.hidden_error(reference(ref, "resid").sel(layer=last),
                                   variant(var, "resid", mode).sel(layer=last)).rel_error.values  # (token,)
        p, lo, hi = stats.with_ci(err, "mean", n_resamples, seed)
        a.figures["final_rel_l2"], a.ci["final_rel_l2"] = p, (lo, hi)
    if dec is not None:
        layer, value = max_local_layer(dec)
        a.figures["max_local"], a.figures["max_local_layer"] = value, layer
    if rd is not None:
        a.figures["any_flip"] = float(rd["any_flip"].mean())
    if om is not None:
        a.kl_tokens = output_tokens(ref, var, mode)["kl"].values
        for k in ("kl_mean", "kl_p99", "top1_agreement", "abs_dp_next_mean", "dnll_next_mean"):
            a.figures[k] = float(om[k])
        a.figures["top1_disagreement"] = 1 - a.figures["top1_agreement"]
        for k in ("kl_mean", "top1_agreement", "dnll_next_mean"):
            a.ci[k] = tuple(float(x) for x in om[f"{k}_ci"].values)
    return a


def set_floor(analyses: dict[str, VariantAnalysis], floor: VariantAnalysis | None) -> None:
    """Fill each analysis's ``x_floor`` with its error-like figures divided by the floor's."""
    if floor is None:
        return
    for a in analyses.values():
        for key in ERROR_LIKE:
            if key in a.figures and key in floor.figures:
                f = floor.figures[key]
                a.x_floor[key] = floor_multiple(a.figures[key], f)


@dataclass
class RunAnalysis:
    """A run's analyses: ``reference`` name, ``variants`` name -> VariantAnalysis, ``floor`` (the
    orig-bf16 analysis, or None when the run has no such store or another reference), and the
    opened ``datasets``."""

    run_dir: Path
    reference: str
    model: str
    plant: str
    variants: dict
    floor: VariantAnalysis | None
    datasets: dict = field(default_factory=dict, repr=False)  # name -> Dataset, the reference included


def load_run(run_dir, reference: str | None = None) -> tuple[xr.Dataset, dict[str, xr.Dataset]]:
    """The reference's and every variant's Dataset of a run folder.

    The reference is ``reference`` if given, else the one the variant stores name, else orig-fp32.
    """
    from moetrace.tracer.store.zarr_store import list_stores, open_trace

    datasets = {}
    for p in list_stores(run_dir):
        ds = open_trace(p)
        datasets[ds.attrs["variant"]] = ds
    if reference is None:
        named = {ds.attrs.get("reference") for ds in datasets.values() if ds.attrs.get("reference")}
        reference = named.pop() if len(named) == 1 else FLOOR_REFERENCE
    if reference not in datasets:
        raise MoetraceError(f"run folder {str(run_dir)!r} has no store of the reference {reference!r}; "
                            f"it has {', '.join(sorted(datasets))}")
    ref = datasets.pop(reference)
    if not datasets:
        raise MoetraceError(f"run folder {str(run_dir)!r} holds only the reference {reference!r}; trace a variant "
                            f"with `moetrace run --variant ...`")
    return ref, datasets


def _order(item) -> tuple:
    # The noise floor first, then the others by name: tables read from "just BF16" onwards.
    return (item[0] != FLOOR_VARIANT, item[0])


def analyze_run(run_dir, reference: str | None = None, n_resamples: int = stats.N_RESAMPLES,
                seed: int = 0, score_positions: str | None = None) -> RunAnalysis:
    """Analyse every variant of a run folder against its reference, with the noise floor when present."""
    ref, datasets = load_run(run_dir, reference)
    analyses = {name: analyze_variant(ref, ds, n_resamples, seed, score_positions)
                for name, ds in sorted(datasets.items(), key=_order)}
    floor = analyses.get(FLOOR_VARIANT) if ref.attrs.get("variant") == FLOOR_REFERENCE else None
    set_floor(analyses, floor)
    return RunAnalysis(Path(run_dir), ref.attrs["variant"], ref.attrs.get("model", "?"), plant_of(ref),
                       analyses, floor, {ref.attrs["variant"]: ref, **datasets})


def dequant_pairs(run: RunAnalysis) -> list[tuple[str, str]]:
    """(W-bf16, W-fp32) pairs of quantized weights W traced in both compute dtypes: where BF16
    dequantization can be read against FP32 dequantization of the same weights."""
    from moetrace.errors import MoetraceError
    from moetrace.tracer.variants import Variant

    parsed = {}
    for n in run.variants:
        try:
            parsed[n] = Variant.parse(n)
        except MoetraceError:  # a store whose name is no variant (renamed by hand) pairs with nothing
            continue
    by_name = {v.name: n for n, v in parsed.items()}
    pairs = []
    for n in sorted(parsed):
        v = parsed[n]
        if v.weights == "orig" or (v.compute, v.dequant) != ("bf16", "bf16"):
            continue
        twin = Variant(v.weights, "fp32").name
        if twin in by_name:
            pairs.append((n, by_name[twin]))
    return pairs


def headline_tables(run: RunAnalysis) -> list[Table]:
    """The headline figures (one row per variant), their multiples of the noise floor (when the run has
    one) and their bootstrap intervals, as tables for the terminal and the report."""
    keys = [c for c in FIGURES if any(c.key in a.figures for a in run.variants.values())]
    name = Column("variant", "variant", str, align="left")
    # Agreement reads easier than disagreement; the floor table shows the error-like one.
    main = Table([name] + [c for c in keys if c.key != "top1_disagreement"],
                 title=f"headline figures vs {run.reference} on {run.model} (free mode)")
    for a in run.variants.values():
        main.add({"variant": a.name, **a.figures})
    tables = [main]
    if run.floor is not None:
        xkeys = [replace(c, fmt=floor_fmt(), description=f"{c.header} / the noise floor's (exact: both 0; floor 0: "
                                                               f"the floor's is 0, this one not)") for c in keys
                 if c.key in ERROR_LIKE]
        floor = Table([name] + xkeys, title=f"as multiples of the noise floor ({FLOOR_VARIANT} vs {FLOOR_REFERENCE}):")
        for a in run.variants.values():
            floor.add({"variant": a.name, **a.x_floor})
        tables.append(floor)
    ci = Table([name, Column("figure", "figure", str, align="left"), Column("value", "value", "{:.3e}"),
                Column("lo", "low", "{:.3e}"), Column("hi", "high", "{:.3e}")],
               title=f"{int(round(100 * stats.LEVEL))}% bootstrap intervals over tokens:")
    header = {c.key: c.header for c in FIGURES}
    for a in run.variants.values():
        for k in CI_KEYS:
            if k in a.ci:
                ci.add({"variant": a.name, "figure": header[k], "value": a.figures[k], "lo": a.ci[k][0],
                        "hi": a.ci[k][1]})
    return tables + [ci]


def format_headlines(run: RunAnalysis) -> str:
    """The headline tables (:func:`headline_tables`) for the terminal."""
    text = [t.to_text() for t in headline_tables(run)]
    if run.floor is None:
        text.insert(1, f"(no noise floor: the run has no {FLOOR_VARIANT} store against {FLOOR_REFERENCE})")
    return "\n".join(text)


def headlines_to_dict(run: RunAnalysis) -> dict:
    """A JSON-ready dict of the headline figures, intervals and floor multiples."""
    def clean(d):
        return {k: v if isinstance(v, str) else json_number(v) for k, v in d.items()}

    return {
        "run_dir": str(run.run_dir), "reference": run.reference, "model": run.model, "plant": run.plant,
        "noise_floor": FLOOR_VARIANT if run.floor is not None else None,
        "variants": {n: {"figures": clean(a.figures), "ci": {k: list(v) for k, v in a.ci.items()},
                         "x_floor": clean(a.x_floor)} for n, a in run.variants.items()},
    }


def pair_difference(ref: xr.Dataset, a: xr.Dataset, b: xr.Dataset, floor: xr.Dataset | None = None,
                    n_resamples: int = stats.N_RESAMPLES, seed: int = 0) -> dict:
    """Does variant ``a`` differ from variant ``b`` by more than the noise floor?

    Two readings, both over the same tokens (free mode):

    - the difference of their per-token KL against the reference, ``KL(ref||a) - KL(ref||b)``,
      with a paired bootstrap interval (the same tokens resampled for both);
    - their direct divergence ``KL(b || a)`` per token, i.e. ``a`` measured against ``b``.

    Each is compared with the floor's mean ``KL(ref || floor)`` when ``floor`` is given.

    Returns:
        A dict: ``a``, ``b``, ``kl_a``, ``kl_b``, ``kl_diff`` and ``kl_diff_ci``, ``kl_direct`` and
        ``kl_direct_ci``, and with a floor ``kl_floor``, ``kl_floor_ci`` and ``diff_x_floor``,
        ``direct_x_floor``.
    """
    ka = output_tokens(ref, a)["kl"].values
    kb = output_tokens(ref, b)["kl"].values
    kd = output_tokens(b, a)["kl"].values
    out = {"a": a.attrs.get("variant"), "b": b.attrs.get("variant"), "kl_a": float(ka.mean()),
           "kl_b": float(kb.mean())}
    p, lo, hi = stats.with_ci(ka - kb, "mean", n_resamples, seed)
    out.update(kl_diff=p, kl_diff_ci=[lo, hi])
    p, lo, hi = stats.with_ci(kd, "mean", n_resamples, seed)
    out.update(kl_direct=p, kl_direct_ci=[lo, hi])
    if floor is not None:
        p, lo, hi = stats.with_ci(output_tokens(ref, floor)["kl"].values, "mean", n_resamples, seed)
        out.update(kl_floor=p, kl_floor_ci=[lo, hi], diff_x_floor=floor_multiple(abs(out["kl_diff"]), p),
                   direct_x_floor=floor_multiple(out["kl_direct"], p))
    return out


def open_floor(ref: xr.Dataset, var_path, mode: str = "free") -> xr.Dataset | None:
    """The noise-floor store (orig-bf16) beside ``var_path``, when it can serve as one.

    It serves when the reference is orig-fp32, the store exists, is not ``var_path`` itself, is of
    the same model and tokens, and recorded ``mode``; otherwise None (tables then show no
    multiples).
    """
    from moetrace.tracer.store.zarr_store import open_trace

    if ref.attrs.get("variant") != FLOOR_REFERENCE:
        return None
    path = Path(var_path).parent / f"{FLOOR_VARIANT}.zarr"
    if not path.exists() or path.resolve() == Path(var_path).resolve():
        return None
    try:
        ds = open_trace(path)
        check_comparable(ref, ds)
    except MoetraceError:
        return None
    return ds if mode in ds["mode"].values else None
