"""The ``moetrace`` command: a thin click layer over the library.

Heavy imports (torch, transformers, zarr) happen inside the commands, so ``moetrace --help``
answers at once. Errors a user can cause print as one line and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import click


def friendly_errors(fn):
    """Turn moetrace's user errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from moetrace.errors import MoetraceError

        try:
            return fn(*args, **kwargs)
        except MoetraceError as e:
            click.echo(f"moetrace: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("moetrace: interrupted; stores being written are left marked incomplete", err=True)
            sys.exit(130)
        except OSError as e:  # a file the user named, or the disk, refused: their problem to fix, said in one line
            where = f" {e.filename!r}" if e.filename else ""
            click.echo(f"moetrace: error: cannot access{where}: {e.strerror or e}", err=True)
            sys.exit(2)
        except Exception as e:  # a bug in moetrace: one line, and the traceback on request
            from moetrace.settings import switch

            if switch("MOETRACE_DEBUG", False):
                raise
            click.echo(f"moetrace: internal error: {type(e).__name__}: {e} (a bug in moetrace; "
                       f"MOETRACE_DEBUG=1 shows the traceback)", err=True)
            sys.exit(1)

    return wrapper


class _OneLineErrors(click.Group):
    """The command group, with click's own usage errors printed as one line (exit status 2), like moetrace's."""

    def main(self, args=None, prog_name=None, **extra):
        from moetrace.errors import MoetraceError

        extra.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as e:
            cmd = e.ctx.command_path if e.ctx is not None else "moetrace"
            click.echo(f"moetrace: error: {e.format_message()} (see '{cmd} --help')", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"moetrace: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except MoetraceError as e:  # raised outside a command body (the group's own checks)
            click.echo(f"moetrace: error: {e}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("moetrace: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


# One help text for every command that takes --plant.
PLANT_HELP = ("Built-in models: plant a fault in LAYER:EXPERT:PROJ[:GAIN] (gate, up or down): the matrix's block "
              "scales are lost when quantized. GAIN: the planted expert's output over an ordinary one's, default 1. "
              "At gain 1 the fault is often too small to matter at the output; with q6_k-bf16, gain 32 gives one that "
              "blame ranks first (docs/benchmarks.md, 'Planted faults'). Gains above 4 overflow fp16 weights.")


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moetrace")
def main():
    """moetrace: trace numerical error layer by layer through Mixture-of-Experts models.

    Run a reference and numeric variants of a model over the same tokens, record every layer,
    and see where the error comes from and where it grows.

    \b
    Start with:
      moetrace run --variant pure_q8_0-bf16      # default built-in model and text
      moetrace variants                          # every valid variant name
      moetrace models                            # the built-in models
    """
    from moetrace.settings import check_all

    check_all()  # a bad MOETRACE_* value is one line before any work



def _progress_printer(quiet: bool):
    from moetrace.cli.progress import Steps

    steps = Steps("tracing", "layer", "traced", quiet)
    generating = Steps("generating the built-in model", "tensor", "written", quiet)
    state = {"t0": time.perf_counter(), "tl": None}

    def progress(event, **info):
        if event == "generate":
            generating.update(info["done"], info["total"], info["name"])
        elif event == "layer_start":
            state["tl"] = time.perf_counter()
        elif event == "layer_done":
            now = time.perf_counter()
            steps.update(info["layer"] + 1, info["layers"], f"{now - state['tl']:.2f} s, {now - state['t0']:.1f} s total")

    return progress


@main.command()
@click.option("--model", "model", default="builtin:", show_default=True,
              help="builtin:NAME (see `moetrace models`), a transformers checkpoint folder, or a .gguf file.")
@click.option("--variant", "variants", multiple=True, required=True,
              help="A variant WEIGHTS-COMPUTE, e.g. pure_q8_0-bf16; repeat for several (see `moetrace variants`).")
@click.option("--reference", default="orig-fp32", show_default=True, help="The variant every other is compared with.")
@click.option("--mode", "modes", multiple=True, default=("free",), show_default=True,
              type=click.Choice(["free", "teacher", "routing"]),
              help="free: variants on their own outputs; teacher: each layer fed the reference's input; "
                   "routing: the reference's expert choices. Repeat for several.")
@click.option("--text", default=None, help="The text to trace (default: a built-in demo text).")
@click.option("--prompts", "prompts_file", type=click.Path(), default=None,
              help="A file with one prompt per line, or JSONL with a 'text' field.")
@click.option("--tokens", "tokens_file", type=click.Path(), default=None,
              help="Token ids instead of text: a .npy array (1-D, or one sequence per row) or JSONL {\"ids\": [...]}.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Cut each prompt to this many tokens.")
@click.option("--truncate", is_flag=True,
              help="Cut sequences longer than the model's max_position_embeddings instead of refusing them.")
@click.option("--plant", default=None, help=PLANT_HELP)
@click.option("--sites", default=None, help="Comma-separated sites to record (default: all).")
@click.option("--out", "out_dir", default="traces", show_default=True,
              help="Folder or URL of runs (s3://bucket/traces with moetrace[s3]; credentials and endpoint from the "
                   "AWS_* environment variables).")
@click.option("--run", "run_name", default=None, help="Run name: stores go to OUT/RUN/VARIANT.zarr (default: from the model).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed recorded with the run.")
@click.option("--gguf", "gguf", multiple=True,
              help="A GGUF file whose own tensors are the weights of the gguf-* variants (e.g. --variant gguf-bf16); "
                   "its tensor names and shapes must match the reference model's. Repeatable as NAME=FILE for "
                   "several files in one run, each the weights of the gguf_NAME-* variants "
                   "(--gguf a=A.gguf --variant gguf_a-bf16).")
@click.option("--resume", is_flag=True,
              help="Continue a stopped run (same options) from the last layer its stores finished.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda|cuda:N",
              help="Where the layers compute; every compute path runs there (engine arithmetic emulated in torch).")
@friendly_errors
def run(model, variants, reference, modes, text, prompts_file, tokens_file, max_tokens, truncate, plant, sites, out_dir,
        run_name, seed, gguf, resume, as_json, quiet, device):
    """Trace the reference and one or more variants, then print the divergence summary.

    The reference is recorded once per run folder (again only if its model or tokens changed);
    each variant's store is OUT/RUN/VARIANT.zarr, readable with xarray.open_zarr.
    """
    from moetrace.tracer.variants import Variant

    for name in (reference, *variants):  # a bad name is refused before torch and the model load
        Variant.parse(name)
    from moetrace.tracer import api

    result = api.run(
        model=model, variants=list(variants), reference=reference, modes=list(modes), text=text,
        prompts_file=prompts_file, tokens_file=tokens_file, max_tokens=max_tokens, truncate=truncate, plant=plant,
        sites=sites.split(",") if sites else None, out_dir=out_dir, run_name=run_name, seed=seed, gguf=gguf,
        resume=resume, device=device,
        progress=_progress_printer(quiet or as_json),
        log=(lambda msg: None) if (quiet or as_json) else (lambda msg: click.echo(msg, err=True)),
    )
    if as_json:
        click.echo(json.dumps(result.summary_json(), indent=2))
    else:
        click.echo(result.summary_text())


@main.command()
@click.argument("reference", type=click.Path())
@click.argument("variant", type=click.Path())
@click.option("--mode", default="free", show_default=True, type=click.Choice(["free", "teacher", "routing"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--score-positions", default="all", show_default=True, metavar="all|second-half:N",
              help="Score KL and top-1 agreement only on these positions; second-half:N is llama-perplexity's "
                   "--kl-divergence with -c N (positions N/2..N-2 of each chunk of N; give the same tokens as "
                   "sequences of N with run --tokens).")
@friendly_errors
def diff(reference, variant, mode, as_json, score_positions):
    """Per-layer divergence of VARIANT's trace store against REFERENCE's.

    Per layer: relative L2 error and cosine similarity of the residual stream (mean and worst
    tokens), top-k overlap and top-1 flip rate of the routing; at the end KL(ref || variant)
    of the output distribution and top-1 agreement.
    """
    from moetrace.tracer import api

    d = api.diff_stores(reference, variant, mode, score_positions)
    if as_json:
        from moetrace.tracer.analysis.compare import diff_to_dict

        click.echo(json.dumps(diff_to_dict(d), indent=2))
    else:
        click.echo(api.format_diff(d))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def variants(as_json):
    """The variant grammar, the compute paths and every valid variant name."""
    from moetrace.kernels import compute
    from moetrace.tracer import variants as V

    names = V.all_variant_names()
    paths = compute.names()
    if as_json:
        click.echo(json.dumps({
            "grammar": ["WEIGHTS-COMPUTE", "WEIGHTS-DEQw-COMPUTE", "WEIGHTS+PATTERN=TYPE[+PATTERN=TYPE...][-DEQw]-COMPUTE"],
            "weights": V.valid_weights(), "compute": paths, "override_types": [t.lower() for t in V.override_types()],
            "dequant": {c: V.dequant_names(c) for c in paths},
            "paths": {c: {"summary": compute.PATHS[c].summary, "default_dequant": compute.PATHS[c].default_dequant}
                      for c in paths},
            "variants": names}, indent=2))
        return
    click.echo(V.GRAMMAR.strip())
    click.echo("")
    click.echo("Valid weights: " + ", ".join(V.valid_weights()))
    click.echo("Valid override types: " + ", ".join(t.lower() for t in V.override_types()))
    click.echo("Valid compute paths:")
    for c in paths:
        deq = ", ".join(V.dequant_names(c)) or "none (block bytes)"
        click.echo(f"  {c}: {compute.PATHS[c].summary}; DEQw: {deq}")
    click.echo(f"Valid variants ({len(names)}, each also with a DEQw word its path takes):")
    for w in V.valid_weights():
        click.echo("  " + "  ".join(f"{w}-{c}" for c in paths))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json):
    """The built-in synthetic models (nothing is downloaded; generated on first use and cached), then the model
    families moetrace reads (checkpoint folders and GGUF files) with what has been checked for each."""
    from dataclasses import asdict

    from moetrace.hooks.arch import families
    from moetrace.tracer.sources.builtin import DEFAULT_PRESET, PRESETS, cache_root

    fams = {f.name: {"model_types": list(f.model_types), "gguf_arch": f.gguf_arch, "gguf_experts": f.gguf_experts,
                     "checked": list(f.checked)} for f in families()}
    if as_json:
        click.echo(json.dumps({**{f"builtin:{k}": asdict(v) for k, v in PRESETS.items()}, "families": fams},
                              indent=2))
        return
    for name, s in PRESETS.items():
        mark = " (default, builtin:)" if name == DEFAULT_PRESET else ""
        click.echo(f"builtin:{name}{mark}")
        click.echo(f"    {s.description}")
        click.echo(f"    layers {s.layers}, hidden {s.hidden}, experts {s.experts} top-{s.top_k}, "
                   f"expert width {s.expert_width}, heads {s.heads}/{s.kv_heads} of {s.head_dim}, vocab {s.vocab}, "
                   f"family {s.family}")
    click.echo(f"\nOverrides: builtin:NAME:layers=N,seed=S.  Cache: {cache_root()}")
    click.echo("\nFamilies (checkpoint folders and GGUF files):")
    for name, f in fams.items():
        gguf = f["gguf_arch"] + {"any": "", "moe": " with experts", "dense": " without experts"}[f["gguf_experts"]]
        click.echo(f"{name}: model type {'/'.join(f['model_types'])}, GGUF {gguf}")
        for c in f["checked"]:
            click.echo(f"    checked: {c}")


@main.command()
@click.option("--prune", "prune_to", default=None, metavar="SIZE",
              help="Delete least recently used quantized weights until the cache holds at most SIZE (e.g. 20G).")
@click.option("--clear", is_flag=True, help="Delete every quantized weight (built-in models are kept).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def cache(prune_to, clear, as_json):
    """Show, prune or clear the cache: built-in models and quantized weights.

    Quantized block bytes are kept so a second run, audit or quantize of the same model and
    file type only dequantizes. MOETRACE_QCACHE_MAX=SIZE trims them automatically whenever a
    command opens the cache; MOETRACE_QCACHE=0 turns the cache off; MOETRACE_CACHE moves it.
    """
    from moetrace.errors import MoetraceError
    from moetrace.tracer.sources.builtin import cache_root
    from moetrace.tracer.weights.qcache import QuantCache, parse_size

    if prune_to is not None and clear:
        raise MoetraceError("--prune and --clear exclude each other")
    qc = QuantCache()
    deleted = freed = 0
    if clear:
        deleted, freed = qc.prune(0)
    elif prune_to is not None:
        deleted, freed = qc.prune(parse_size(prune_to))
    entries = qc.entries()
    models_dir = cache_root() / "builtin"
    model_bytes = sum(p.stat().st_size for p in models_dir.rglob("*") if p.is_file()) if models_dir.is_dir() else 0
    info = {"root": str(cache_root()), "quant_entries": len(entries), "quant_bytes": sum(e[1] for e in entries),
            "builtin_bytes": model_bytes, "deleted_entries": deleted, "freed_bytes": freed}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    gib = 1 << 30
    if deleted:
        click.echo(f"Deleted {deleted} quantized weight(s), {freed / gib:.2f} GiB.")
    click.echo(f"Cache {info['root']}: quantized weights {len(entries)} entries, {info['quant_bytes'] / gib:.2f} GiB; "
               f"built-in models {model_bytes / gib:.2f} GiB")


# Commands defined in their own modules register themselves on `main` when imported; each
# keeps its heavy imports inside the command bodies so `moetrace --help` stays fast.
from moetrace.cli import analysis_cmds, weights_cmds  # noqa: E402,F401
from moetrace.cli import blame_cmds  # noqa: E402,F401

if __name__ == "__main__":
    main()
