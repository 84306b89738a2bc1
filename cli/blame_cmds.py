"""The blame command: registered on the main `moetrace` group (a thin layer over tracer/analysis/blame_run.py)."""

from __future__ import annotations

import json

import click

from moetrace.cli.main import friendly_errors, main


@main.command(name="blame")
@click.argument("run_dir", metavar="RUN", type=click.Path())
@click.argument("variant")
@click.option("--to", "to", default="ref", show_default=True, metavar="ref|TYPE",
              help="Restore parts to the reference's weights (ref: stored at the checkpoint's dtype, e.g. bf16) or "
                   "to a stated higher GGML type (q8_0, q6_k, ...).")
@click.option("--level", default="expert", show_default=True, type=click.Choice(["layer", "kind", "expert"]),
              help="The finest level searched: layers, then tensor kinds, then expert matrices.")
@click.option("--layers", default=1, show_default=True, type=click.IntRange(1),
              help="How many of the best layers are searched at the tensor-kind level.")
@click.option("--budget", default=None, metavar="SIZE",
              help="Propose the tensor overrides that recover the most output KL within SIZE added bytes "
                   "(50MB, 50MiB, 1.5GB), check them with a real run, print llama-quantize's arguments.")
@click.option("--audit/--no-audit", default=False, show_default=True,
              help="Also audit the variant's weights and say which flagged matrices matter and which are harmless.")
@click.option("--threshold", default=0.98, show_default=True, type=float, help="The audit's cosine threshold.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1), help="Rows shown per level.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@friendly_errors
def blame(run_dir, variant, to, level, layers, budget, audit, threshold, top, as_json, quiet):
    """Which part of VARIANT causes its output error: restore parts of it, one at a time, and measure.

    RUN is a run folder holding the reference's and VARIANT's stores (free mode). Each part
    (a layer; a tensor kind of the best layers; an expert matrix of the best expert tensor) is
    restored alone, to the reference's weights or --to TYPE, and the KL(ref || variant) of the
    output it removes is measured: the variant's recorded input to the part's layer runs through
    that layer and the layers below only, and a branch that recovers far less than the best at the
    same layer is stopped early. Printed per part: the KL recovered (95% bootstrap interval over
    tokens), its share of the whole KL and of its layer's, and its size in bytes at the higher type.
    The result is saved as RUN/blame-VARIANT.json, which `moetrace report` shows.

    A GGUF file's variant (gguf-bf16, traced with --gguf FILE) is blamed in the file's own tensors:
    restored parts come from the model, the rest stays as the file holds it. Its parts are ranked
    under dense compute paths; --budget and --audit are for file types, whose weights moetrace
    derives.
    """
    from moetrace.cli.progress import Steps
    from moetrace.tracer.analysis import blame as B
    from moetrace.tracer.analysis.blame_run import budget_lines, run_blame, to_dict

    bars = {}

    def progress(lvl, L, n):
        if lvl not in bars:
            bars[lvl] = Steps(f"blame, {lvl} level", "layer", "run", quiet or as_json)
        bars[lvl].update(L + 1, n)

    out = run_blame(run_dir, variant, to=to, layers=layers, level=level, budget=budget, audit=audit,
                    threshold=threshold, progress=progress)
    for b in bars.values():
        b.close()
    if as_json:
        click.echo(json.dumps(to_dict(out), indent=2))
        return
    extra = (["Audit cross-check:"] + [f"  {x}" for x in out["cross_check"]] if out["cross_check"] else [])
    click.echo(B.format_blame(out["result"], top, extra + budget_lines(out["budget"])))
    click.echo(f"\nSaved {out['saved']}")


@main.command(name="experts")
@click.argument("reference", type=click.Path())
@click.argument("variant", type=click.Path())
@click.option("--top", default=10, show_default=True, type=click.IntRange(1), help="Expert rows shown.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def experts(reference, variant, top, as_json):
    """Per-expert and per-component error of VARIANT's store in teacher mode.

    The worst expert matrices: each routed expert's output on the tokens routed to it, with the
    variant's weights against the reference's on the same input (relative L2), how far above its
    layer's median expert that is, the tokens and routing weight it carries. Then per layer, the
    local (teacher-forced) error and what its attention, MoE block, routed experts' weights, shared
    expert and dense MLP each add. Needs a store traced with --mode teacher.
    """
    from moetrace.tracer.analysis.common import open_pair
    from moetrace.tracer.analysis.expert_view import component_table, expert_table

    ref, var = open_pair(reference, variant)
    tables = [expert_table(var, top), component_table(ref, var)]
    if as_json:
        click.echo(json.dumps({"experts": tables[0].records(), "components": tables[1].records()}, indent=2))
        return
    click.echo("\n\n".join(t.to_text() for t in tables))
