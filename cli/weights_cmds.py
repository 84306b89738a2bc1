"""Weight commands (recipe, quantize, audit): registered on the main `moetrace` group.

A thin layer: each command parses its options and calls moetrace.tracer.weights.derive, gguf_writer or
audit. Heavy imports stay inside the command bodies so `moetrace --help` answers at once.
"""

from __future__ import annotations

import json
import time

import click

from moetrace.cli.main import PLANT_HELP, friendly_errors, main

_MODEL_HELP = "builtin:NAME (see `moetrace models`), a transformers checkpoint folder or a GGUF file."
TENSOR_TYPE = click.option(
    "--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
    help="Give the tensors whose GGUF name PATTERN (a regular expression, searched) finds this GGML type instead of "
         "the file type's rule, as llama-quantize's --tensor-type: e.g. blk.9.ffn_down_exps=q8_0. Repeatable; the "
         "first match wins. The same as a variant's +PATTERN=TYPE (see `moetrace variants`).")


def _default_name(model_id: str) -> str:
    from moetrace.tracer.api import default_run_name

    return default_run_name(model_id)


@main.command()
@click.argument("file_type")
@click.option("--model", "model", default="builtin:", show_default=True, help=_MODEL_HELP)
@click.option("--with-imatrix", "with_imatrix", is_flag=True,
              help="Type tensors as llama-quantize does when given an importance matrix (changes Q4_0/Q5_0 ffn_down).")
@click.option("--summary", is_flag=True, help="Only the per-type and total lines, not one line per tensor.")
@TENSOR_TYPE
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def recipe(file_type, model, with_imatrix, summary, tensor_types, as_json):
    """The GGML type llama.cpp's FILE_TYPE gives each tensor of a model, with sizes.

    FILE_TYPE is a llama.cpp file type in lower case (q4_k_m, q8_0, q3_k_s, ...) or pure_TYPE,
    optionally with overrides (q4_k_m+blk.9.ffn_down_exps=q8_0, or --tensor-type).
    Per tensor: GGUF name, shape, type, bytes and bits per weight, and where an override took
    it, the pattern and the type the file type's own rule gives; then totals per type and for
    the model (tensor data only, as llama-quantize reports it). Built-in models are described
    from their preset: nothing is generated.
    """
    from moetrace.tracer.variants import canonical_overrides, split_weights
    from moetrace.tracer.weights import derive as W

    file_type, in_name = split_weights(file_type)
    overrides = canonical_overrides(in_name + tuple(tensor_types))
    source = W.config_source(model)
    s = W.recipe_summary(source, file_type, has_imatrix=with_imatrix, overrides=overrides)
    by_type = {}
    for t in s.tensors:
        b = by_type.setdefault(t.type_name, {"tensors": 0, "n_elements": 0, "n_bytes": 0})
        b["tensors"] += 1
        b["n_elements"] += t.n_elements
        b["n_bytes"] += t.n_bytes
    by_type = dict(sorted(by_type.items(), key=lambda kv: -kv[1]["n_bytes"]))
    if as_json:
        click.echo(json.dumps({
            "model": source.model_id, "file_type": s.file_type,
            "overrides": [{"pattern": p, "type": t} for p, t in overrides],
            "tensors": [] if summary else [
                {"name": t.name, "shape": list(t.shape), "type": t.type_name, "n_elements": t.n_elements,
                 "n_bytes": t.n_bytes, "bits_per_weight": 8.0 * t.n_bytes / t.n_elements,
                 "override": t.override, "recipe_type": t.recipe_type} for t in s.tensors],
            "by_type": {k: {**v, "bits_per_weight": 8.0 * v["n_bytes"] / v["n_elements"]} for k, v in by_type.items()},
            "total_bytes": s.total_bytes, "total_elements": s.total_elements, "bits_per_weight": s.bits_per_weight,
        }, indent=2))
        return
    from moetrace.tracer.variants import overrides_text

    click.echo(f"{s.file_type}{overrides_text(overrides)} on {source.model_id}")
    if not summary:
        click.echo(f"{'tensor':34} {'shape':>18} {'type':>5} {'bytes':>14} {'bpw':>6}")
        for t in s.tensors:
            note = f"  override {t.override} (recipe: {t.recipe_type})" if t.override else ""
            click.echo(f"{t.name:34} {'x'.join(map(str, t.shape)):>18} {t.type_name:>5} {t.n_bytes:>14,} "
                       f"{8.0 * t.n_bytes / t.n_elements:6.3f}{note}")
    for k, v in by_type.items():
        click.echo(f"  {k:>5}: {v['tensors']:>5} tensors {v['n_elements']:>15,} weights {v['n_bytes']:>16,} bytes "
                   f"{8.0 * v['n_bytes'] / v['n_elements']:6.3f} bpw")
    click.echo(f"total: {len(s.tensors)} tensors, {s.total_elements:,} weights, {s.total_bytes:,} bytes "
               f"({s.total_bytes / 2**30:.3f} GiB), {s.bits_per_weight:.3f} bits per weight")
    for p, t in overrides:
        took = [x for x in s.tensors if x.override == p]
        changed = sum(x.type_name != x.recipe_type for x in took)
        click.echo(f"override {p}={t.lower()}: {len(took)} tensors, {changed} of them changed from the recipe's type")


