"""The library calls behind the command line: run a trace, diff two stores, format tables."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.hooks.sites import ALL_SITES
from moetrace.tracer.analysis import compare as compare
from moetrace.tracer.sources.prompts import DEMO_TEXT, read_prompts, tokenize
from moetrace.tracer.store import location as store_loc
from moetrace.tracer.store.zarr_store import open_trace
from moetrace.tracer.variants import Variant


def default_run_name(model_id: str) -> str:
    name = model_id.split("/")[-1] if not model_id.startswith("builtin:") else model_id[len("builtin:"):]
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name) or "run"


@dataclass
class RunResult:
    run_dir: Path | str  # a local folder, or the run's URL
    reference: str
    stores: dict
    diffs: dict  # variant name -> diff Dataset (the first recorded mode: free where recorded)
    builtin_id: str | None = None  # the model id when the model is a built-in synthetic one
    modes: tuple = ("free",)  # the modes the variants recorded
    model: str = "builtin:"  # the --model the run was given
    plant: str | None = None
    gguf: str | None = None

    def summary_json(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "reference": self.reference,
            "stores": {k: str(v) for k, v in self.stores.items()},
            "diffs": {k: compare.diff_to_dict(d) for k, d in self.diffs.items()},
            "next": self.next_commands(),
        }

    def next_commands(self) -> list[str]:
        """The commands that read this run next, for the modes it recorded, on its first variant:
        decompose (free and teacher), routing (routing or free), report, and audit --run (quantized weights)."""
        import shlex

        ref = Variant.parse(self.reference).name
        names = [n for n in self.stores if n != ref]
        if not names:
            return []
        q = lambda x: shlex.quote(str(x))  # noqa: E731
        first, out = names[0], []
        ref_store, var_store = q(self.stores[ref]), q(self.stores[first])
        if "free" in self.modes and "teacher" in self.modes:
            out.append(f"moetrace decompose {ref_store} {var_store}")
        if "routing" in self.modes or "free" in self.modes:
            mode = "routing" if "routing" in self.modes else "free"
            out.append(f"moetrace routing {ref_store} {var_store}" + (" --mode routing" if mode == "routing" else ""))
        out.append(f"moetrace report {q(self.run_dir)}")
        quantized = [Variant.parse(n) for n in names if Variant.parse(n).weights != "orig"]
        if quantized and isinstance(self.run_dir, Path):  # the audit reads the run's folder
            v = quantized[0]
            args = [f"--variant {q(v.name)}", f"--model {q(self.model)}"]
            args += [f"--plant {q(self.plant)}"] if self.plant else []
            args += [f"--gguf {q(self.gguf)}"] if v.weights == "gguf" else []
            out.append(f"moetrace audit {' '.join(args)} --run {q(self.run_dir)}")
        return out

    def summary_text(self) -> str:
        parts = [format_diff(d) for d in self.diffs.values()]
        if self.builtin_id:  # a synthetic model's figures must not read as a real model's quality
            parts.append(f"({self.builtin_id} is a synthetic model calibrated to a trained LM's next-token entropy "
                         f"and top-1 margins; its figures show the method, not a real model's quality)")
        parts.append(f"Traces in {self.run_dir}/ (open with moetrace.open_traces('{self.run_dir}') "
                     f"or xarray.open_zarr on one store).")
        nxt = self.next_commands()
        if nxt:
            parts.append("Next:\n" + "\n".join(f"  {c}" for c in nxt))
        return "\n\n".join(parts)


def _reusable_reference(path, source, token_ids: np.ndarray, sites: list[str]) -> bool:
    from moetrace.tracer.execution.executor import store_sizes
    from moetrace.tracer.store.schema import stored_sites

    if not store_loc.exists(path):
        return False
    try:
        ds = open_trace(path)
    except MoetraceError:
        return False
    # Compared with the sites a store of this model holds (no router sites without MoE layers, ...).
    wanted = stored_sites(sites, store_sizes(source))
    return (ds.attrs.get("model_hash") == source.model_hash and np.array_equal(ds["token_id"].values, token_ids)
            and set(wanted) <= set(ds.attrs.get("sites", [])))


def run(model="builtin:", variants=(), reference="orig-fp32", modes=("free",), text=None, prompts_file=None,
        max_tokens=None, plant=None, sites=None, out_dir="traces", run_name=None, seed=0, progress=None,
        log=None, gguf=None, resume=False, tokens_file=None, truncate=False, device="cpu") -> RunResult:
    """Trace ``variants`` of ``model`` against ``reference`` and diff them; see ``moetrace run --help``.

    ``gguf`` is the GGUF file of the ``gguf-*`` variants, or several ``--gguf`` values
    (``FILE`` or ``NAME=FILE``, see :func:`parse_gguf_options`); ``resume`` continues the stores a stopped
    run with the same options left incomplete in the run folder; ``tokens_file`` gives token ids
    instead of text; ``truncate`` cuts sequences longer than the model's positions (else refused);
    ``device`` is where the layers compute (``cpu``, ``cuda``, ``cuda:N``).
    """
    from moetrace.tracer.sources.checkpoint import open_source

    log = log or (lambda msg: None)
    if not variants:
        raise MoetraceError("give at least one --variant (see `moetrace variants`)")
    if sum(x is not None for x in (text, prompts_file, tokens_file)) > 1:
        raise MoetraceError("give one of --text, --prompts and --tokens, not several")
    if run_name is not None:
        check_run_name(run_name)
    if text is not None and not text.strip():
        raise MoetraceError("--text is empty; give text with at least one token")
    from moetrace.tracer.execution.executor import RunConfig, run_trace

    sites = list(sites) if sites else list(ALL_SITES)
    plain, named = parse_gguf_options(gguf)
    config = RunConfig(model=model, variants=list(variants), reference=reference, modes=list(modes), sites=sites,
                       seed=seed, plant=plant, gguf=plain, ggufs=named, device=device)
    from moetrace.tracer.execution.device import resolve

    resolve(device)  # a device this machine lacks is refused before the model loads
    log(f"Opening model {model} ...")
    # A built-in model generated on this call reports each tensor written ("generate" events).
    gen = (lambda done, total, name: progress("generate", done=done, total=total, name=name)) if progress else None
    source = open_source(model, plant=plant, progress=gen)
    tokens, n_seqs = _run_tokens(source, config, text, prompts_file, tokens_file, max_tokens, truncate)
    # A local folder (a Path, as before) or a URL such as s3://bucket/traces (a str).
    run_dir = store_loc.join(out_dir, run_name or default_run_name(source.model_id))
    ref_name = config.reference
    ref_store = Variant.parse(ref_name).store_name
    reuse = _reusable_reference(store_loc.join(run_dir, f"{ref_store}.zarr"), source, tokens.ids, sites)
    log(f"Tracing {source.model_id}: {source.num_layers} layers, {tokens.n} tokens in {n_seqs} sequence(s); "
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
    ref_ds = open_trace(store_loc.join(run_dir, f"{ref_store}.zarr"))
    diffs = {}
    for v in config.variants:
        v = Variant.parse(v).name  # the stores are keyed by canonical name
        if v == Variant.parse(ref_name).name:
            continue
        # The summary compares the first mode recorded: free where it was, else teacher or routing alone.
        diffs[v] = compare.diff(ref_ds, open_trace(stores[v]), config.modes[0])
    return RunResult(run_dir, ref_name, stores, diffs,
                     builtin_id=f"builtin:{source.builtin.preset}" if getattr(source, "builtin", None) else None,
                     modes=tuple(config.modes), model=model, plant=plant, gguf=config.gguf)


def parse_gguf_options(values) -> tuple[str | None, dict[str, str]]:
    """``--gguf`` values: ``FILE`` (the ``gguf-*`` variants' file) or ``NAME=FILE`` (``gguf_NAME-*``), repeatable.

    A value is NAME=FILE when the text before its first ``=`` is a valid name (lower-case letters,
    digits, ``_``) and the whole value is not itself an existing file.

    Returns:
        (the plain file or None, NAME -> file), every file resolved and checked to exist.
    """
    from moetrace.tracer.variants import GGUF_NAME

    if values is None:
        return None, {}
    plain, named = None, {}
    for value in [values] if isinstance(values, (str, Path)) else list(values):
        value = str(value)
        name, eq, file = value.partition("=")
        if not (eq and GGUF_NAME.fullmatch(name) and not Path(value).is_file()):
            name, file = None, value
        if not Path(file).is_file():
            raise MoetraceError(f"GGUF file {file!r} given with --gguf {value} does not exist")
        if name is None:
            if plain is not None:
                raise MoetraceError(f"--gguf is given two unnamed files ({plain!r} and {file!r}); name them: "
                                    f"--gguf NAME=FILE, with --variant gguf_NAME-bf16")
            plain = str(Path(file).resolve())
        elif name in named:
            raise MoetraceError(f"--gguf names {name!r} twice; give each file its own name")
        else:
            named[name] = str(Path(file).resolve())
    return plain, named


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")


def check_run_name(name: str) -> str:
    """A run name is a plain folder name: it can never point outside ``--out``."""
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise MoetraceError(
            f"invalid run name {name!r}; use letters, digits and _ . = + - (starting with a letter or digit), "
            f"no path separators: stores always go to OUT/RUN/"
        )
    return name


def _run_tokens(source, config, text, prompts_file, tokens_file, max_tokens, truncate):
    """The run's tokens, checked against the model's positions and this machine's memory.

    Returns:
        (tokens, number of sequences).
    """
    from moetrace.hooks import arch
    from moetrace.tracer.execution import limits
    from moetrace.tracer.sources.prompts import read_token_ids, tokens_from_ids

    if max_tokens is not None and max_tokens < 1:
        raise MoetraceError(f"--max-tokens {max_tokens} must be at least 1")
    cfg = source.config
    if tokens_file is not None:
        tokens = tokens_from_ids(read_token_ids(tokens_file), int(cfg.vocab_size), source.tokenizer, max_tokens)
    else:
        texts = read_prompts(prompts_file) if prompts_file else [text if text is not None else DEMO_TEXT]
        tokens = tokenize(texts, source.tokenizer, max_tokens)
    tokens = limits.check_positions(tokens, getattr(cfg, "max_position_embeddings", None), truncate)
    n_seqs = len(set(tokens.seq.tolist()))
    longest = int(tokens.pos.max()) + 1
    streams = 1 + len(config.variants) * len([m for m in config.modes if m != "teacher"]) + 1
    family = arch.family_of(cfg)
    dims = family.dims(cfg)
    widest = max(dims["ffn_width"], dims["shared_width"], dims["expert_width"] * family.top_k(cfg))
    need = limits.estimate_bytes(tokens.n, longest, int(cfg.hidden_size), int(cfg.vocab_size), streams, widest)
    limits.check_memory(need, limits.available_memory(), tokens.n)
    return tokens, n_seqs


def diff_stores(reference, variant, mode="free", score_positions=None):
    """Open two stores and return :func:`moetrace.tracer.analysis.compare.diff` of them."""
    from moetrace.tracer.analysis.common import open_pair

    return compare.diff(*open_pair(reference, variant), mode, score_positions)


def format_diff(d) -> str:
    """A human table of a diff Dataset: :func:`moetrace.tracer.analysis.compare.format_diff`."""
    return compare.format_diff(d)
