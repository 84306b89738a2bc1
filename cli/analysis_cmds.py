"""Analysis commands (decompose, routing diff, report): registered on the main `moetrace` group.

A thin layer: each command opens stores, calls one library function and prints its table
(or ``--json``). Heavy imports stay inside the command bodies so ``moetrace --help`` is fast.
"""

from __future__ import annotations

import json

import click

from moetrace.cli.main import friendly_errors, main

MODES = click.Choice(["free", "teacher", "routing"])
# The options every per-pair analysis command takes.
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
FLOOR = click.option("--floor/--no-floor", default=True, show_default=True,
                     help="Show multiples of the noise floor (orig-bf16 beside VARIANT, against an orig-fp32 "
                          "reference).")


class ColumnsHelp(click.Command):
    """A command whose --help ends with its table's columns, read from the Column specs (one text for both).

    ``columns`` is ``"module:NAME"``; the module is imported only when this command's help is shown, so
    ``moetrace --help`` stays fast.
    """

    def __init__(self, *args, columns: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.columns = columns

    def format_help_text(self, ctx, formatter):
        import importlib

        super().format_help_text(ctx, formatter)
        module, name = self.columns.split(":")
        cols = [c for c in getattr(importlib.import_module(module), name) if c.description]
        with formatter.section("Columns"):
            formatter.write_dl([(c.header, c.description) for c in cols])


def _echo(as_json: bool, to_dict, to_text, *args) -> None:
    """Print ``to_dict(*args)`` as JSON or ``to_text(*args)``: one analysis, two outputs."""
    click.echo(json.dumps(to_dict(*args), indent=2) if as_json else to_text(*args))


@main.command(cls=ColumnsHelp, columns="moetrace.tracer.analysis.decompose:COLUMNS")
@click.argument("reference", type=click.Path())
@click.argument("variant", type=click.Path())
@JSON
@FLOOR
@friendly_errors
def decompose(reference, variant, as_json, floor):
    """Where VARIANT's error grows: local error, propagated error and gain per layer.

    Errors are relative L2 errors of the residual stream against REFERENCE, token means. The
    columns are listed below; "amplified" is clipped at 0 (a layer that damps the error it
    receives amplifies nothing). Needs a VARIANT store with free and teacher modes
    (`moetrace run --mode free --mode teacher`).
    """
    from moetrace.tracer.analysis.common import open_pair
    from moetrace.tracer.analysis.decompose import decompose as run_decompose
    from moetrace.tracer.analysis.decompose import decomposition_to_dict, format_decomposition
    from moetrace.tracer.analysis.summary import open_floor

    ref, var = open_pair(reference, variant)
    dec = run_decompose(ref, var)
    fl_ds = open_floor(ref, variant, "teacher") if floor else None
    fl = run_decompose(ref, fl_ds) if fl_ds is not None else None
    _echo(as_json, decomposition_to_dict, format_decomposition, dec, fl)


@main.command()
@click.argument("reference", type=click.Path())
@click.argument("variant", type=click.Path())
@click.option("--mode", default="free", show_default=True, type=MODES, help="The variant's mode to compare.")
@click.option("--expert", "expert", default=None, metavar="L:E",
              help="List the tokens the reference or the variant routes to expert E at layer L (with both routing "
                   "weights and the variant's error there) instead of the routing diff.")
@JSON
@FLOOR
@friendly_errors
def routing(reference, variant, mode, expert, as_json, floor):
    """Routing diff of VARIANT's trace store against REFERENCE's.

    Per layer: top-k overlap, top-1 flip rate, set-flip rate (any chosen expert changed), routing
    mass moved (total variation between the softmax distributions over all experts), and in free
    mode with a teacher mode recorded, which set flips the layer makes itself (own) and which
    come from upstream drift. Then the set-flip rate by the reference's k/(k+1) logit margin, the
    experts that gained and lost the most tokens, the first flipped layer per token and how many
    layers flipped per token.
    """
    from moetrace.tracer.analysis.common import open_pair
    from moetrace.tracer.analysis.routing import format_routing, routing_diff, routing_to_dict
    from moetrace.tracer.analysis.summary import open_floor

    ref, var = open_pair(reference, variant)
    if expert is not None:
        from moetrace.tracer.analysis.expert_view import parse_expert, tokens_of_expert

        t = tokens_of_expert(ref, var, *parse_expert(expert), mode=mode)
        _echo(as_json, lambda t: {"tokens": t.records()}, lambda t: t.to_text(), t)
        return
    rd = routing_diff(ref, var, mode)
    fl_ds = open_floor(ref, variant, mode) if floor else None
    fl = routing_diff(ref, fl_ds, mode) if fl_ds is not None else None
    _echo(as_json, routing_to_dict, format_routing, rd, fl)


@main.command()
@click.argument("run_dir", metavar="RUN", type=click.Path())
@click.option("--out", "out_dir", default=None, type=click.Path(), help="Report folder (default: RUN/report).")
@click.option("--reference", default=None, help="The reference variant (default: the one the stores name).")
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(1),
              help="Bootstrap resamples for the confidence intervals.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the bootstrap.")
@click.option("--json", "as_json", is_flag=True, help="Print the headline figures as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--score-positions", default="all", show_default=True, metavar="all|second-half:N",
              help="Score the output figures (KL, top-1 agreement) only on these positions; second-half:N is "
                   "llama-perplexity's --kl-divergence with -c N (see moetrace diff --help).")
@friendly_errors
def report(run_dir, out_dir, reference, resamples, seed, as_json, quiet, score_positions):
    """Write a report folder for the run folder RUN: PNG plots and an index.html with every table.

    Plots: divergence curves of all variants, local/propagated error and gain per variant,
    routing flip rates per layer and by margin, expert-load heat maps, a KL histogram. Prints
    the headline figures (95% bootstrap intervals; multiples of the noise floor when the run has
    an orig-bf16 store) and where each variant's error grows.
    """
    from moetrace.tracer.analysis.summary import format_headlines, headlines_to_dict
    from moetrace.tracer.analysis.decompose import decomposition_to_dict, summary_lines
    from moetrace.tracer.render.report import pair_lines, write_report

    log = (lambda msg: None) if (quiet or as_json) else (lambda msg: click.echo(msg, err=True))
    rep = write_report(run_dir, out_dir, reference, resamples, seed, log=log, score_positions=score_positions)
    if as_json:
        out = headlines_to_dict(rep.run)
        out["decomposition"] = {n: decomposition_to_dict(a.decomposition)
                                for n, a in rep.run.variants.items() if a.decomposition is not None}
        out["dequant_pairs"] = rep.pairs
        out["report"] = str(rep.index)
        click.echo(json.dumps(out, indent=2))
        return
    lines = [format_headlines(rep.run)]
    for name, a in rep.run.variants.items():
        if a.decomposition is not None:
            lines.append(f"{name}:\n" + "\n".join(f"  {s}" for s in summary_lines(a.decomposition)))
    lines += pair_lines(rep.pairs)
    lines.append(f"Report: {rep.index} ({sum(1 for f in rep.files if f.suffix == '.png')} plots)")
    click.echo("\n".join(lines))