@main.command()
@click.argument("file_type")
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="The .gguf file to write.")
@click.option("--model", "model", default="builtin:", show_default=True, help=_MODEL_HELP)
@click.option("--imatrix", "imatrix_file", type=click.Path(), default=None,
              help="llama.cpp importance-matrix file (GGUF or legacy .dat) to quantize with.")
@click.option("--plant", default=None, help=PLANT_HELP)
@click.option("--no-cache", is_flag=True, help="Quantize every tensor, ignoring the quantized-weight cache.")
@TENSOR_TYPE
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@friendly_errors
def quantize(file_type, output, model, imatrix_file, plant, no_cache, tensor_types, as_json, quiet):
    """Write a GGUF file of the model quantized to FILE_TYPE, as llama-quantize would.

    llama.cpp's tensor names, shapes and per-tensor types (see `moetrace recipe`), block bytes
    bit-exact with ggml, and the GGUF metadata of the model's family (qwen3moe, ...). Tensors are
    quantized one at a time (experts a few at a time) and streamed to the file; quantized bytes
    are kept in the cache, so quantizing what a run or audit already quantized only copies them.
    --tensor-type PATTERN=TYPE (or FILE_TYPE+PATTERN=TYPE) overrides the type of the matching
    tensors, as llama-quantize's --tensor-type does; the file's general.file_type stays FILE_TYPE's.
    """
    from moetrace.kernels import recipes
    from moetrace.cli.progress import Steps
    from moetrace.outputs import writable_file
    from moetrace.tracer.variants import canonical_overrides, split_weights
    from moetrace.tracer.weights.gguf_writer import write_gguf
    from moetrace.tracer.sources.checkpoint import open_source

    file_type, in_name = split_weights(file_type)
    overrides = canonical_overrides(in_name + tuple(tensor_types))  # bad patterns fail before the model opens
    recipes.parse_file_type(file_type)  # an unknown file type fails before the model is opened
    writable_file(output, "the GGUF file (-o)")
    say = (lambda msg: None) if (quiet or as_json) else (lambda msg: click.echo(msg, err=True))
    say(f"Opening model {model} ...")
    source = open_source(model, plant=plant)
    t0 = time.perf_counter()
    steps = Steps("quantizing", "tensor", "written", quiet or as_json)

    def progress(done, total, name):
        steps.update(done, total, name)

    r = write_gguf(source, file_type, output, imatrix_file=imatrix_file, cache=not no_cache, progress=progress,
                   overrides=overrides)
    dt = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps({
            "path": str(r.path), "model": source.model_id, "file_type": r.file_type,
            "overrides": [{"pattern": p, "type": t} for p, t in overrides], "tensors": len(r.types),
            "tensor_bytes": r.tensor_bytes, "file_bytes": r.file_bytes, "bits_per_weight": r.bits_per_weight,
            "quantized": r.quantized, "from_cache": r.from_cache, "seconds": dt, "types": r.types,
        }, indent=2))
        return
    click.echo(f"Wrote {r.path}: {source.model_id} as {r.file_type}, {len(r.types)} tensors, {r.file_bytes:,} bytes, "
               f"{r.bits_per_weight:.3f} bits per weight; {r.quantized} tensors quantized, {r.from_cache} from the "
               f"cache, {dt:.1f} s")


@main.command()
@click.option("--variant", "variant", required=True,
              help="A file type (q4_k_m, q8_0, pure_q4_k, ...), optionally with a compute dtype (q4_k_m-bf16) "
                   "to round the dequantized weights to it; or gguf (gguf-bf16, ...) with --gguf FILE.")
