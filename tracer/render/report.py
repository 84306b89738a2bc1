"""``moetrace report``: a folder with PNG plots and an index.html holding every table of a run.

The page has, in order: the headline figures of every variant (with bootstrap intervals and as
multiples of the noise floor), the divergence curves, the KL histogram, the routing flip rates,
the BF16-vs-FP32 dequantization comparisons where the run has both, and per variant the
decomposition (local, propagated, gain, with its growth summary), the routing diff with its
expert-load heat map, and the output metrics. The HTML is self-contained apart from the PNGs
beside it, so the folder can be copied or zipped as it is.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.tracer.render import plots as plots
from moetrace.tracer.analysis import stats as stats
from moetrace.tracer.analysis.summary import (CI_KEYS, FIGURES, FLOOR_VARIANT, RunAnalysis, analyze_run, dequant_pairs,
                                      pair_difference)
from moetrace.tracer.analysis.decompose import summary_lines
from moetrace.tracer.analysis.output import format_output
from moetrace.tracer.analysis.routing import load_movers


@dataclass
class Report:
    """What :func:`write_report` wrote: the folder, its files, the analysis and the pair comparisons."""

    out_dir: Path
    files: list
    run: RunAnalysis
    pairs: list

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"


def _fmt(x, spec="{:.3e}") -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    return spec.format(x)


def _table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def _headline_html(run: RunAnalysis) -> str:
    keys = [f for f in FIGURES if any(f[0] in a.figures for a in run.variants.values())]
    rows = [[a.name] + [_fmt(a.figures.get(k[0]), k[2]) if k[0] in a.figures else "-" for k in keys]
            for a in run.variants.values()]
    out = _table(["variant"] + [k[1] for k in keys], rows)
    if run.floor is not None:
        xkeys = [k for k in keys if k[3]]
        rows = [[a.name] + [_fmt(a.x_floor.get(k[0]), "{:.1f}x") for k in xkeys] for a in run.variants.values()]
        out += f"<h3>As multiples of the noise floor ({FLOOR_VARIANT} vs {html.escape(run.reference)})</h3>"
        out += _table(["variant"] + [k[1] for k in xkeys], rows)
    else:
        out += f"<p>No noise floor: the run has no {FLOOR_VARIANT} store against orig-fp32.</p>"
    rows = [[a.name, k, _fmt(a.figures[k]), _fmt(a.ci[k][0]), _fmt(a.ci[k][1])]
            for a in run.variants.values() for k in CI_KEYS if k in a.ci]
    out += "<h3>95% bootstrap intervals over tokens</h3>" + _table(["variant", "figure", "value", "low", "high"], rows)
    return out


def _decomposition_html(a, run) -> str:
    dec = a.decomposition
    cols = ["local", "local_p99", "propagated", "inherited", "gain", "growth", "amplified"] + (
        ["routing_forced"] if "routing_forced" in dec else [])
    floor = run.floor.decomposition if run.floor is not None and run.floor.decomposition is not None else None
    rows = []
    for i, L in enumerate(dec["layer"].values):
        row = [int(L)] + [_fmt(float(dec[c].values[i]), "{:.3f}" if c == "gain" else "{:.3e}") for c in cols]
        if floor is not None:
            row.append(_fmt(float(dec["local"].values[i] / floor["local"].values[i]), "{:.1f}x"))
        rows.append(row)
    headers = ["layer"] + [c.replace("routing_forced", "fixed routing") for c in cols] + (
        ["local x floor"] if floor is not None else [])
    summary = "".join(f"<li>{html.escape(s)}</li>" for s in summary_lines(dec))
    return f"<ul>{summary}</ul>" + _table(headers, rows)


def _routing_html(a, run) -> str:
    rd = a.routing
    cols = [c for c in ("topk_overlap", "top1_flip", "any_flip", "mass_moved", "flip_own", "flip_upstream") if c in rd]
    floor = run.floor.routing if run.floor is not None and a is not run.floor else None
    rows = []
    for i, L in enumerate(rd["layer"].values):
        row = [int(L)] + [_fmt(float(rd[c].values[i]), "{:.3f}" if c != "mass_moved" else "{:.2e}") for c in cols]
        if floor is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                row += [_fmt(float(rd["any_flip"].values[i] / floor["any_flip"].values[i]), "{:.1f}x"),
                        _fmt(float(rd["mass_moved"].values[i] / floor["mass_moved"].values[i]), "{:.1f}x")]
        rows.append(row)
    out = _table(["layer"] + cols + (["any_flip x floor", "mass_moved x floor"] if floor is not None else []), rows)
    rows = [[f"[{lo:g}, {hi:g})", int(c), int(h), _fmt(float(r), "{:.3f}")]
            for lo, hi, c, h, r in zip(rd.margin_lo.values, rd.margin_hi.values, rd.bin_count.values,
                                       rd.bin_flips.values, rd.bin_flip_rate.values)]
    out += "<h4>Set-flip rate by the reference's k/(k+1) logit margin</h4>"
    out += _table(["margin", "layer-tokens", "flipped", "rate"], rows)
    mv = load_movers(rd)
    rows = [[kind, r["layer"], r["expert"], f"{r['change']:+d}", r["ref_tokens"]]
            for kind in ("gained", "lost") for r in mv[kind]]
    out += "<h4>Experts that gained and lost the most tokens</h4>"
    out += _table(["", "layer", "expert", "tokens", "reference tokens"], rows)
    first = rd["first_flip_layer"].values
    n = rd["layers_flipped"].values
    out += (f"<p>First flipped layer per token: "
            + html.escape(", ".join(f"layer {int(L)}: {int((first == L).sum())}" for L in rd["layer"].values
                                    if (first == L).any()) or "none")
            + f"; never: {int((first < 0).sum())} of {first.size} tokens. Layers flipped per token: mean "
            f"{n.mean():.2f}, max {int(n.max()) if n.size else 0}.</p>")
    return out


def _pairs_html(pairs) -> str:
    if not pairs:
        return ""
    rows = [[p["a"], p["b"], _fmt(p["kl_a"]), _fmt(p["kl_b"]),
             f"{_fmt(p['kl_diff'], '{:+.3e}')} [{_fmt(p['kl_diff_ci'][0], '{:+.2e}')}, "
             f"{_fmt(p['kl_diff_ci'][1], '{:+.2e}')}]",
             f"{_fmt(p['kl_direct'])} [{_fmt(p['kl_direct_ci'][0], '{:.2e}')}, {_fmt(p['kl_direct_ci'][1], '{:.2e}')}]",
             _fmt(p.get("kl_floor")), _fmt(p.get("diff_x_floor"), "{:.2f}x"), _fmt(p.get("direct_x_floor"), "{:.2f}x")]
            for p in pairs]
    return ("<h2>BF16 vs FP32 dequantization</h2><p>The same quantized weights dequantized to BF16 and to FP32: "
            "the difference of their KL against the reference (paired bootstrap), their direct divergence "
            "KL(fp32 || bf16), and both against the noise floor's KL.</p>"
            + _table(["bf16", "fp32", "KL bf16", "KL fp32", "KL difference [95%]", "KL(fp32||bf16) [95%]",
                      "floor KL", "|difference| x floor", "direct x floor"], rows))


def pair_lines(pairs) -> list[str]:
    """One sentence per dequantization pair, for the command line."""
    out = []
    for p in pairs:
        s = (f"{p['a']} vs {p['b']}: KL {p['kl_a']:.3e} vs {p['kl_b']:.3e}, difference {p['kl_diff']:+.3e} "
             f"[{p['kl_diff_ci'][0]:+.2e}, {p['kl_diff_ci'][1]:+.2e}]; direct KL({p['b']} || {p['a']}) "
             f"{p['kl_direct']:.3e}")
        if "kl_floor" in p:
            s += (f"; noise floor KL {p['kl_floor']:.3e}: |difference| = {p['diff_x_floor']:.2f}x, direct = "
                  f"{p['direct_x_floor']:.2f}x the floor")
        out.append(s)
    return out


def write_report(run_dir, out_dir=None, reference: str | None = None, n_resamples: int = stats.N_RESAMPLES,
                 seed: int = 0, log=None) -> Report:
    """Analyse a run folder and write the report folder (default ``RUN/report``).

    Args:
        run_dir: a run folder of trace stores (``traces/RUN``).
        out_dir: where to write; created if missing.
        reference: the reference variant (default: the one the stores name).
        n_resamples, seed: the bootstrap's resamples and seed.
        log: optional callable for progress lines.

    Returns:
        The :class:`Report`.
    """
    from moetrace.tracer.store.zarr_store import list_stores

    log = log or (lambda msg: None)
    run_dir = Path(run_dir)
    list_stores(run_dir)  # a missing or empty run folder fails here, before anything is written
    log(f"Analysing {run_dir} ...")
    run = analyze_run(run_dir, reference, n_resamples, seed)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoetraceError(f"cannot create report folder {str(out)!r}: {e.strerror}") from None
    ref_ds = run.datasets[run.reference]
    floor_ds = run.datasets.get(FLOOR_VARIANT) if run.floor is not None else None
    pairs = [pair_difference(ref_ds, run.datasets[a], run.datasets[b], floor_ds, n_resamples, seed)
             for a, b in dequant_pairs(run)]
    log(f"Drawing plots into {out} ...")
    files = [plots.plot_divergence(run, out / "divergence.png")]
    if any(a.kl_tokens is not None for a in run.variants.values()):
        files.append(plots.plot_kl_histogram(run, out / "kl_histogram.png"))
    if any(a.routing is not None for a in run.variants.values()):
        files.append(plots.plot_routing(run, out / "routing_flips.png"))
    sections = []
    for a in run.variants.values():
        parts = [f'<h2 id="{html.escape(a.name)}">{html.escape(a.name)}</h2>']
        if a.decomposition is not None:
            f = plots.plot_decomposition(a, run, out / f"decomposition_{a.name}.png")
            files.append(f)
            parts += ["<h3>Local vs propagated error</h3>", _decomposition_html(a, run), _img(f.name, "decomposition")]
        else:
            parts.append("<p>No teacher mode recorded: run with <code>--mode free --mode teacher</code> for the "
                         "local/propagated decomposition.</p>")
        if a.routing is not None:
            f = plots.plot_expert_load(a, run, out / f"expert_load_{a.name}.png")
            files.append(f)
            parts += ["<h3>Routing</h3>", _routing_html(a, run), _img(f.name, "expert load change")]
        if a.output is not None:
            floor_om = run.floor.output if run.floor is not None and a is not run.floor else None
            parts += ["<h3>Output</h3>", f"<pre>{html.escape(format_output(a.output, floor_om))}</pre>"]
        sections.append("\n".join(parts))
    plant = f", planted fault {html.escape(run.plant)} (layer:expert:projection)" if run.plant else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moetrace report: {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1250px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f2f2f2; }} td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }} pre {{ background: #f7f7f7; padding: 0.6em; overflow-x: auto; }}
</style></head><body>
<h1>moetrace report: {html.escape(run_dir.name)}</h1>
<p>Model {html.escape(run.model)}{plant}; reference {html.escape(run.reference)};
variants {html.escape(", ".join(run.variants))}. Free-running figures unless said otherwise;
intervals are {int(n_resamples)}-resample bootstraps over tokens (seed {seed}).</p>
<h2>Headline figures</h2>
{_headline_html(run)}
<h2>Divergence per layer</h2>
{_img("divergence.png", "divergence curves")}
{_img("kl_histogram.png", "KL histogram") if (out / "kl_histogram.png") in files else ""}
{_img("routing_flips.png", "routing flip rates") if (out / "routing_flips.png") in files else ""}
{_pairs_html(pairs)}
{"".join(sections)}
</body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
    files.append(out / "index.html")
    return Report(out, files, run, pairs)
