"""A run's analysis: every variant against the reference, headline figures, and the noise floor.

The **noise floor** is ``orig-bf16`` against ``orig-fp32``: the original weights, only computed
in BF16, i.e. the error of compute precision alone. A quantized variant's figure divided by the
floor's says how many times worse than "just BF16" it is; a difference between two variants that
is small against the floor is a difference of no practical weight. Error-like figures (larger is
worse) are expressed as multiples of the floor; agreement is turned into disagreement first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from moetrace.errors import MoetraceError
from moetrace.tracer.analysis import compare as compare
from moetrace.tracer.analysis import stats as stats
from moetrace.tracer.analysis.decompose import decompose, max_local_layer, plant_of
from moetrace.tracer.analysis.output import output_metrics, output_tokens
from moetrace.tracer.analysis.routing import routing_diff

FLOOR_VARIANT = "orig-bf16"
FLOOR_REFERENCE = "orig-fp32"

# (key, label, format, error-like: shown as a multiple of the floor)
FIGURES = [
    ("final_rel_l2", "final relL2", "{:.3e}", True),
    ("max_local", "max local", "{:.3e}", True),
    ("max_local_layer", "at layer", "{:d}", False),
    ("any_flip", "set flips", "{:.3f}", True),
    ("kl_mean", "KL mean", "{:.3e}", True),
    ("kl_p99", "KL p99", "{:.3e}", True),
    ("top1_agreement", "top-1 agree", "{:.3f}", False),
    ("top1_disagreement", "top-1 disagree", "{:.3f}", True),
    ("abs_dp_next_mean", "|dp next|", "{:.2e}", True),
    ("dnll_next_mean", "dNLL next", "{:+.2e}", False),
]
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
                    seed: int = 0) -> VariantAnalysis:
    """Diff, decomposition, routing diff and output metrics of ``var``, and its headline figures."""
    name = var.attrs.get("variant", "?")
    modes = list(var["mode"].values)
    if "free" not in modes:
        raise MoetraceError(f"{name} has no 'free' mode (it has {modes}); the headline figures are free-running")
    d = compare.diff(ref, var, "free")
    dec = decompose(ref, var) if "teacher" in modes and "resid" in var else None
    rd = routing_diff(ref, var, "free") if "topk_idx" in var and "router_logits" in var else None
    om = output_metrics(ref, var, "free", n_resamples, seed) if "logits" in var else None
    a = VariantAnalysis(name, d, dec, rd, om, None)
    if "resid" in var:
        last = ref["layer"].values[-1]
        err = compare.hidden_error(compare._ref(ref, "resid").sel(layer=last),
                                   var["resid"].sel(mode="free", layer=last)).rel_l2.values  # (token,)
        p, lo, hi = stats.with_ci(err, "mean", n_resamples, seed)
        a.figures["final_rel_l2"], a.ci["final_rel_l2"] = p, (lo, hi)
    if dec is not None:
        layer, value = max_local_layer(dec)
        a.figures["max_local"], a.figures["max_local_layer"] = value, layer
    if rd is not None:
        a.figures["any_flip"] = float(rd["any_flip"].mean())
    if om is not None:
        a.kl_tokens = output_tokens(ref, var, "free")["kl"].values
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
        for key, _, _, error_like in FIGURES:
            if error_like and key in a.figures and key in floor.figures:
                f = floor.figures[key]
                a.x_floor[key] = a.figures[key] / f if f else float("inf") if a.figures[key] else float("nan")


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
                seed: int = 0) -> RunAnalysis:
    """Analyse every variant of a run folder against its reference, with the noise floor when present."""
    ref, datasets = load_run(run_dir, reference)
    analyses = {name: analyze_variant(ref, ds, n_resamples, seed) for name, ds in sorted(datasets.items(), key=_order)}
    floor = analyses.get(FLOOR_VARIANT) if ref.attrs.get("variant") == FLOOR_REFERENCE else None
    set_floor(analyses, floor)
    from moetrace.tracer.analysis.decompose import plant_of

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


def format_headlines(run: RunAnalysis) -> str:
    """A human table: one row per variant, headline figures, and their multiples of the noise floor."""
    keys = [f for f in FIGURES if any(f[0] in a.figures for a in run.variants.values())]
    main = [k for k in keys if k[0] != "top1_disagreement"]  # the floor table shows it; agreement reads easier
    lines = [f"headline figures vs {run.reference} on {run.model} (free mode; 95% bootstrap intervals below)"]
    width = max([len(n) for n in run.variants] + [7])
    lines.append(f"{'variant':<{width}}  " + "  ".join(f"{k[1]:>14}" for k in main))
    for a in run.variants.values():
        cells = [k[2].format(a.figures[k[0]]) if k[0] in a.figures else "-" for k in main]
        lines.append(f"{a.name:<{width}}  " + "  ".join(f"{c:>14}" for c in cells))
    if run.floor is not None:
        lines.append(f"as multiples of the noise floor ({FLOOR_VARIANT} vs {FLOOR_REFERENCE}):")
        xkeys = [k for k in keys if k[3]]
        lines.append(f"{'variant':<{width}}  " + "  ".join(f"{k[1]:>14}" for k in xkeys))
        for a in run.variants.values():
            cells = [f"{a.x_floor[k[0]]:.1f}x" if k[0] in a.x_floor else "-" for k in xkeys]
            lines.append(f"{a.name:<{width}}  " + "  ".join(f"{c:>14}" for c in cells))
    else:
        lines.append(f"(no noise floor: the run has no {FLOOR_VARIANT} store against {FLOOR_REFERENCE})")
    for a in run.variants.values():
        parts = [f"{k} {a.figures[k]:.3e} [{a.ci[k][0]:.3e}, {a.ci[k][1]:.3e}]" for k in CI_KEYS if k in a.ci]
        if parts:
            lines.append(f"  {a.name}: " + "; ".join(parts))
    return "\n".join(lines)


def headlines_to_dict(run: RunAnalysis) -> dict:
    """A JSON-ready dict of the headline figures, intervals and floor multiples."""
    def clean(d):
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in d.items()}

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
        out.update(kl_floor=p, kl_floor_ci=[lo, hi], diff_x_floor=abs(out["kl_diff"]) / p,
                   direct_x_floor=out["kl_direct"] / p)
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
        compare.check_comparable(ref, ds)
    except MoetraceError:
        return None
    return ds if mode in ds["mode"].values else None