@click.option("--model", "model", default="builtin:", show_default=True, help=_MODEL_HELP)
@click.option("--gguf", "gguf_file", type=click.Path(), default=None,
              help="A GGUF file of the model (any quantizer's or engine's): audit its tensors (--variant gguf).")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=0.98, show_default=True,
              help="Flag matrices whose cosine similarity to the reference is below this.")
@click.option("--plant", default=None, help=PLANT_HELP)
@click.option("--imatrix", "imatrix_file", type=click.Path(), default=None,
              help="llama.cpp importance-matrix file to quantize with.")
@click.option("--out", "out", type=click.Path(), default=None,
              help="The Zarr store for the full table (default traces/audit/MODEL-VARIANT.zarr).")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="How many of the worst matrices to show.")
@click.option("--no-cache", is_flag=True, help="Quantize every tensor, ignoring the quantized-weight cache.")
@click.option("--run", "run_dir", type=click.Path(), default=None,
              help="A run folder (traces/RUN) of the same model: rank the expert matrices by impact = relative error x "
                   "their expert's share of the routing mass in the run's reference store, with tokens routed.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@friendly_errors
def audit(variant, model, gguf_file, threshold, plant, imatrix_file, out, top, no_cache, run_dir, as_json, quiet):
    """Compare every weight matrix with what a file type dequantizes it to; worst first.

    With --gguf FILE --variant gguf, the comparison is with the tensors of that GGUF file
    (dequantized), whatever wrote it: the check the original cosine-0.78 hunt did by hand.

    Per matrix, and for the MoE experts per expert and projection: cosine similarity, relative
    error, SQNR (dB) and max abs error against the reference. Streams one layer at a time;
    matrices below --threshold are flagged. The full table goes to a Zarr store (dims layer,
    expert, proj, plus a `tensor` table for the other matrices); the screen shows the worst.

    With --run RUN, the expert matrices are ranked by expected output impact instead: relative
    error x the expert's share of its layer's routing mass (the sum of the routing weights of
    the tokens routed to it, from RUN's reference store, over the layer's total). A broken expert
    no token reaches scores 0. The table shows tokens routed, the share and the impact; the
    store holds them too (tokens, routing_mass, mass_share, impact).
    """
    from pathlib import Path

    from moetrace.cli.progress import Steps
    from moetrace.tracer.weights import audit as A
    from moetrace.tracer.sources.checkpoint import open_source

    ftype, compute = A.parse_weights(variant)  # bad names fail before the model is opened
    if (ftype == "gguf") != (gguf_file is not None):
        from moetrace.errors import MoetraceError

        raise MoetraceError("--variant gguf audits the tensors of a GGUF file; give --gguf FILE" if gguf_file is None
                            else f"--gguf {gguf_file} is given but --variant is {variant}; use --variant gguf")
    say = (lambda msg: None) if (quiet or as_json) else (lambda msg: click.echo(msg, err=True))
    say(f"Opening model {model} ...")
    source = open_source(model, plant=plant)
    t0 = time.perf_counter()
    steps = Steps("auditing", "layer", "audited", quiet or as_json)

    def progress(done, total):
        steps.update(done, total, f"{time.perf_counter() - t0:.1f} s")

    ref_ds = None
    if run_dir is not None:  # a missing or foreign run fails before the audit's work
        from moetrace.tracer.analysis.summary import load_run

        from moetrace.tracer.weights.weighted import check_same_model

        ref_ds, _ = load_run(run_dir)
        check_same_model(getattr(source, "model_hash", None), source.model_id, ref_ds, run_dir)
    ds = A.audit(source, variant, threshold=threshold, imatrix_file=imatrix_file, cache=not no_cache,
                 progress=progress, gguf=gguf_file)
    name = A.audit_name(variant)
    path = Path(out) if out else Path("traces") / "audit" / f"{_default_name(source.model_id)}-{name}.zarr"
    if ref_ds is not None:
        from moetrace.tracer.weights import weighted as WA

        ds = WA.weight_audit(ds, ref_ds, run_dir)
        A.save_audit(ds, path)
        click.echo(json.dumps(WA.weighted_json(ds, path, top=top), indent=2) if as_json
                   else WA.format_weighted(ds, path, top=top))
        return
    A.save_audit(ds, path)
    if as_json:
        click.echo(json.dumps(A.summary_json(ds, path, top=top), indent=2))
    else:
        click.echo(A.format_audit(ds, path, top=top))
