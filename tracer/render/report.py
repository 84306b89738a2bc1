"""``moetrace report``: a folder with PNG plots and an index.html holding every table of a run.

The page opens with a table of contents giving each section's one-line verdict. It has, in order:
the headline figures of every variant (with bootstrap intervals and as
multiples of the noise floor), the divergence curves, the KL histogram, the routing flip rates,
the BF16-vs-FP32 dequantization comparisons where the run has both, and per variant the
decomposition (local, propagated, gain, with its growth summary), the routing diff with its
expert-load heat map, the output metrics, the per-expert and component views (teacher mode: which expert
matrix is worst by its own error, which component carries each layer's local error), and the blame
ranking where ``moetrace blame`` was run on the variant (``RUN/blame-VARIANT.json``). The HTML is self-contained apart from the PNGs
beside it, so the folder can be copied or zipped as it is.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from moetrace.errors import MoetraceError
from moetrace.tracer.analysis import stats as stats
from moetrace.tracer.analysis.common import floor_fmt
from moetrace.tracer.analysis.decompose import decomposition_table, summary_lines
from moetrace.tracer.analysis.output import output_table
from moetrace.tracer.analysis.routing import flip_lines, margin_table, movers_table, routing_table
from moetrace.tracer.analysis.summary import (FLOOR_REFERENCE, FLOOR_VARIANT, RunAnalysis, analyze_run, dequant_pairs,
                                              headline_tables, pair_difference)
from moetrace.tracer.render import plots as plots
from moetrace.tracer.render.table import Column, Table


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


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def _headline_html(run: RunAnalysis) -> str:
    main, *rest = headline_tables(run)
    out = main.to_html()
    if run.floor is None:
        out += f"<p>No noise floor: the run has no {FLOOR_VARIANT} store against {FLOOR_REFERENCE}.</p>"
    for t in rest:
        out += f"<h3>{html.escape(t.title.rstrip(':'))}</h3>" + t.to_html()
    return out


def _decomposition_html(a, run) -> str:
    floor = run.floor.decomposition if run.floor is not None and a is not run.floor else None
    summary = "".join(f"<li>{html.escape(s)}</li>" for s in summary_lines(a.decomposition))
    return f"<ul>{summary}</ul>" + decomposition_table(a.decomposition, floor).to_html()


def _routing_html(a, run) -> str:
    rd = a.routing
    floor = run.floor.routing if run.floor is not None and a is not run.floor else None
    out = routing_table(rd, floor).to_html()
    for t in (margin_table(rd), movers_table(rd)):
        out += f"<h4>{html.escape(t.title.rstrip(':').capitalize())}</h4>" + t.to_html(legend=False)
    return out + "".join(f"<p>{html.escape(line)}</p>" for line in flip_lines(rd))


# The columns of a BF16-vs-FP32 dequantization comparison (:func:`pair_difference` rows, flattened).
PAIR_COLUMNS = (
    Column("a", "bf16", str, align="left"), Column("b", "fp32", str, align="left"),
    Column("kl_a", "KL bf16", "{:.3e}", "KL(ref || bf16) mean, nats"),
    Column("kl_b", "KL fp32", "{:.3e}", "KL(ref || fp32) mean, nats"),
    Column("kl_diff", "KL difference", "{:+.3e}", "KL bf16 - KL fp32 (paired over the same tokens)"),
    Column("kl_diff_lo", "low", "{:+.2e}"), Column("kl_diff_hi", "high", "{:+.2e}"),
    Column("kl_direct", "KL(fp32||bf16)", "{:.3e}", "the direct divergence of bf16 from fp32, mean"),
    Column("kl_direct_lo", "low", "{:.2e}"), Column("kl_direct_hi", "high", "{:.2e}"),
    Column("kl_floor", "floor KL", "{:.3e}", "KL(ref || orig-bf16) mean: the noise floor"),
    Column("diff_x_floor", "|difference| x floor", floor_fmt("{:.2f}x"), "|KL difference| / floor KL"),
    Column("direct_x_floor", "direct x floor", floor_fmt("{:.2f}x"), "KL(fp32||bf16) / floor KL"),
)


def pair_table(pairs) -> Table:
    """The dequantization pairs of a run (:func:`pair_difference` results), with 95% intervals."""
    t = Table(list(PAIR_COLUMNS), title="BF16 vs FP32 dequantization of the same weights (95% intervals):")
    for p in pairs:
        lo_hi = {f"{k}_{end}": p[f"{k}_ci"][i] for k in ("kl_diff", "kl_direct") for i, end in enumerate(("lo", "hi"))}
        t.add({**p, **lo_hi})
    if not any("kl_floor" in p for p in pairs):
        t.columns = [c for c in t.columns if c.key not in ("kl_floor", "diff_x_floor", "direct_x_floor")]
    return t


def _pairs_html(pairs) -> str:
    if not pairs:
        return ""
    return ("<h2>BF16 vs FP32 dequantization</h2><p>The same quantized weights dequantized to BF16 and to FP32: "
            "the difference of their KL against the reference (paired bootstrap), their direct divergence "
            "KL(fp32 || bf16), and both against the noise floor's KL.</p>" + pair_table(pairs).to_html())


def pair_lines(pairs) -> list[str]:
    """The dequantization pairs for the command line: their table, or nothing without pairs."""
    return [pair_table(pairs).to_text()] if pairs else []


def _section(sid: str, title: str, verdict: str, body: str, level: int = 2) -> dict:
    return {"id": sid, "title": title, "verdict": verdict, "level": level,
            "html": f'<h{level} id="{html.escape(sid)}">{html.escape(title)}</h{level}>'
                    f'<p class="verdict">{html.escape(verdict)}</p>{body}'}


def _toc(sections: list[dict]) -> str:
    items = "".join(f'<li class="l{s["level"]}"><a href="#{html.escape(s["id"])}">{html.escape(s["title"])}</a>: '
                    f'{html.escape(s["verdict"])}</li>' for s in sections)
    return f'<h2>Contents</h2><ul class="toc">{items}</ul>'


def _headline_verdict(run: RunAnalysis) -> str:
    kls = {n: float(a.output["kl_mean"]) for n, a in run.variants.items() if a.output is not None}
    if not kls:
        return "no output logits recorded"
    worst = max(kls, key=kls.get)
    return f"{len(run.variants)} variant(s) against {run.reference}; the largest output KL is {worst}'s, " \
           f"{kls[worst]:.3e} nats"


def _expert_sections(a, key: str, run, run_dir: Path) -> list[dict]:
    """The per-expert view, the component view and the blame ranking of one variant (its store ``key``
    in the run; ``a.name`` also names a mode other than free), where recorded."""
    import json

    from moetrace.tracer.analysis import expert_view as EV

    var, ref = run.datasets[key], run.datasets[run.reference]
    out = []
    if "expert_error" in var:
        rows = EV.expert_rows(var)
        if rows:
            w = rows[0]
            verdict = (f"worst expert matrix: layer {w['layer']} expert {w['expert']}, its error "
                       f"{w['x_median']:.1f}x its layer's median on {w['tokens']} tokens "
                       f"(`moetrace routing ... --expert {w['layer']}:{w['expert']}` lists them)")
            out.append(_section(f"{a.name}-experts", f"{a.name}: per-expert error", verdict,
                                EV.expert_table(var).to_html(), 3))
    if a.decomposition is not None:
        comp = EV.component_table(ref, var)
        worst = max(comp.rows, key=lambda r: r["local"])
        verdict = f"the largest local error is layer {worst['layer']}'s ({worst['local']:.3e}), most of it from its " \
                  f"{worst['largest']}"
        out.append(_section(f"{a.name}-components", f"{a.name}: components of the local error", verdict,
                            comp.to_html(), 3))
    saved = run_dir / f"blame-{key}.json"
    if saved.is_file():
        from moetrace.tracer.analysis import blame as B  # torch, for a run that has a blame only

        d = json.loads(saved.read_text())
        body = "".join(f"<h4>{html.escape(level)}</h4>" + _records_table(d[level]) for level in B.LEVELS if d.get(level))
        body += "".join(f"<p>{html.escape(x)}</p>" for x in d.get("cross_check", []))
        if d.get("budget") and d["budget"].get("llama_quantize"):
            body += f"<pre>llama-quantize {html.escape(d['budget']['llama_quantize'])}</pre>"
        out.append(_section(f"{a.name}-blame", f"{a.name}: blame", d["verdict"], body, 3))
    return out


def _records_table(records: list[dict]) -> str:
    from moetrace.tracer.analysis.blame import COLUMNS

    keys = {"part", "kl_recovered", "ci_low", "ci_high", "share", "of_layer", "tokens", "bytes", "added_bytes",
            "stopped_at"}
    cols = [c for c in COLUMNS if c.key in keys]
    t = Table([Column(c.key, c.header, c.fmt, c.description, align=c.align) for c in cols])
    for r in records:
        t.add(r)
    return t.to_html()


def write_report(run_dir, out_dir=None, reference: str | None = None, n_resamples: int = stats.N_RESAMPLES,
                 seed: int = 0, log=None, score_positions: str | None = None) -> Report:
    """Analyse a run folder and write the report folder (default ``RUN/report``).

    Args:
        run_dir: a run folder of trace stores (``traces/RUN``).
        out_dir: where to write; created if missing.
        reference: the reference variant (default: the one the stores name).
        n_resamples, seed: the bootstrap's resamples and seed.
        score_positions: the positions the output figures are scored on (moetrace.tracer.analysis.positions).
        log: optional callable for progress lines.

    Returns:
        The :class:`Report`.
    """
    from moetrace.tracer.store.zarr_store import list_stores

    log = log or (lambda msg: None)
    run_dir = Path(run_dir)
    list_stores(run_dir)  # a missing or empty run folder fails here, before anything is written
    log(f"Analysing {run_dir} ...")
    run = analyze_run(run_dir, reference, n_resamples, seed, score_positions)
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
    toc = [{"id": "headline", "title": "Headline figures", "verdict": _headline_verdict(run), "level": 2},
           {"id": "divergence", "title": "Divergence per layer", "verdict": "the residual stream's error, layer by "
            "layer, every variant (plots)", "level": 2}]
    for key, a in run.variants.items():
        verdict = summary_lines(a.decomposition)[0] if a.decomposition is not None else \
            "no teacher mode: where the error is injected is not separated from where it is inherited"
        toc.append({"id": a.name, "title": a.name, "verdict": verdict, "level": 2})
        extra = _expert_sections(a, key, run, run_dir)
        toc += extra
        parts = [f'<h2 id="{html.escape(a.name)}">{html.escape(a.name)}</h2>',
                 f'<p class="verdict">{html.escape(verdict)}</p>']
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
            t = output_table(a.output, floor_om)
            parts += ["<h3>Output</h3>", f"<p>{html.escape(t.title.rstrip(':'))}.</p>", t.to_html()]
        parts += [s["html"] for s in extra]
        sections.append("\n".join(parts))
    plant = f", planted fault {html.escape(run.plant)} (layer:expert:projection)" if run.plant else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moetrace report: {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1250px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f2f2f2; }} td:first-child {{ text-align: left; }}
ul.legend {{ font-size: 12px; color: #555; margin-top: -0.8em; }}
p.verdict {{ font-weight: bold; }} ul.toc li.l3 {{ margin-left: 1.5em; }}
img {{ max-width: 100%; }} pre {{ background: #f7f7f7; padding: 0.6em; overflow-x: auto; }}
</style></head><body>
<h1>moetrace report: {html.escape(run_dir.name)}</h1>
<p>Model {html.escape(run.model)}{plant}; reference {html.escape(run.reference)};
variants {html.escape(", ".join(run.variants))}. Free-running figures unless said otherwise;
intervals are {int(n_resamples)}-resample bootstraps over tokens (seed {seed}).</p>
{_toc(toc)}
<h2 id="headline">Headline figures</h2>
<p class="verdict">{html.escape(toc[0]["verdict"])}</p>
{_headline_html(run)}
<h2 id="divergence">Divergence per layer</h2>
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
