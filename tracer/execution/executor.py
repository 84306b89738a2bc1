"""The layer-lockstep executor: the reference and every variant, one decoder layer at a time.

For layer L it reads the layer's reference weights once, derives each variant's weights from
them, runs every hidden-state stream through its copy of the transformers decoder layer,
records the sites, writes them, and frees the layer before going on. Memory is therefore about
one layer's weights per variant plus the activations, whatever the depth of the model.

Modes, all in the same pass:

- ``free``: each variant runs on its own outputs, so error accumulates (what users see);
- ``teacher``: each variant's layer L is fed the reference's input to layer L; its error there is
  what layer L injects by itself;
- ``routing``: the variant runs on its own outputs but with the reference's expert choices,
  which separates "wrong experts chosen" from "right experts, noisy weights".

A ``gguf-*`` variant takes its weights from the GGUF file of ``RunConfig.gguf`` (the file's own
quantized tensors, dequantized), checked against the reference's names and shapes before any
store is written. A stopped run continues with ``resume=True`` from the last layer all its
stores finished (moetrace.tracer.execution.resume); a store write that fails (a full disk) stops the run
with a message saying the stores are left incomplete.

The decoder layers are transformers' own modules, so the reference's output equals the
transformers forward of the same model (tests/tracer/test_executor.py checks it bit for bit).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from moetrace.errors import MoetraceError
from moetrace.hooks import arch
from moetrace.hooks.sites import ALL_SITES, LAYER_SITES, capture, layer_kind_sites
from moetrace.tracer.execution.nonfinite import Findings
from moetrace.tracer.store import location as store_loc
from moetrace.tracer.store.zarr_store import Tokens, TraceWriter
from moetrace.tracer.variants import REFERENCE, Variant
from moetrace.tracer.weights.derive import (LayerState, layer_roles, takes_blocks, tensor_types, variant_global,
                                            variant_layer_state)

MODES = ("free", "teacher", "routing")


@dataclass
class RunConfig:
    """A run's checked configuration, saved in every store's ``config`` attribute."""

    model: str
    variants: list[str]
    reference: str = REFERENCE
    modes: list[str] = field(default_factory=lambda: ["free"])
    sites: list[str] = field(default_factory=lambda: list(ALL_SITES))
    seed: int = 0
    plant: str | None = None
    gguf: str | None = None  # the GGUF file of the gguf-* variants
    ggufs: dict = field(default_factory=dict)  # NAME -> GGUF file of the gguf_NAME-* variants
    device: str = "cpu"  # where layers compute: cpu, cuda, cuda:N (moetrace.tracer.execution.device)


    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise MoetraceError(f"unknown mode {bad[0] if bad else '(none)'!r}; valid modes: {', '.join(MODES)}")
        bad = [s for s in self.sites if s not in ALL_SITES]
        if bad:
            raise MoetraceError(f"unknown site {bad[0]!r}; valid sites: {', '.join(ALL_SITES)}")
        self.modes = [m for m in MODES if m in self.modes]  # canonical order
        from moetrace.tracer.execution.device import check_name

        check_name(self.device)
        parsed = [Variant.parse(v) for v in [self.reference, *self.variants]]
        uses_gguf = [v.name for v in parsed if v.gguf_name == ""]
        for v in parsed:
            if v.gguf_name and v.gguf_name not in self.ggufs:
                raise MoetraceError(f"variant {v.name} takes its weights from the GGUF file named {v.gguf_name!r}; "
                                    f"give --gguf {v.gguf_name}=FILE")
        unused = sorted(set(self.ggufs) - {v.gguf_name for v in parsed})
        if unused:
            raise MoetraceError(f"--gguf {unused[0]}={self.ggufs[unused[0]]} is given but no variant uses it; add "
                                f"--variant gguf_{unused[0]}-bf16 (or another compute)")
        if uses_gguf and not self.gguf:
            raise MoetraceError(f"variant {uses_gguf[0]} takes its weights from a GGUF file; give --gguf FILE")
        if self.gguf and not uses_gguf:
            raise MoetraceError(
                f"--gguf {self.gguf} is given but no variant uses it; add a gguf variant, e.g. --variant gguf-bf16"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(**d)


def _check_supported(config, source, family) -> None:
    """Refuse, by name, the layer kinds the executor cannot run faithfully: a dense layer in a family
    that does not say what a dense layer holds."""
    dense = family.dense_layers(config)
    if dense and not family.dense_tensors:
        raise MoetraceError(
            f"{source.model_id}: layers {dense} have a dense MLP ({family.keys.dense_layers}/"
            f"{family.keys.sparse_step}), which family {family.name} does not describe (no dense_tensors)"
        )


class _Model:
    """The transformers module classes and shared pieces (config, rotary, masks) of one model."""

    def __init__(self, source):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(source.config)
        # The skeleton resolves the attention and expert implementations exactly as
        # from_pretrained would; its config and modules are the templates of every layer.
        self.config = skeleton.config
        self.skeleton = skeleton
        self.family = arch.family_of(self.config)
        _check_supported(self.config, source, self.family)
        self.adapter = self.family  # module paths of the sites and how the router speaks
        rotary_cls = type(skeleton.model.rotary_emb)
        self.rotary = rotary_cls(config=self.config)  # real buffers, on the CPU
        self._free: dict[tuple, list[torch.nn.Module]] = {}
        self._templates: dict[int, tuple] = {}
        self.device = torch.device("cpu")  # set per run (to_device); fresh layers allocate their tensors there

    def to_device(self, device: torch.device) -> None:
        """Compute on ``device`` from now on: the rotary buffers move, and pooled layers of another device go."""
        if device != self.device:
            self.rotary.to(device)
            self._free.clear()
            self.device = device

    def layer(self, index: int, state: dict, path) -> torch.nn.Module:
        """Decoder layer ``index`` prepared by compute ``path``, holding the weights of ``state``.

        Args:
            index: the layer index.
            state: the layer's weights in the form ``path`` asked for (name inside the layer ->
                tensor or block weight).
            path: a ``moetrace.kernels.compute.ComputePath``, or a torch dtype for the simple
                path computing in it (``torch.bfloat16``: ``bf16``).

        A module handed back with :meth:`release` is reused for the next layer of the same
        structure and path (``path.pool_key``): its per-layer attributes (``layer_idx``, ...)
        are set from that layer's skeleton and the path loads ``state`` into its existing
        tensors. Deep-copying a fresh module costs more than a small model's layer forward, and
        fresh tensors for every layer cost a page-faulted, kernel-zeroed allocation of the whole
        layer.
        """
        path = _as_path(path)
        skel = self.skeleton.model.layers[index]
        if index not in self._templates:
            # Per skeleton layer, computed once: its structure key, and the public attributes of
            # each of its modules (layer_idx, ...), which a reused module takes over.
            attrs = [{k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
                     for _, m in skel.named_modules()]
            self._templates[index] = (self._structure(skel), attrs)
        structure, attrs = self._templates[index]
        key = (structure, path.pool_key)
        pool = self._free.get(key)
        if pool:
            layer = pool.pop()
            for mod, values in zip(layer._moetrace_modules, attrs):
                mod.__dict__.update(values)  # plain attributes only: tensors and submodules live elsewhere
        else:
            layer = copy.deepcopy(skel).eval()
            layer._moetrace_modules = [m for _, m in layer.named_modules()]
            layer._moetrace_key = key
            layer._moetrace_tensors = None  # not allocated: the path's load allocates them
            layer._moetrace_device = self.device
            path.prepare(layer)
        try:
            path.load(layer, state)
        except KeyError as e:
            raise KeyError(f"layer {index}: {e.args[0]}") from None
        return layer

    # The module skeletons of recently traced models, so a process that traces the same model
    # again (the library, a benchmark) does not rebuild them, as it would not reload a model
    # it already holds. Small: meta tensors only once a run has ended (see drop_tensors).
    _recent: dict = {}

    @classmethod
    def for_source(cls, source) -> "_Model":
        key = (getattr(source, "model_hash", None), json.dumps(source.config.to_dict(), sort_keys=True, default=str))
        model = cls._recent.get(key)
        if model is None:
            model = cls(source)
            cls._recent.clear()  # one model at a time
            cls._recent[key] = model
        return model

    def drop_tensors(self) -> None:
        """Free the reused layers' tensors (at the end of a run); the modules stay for the next one."""
        for layers in self._free.values():
            for layer in layers:
                layer.to_empty(device="meta")  # new (meta) Parameter objects: the cached ones are stale
                layer._moetrace_tensors = None

    def release(self, layer: torch.nn.Module) -> None:
        """Hand a layer back; its tensors are kept for the next layer of the same structure and path."""
        self._free.setdefault(layer._moetrace_key, []).append(layer)

    @staticmethod
    def _structure(layer: torch.nn.Module) -> tuple:
        return tuple((name, type(m).__name__) for name, m in layer.named_modules()) + tuple(
            (name, tuple(p.shape)) for name, p in layer.named_parameters()
        )

    def norm(self, weight: torch.Tensor) -> torch.nn.Module:
        norm = copy.deepcopy(self.skeleton.model.norm)
        norm.load_state_dict({"weight": weight}, strict=True, assign=True)
        return norm.eval()

    @cached_property
    def layer_types(self) -> list[str]:
        """Each decoder layer's attention kind (``full_attention``, ``sliding_attention``), as the model's forward
        picks its mask: from ``config.layer_types`` where the config has them (Qwen2-MoE, Qwen3: a
        ``sliding_window`` there applies only to the layers marked sliding), else one kind for every layer,
        sliding where ``config.sliding_window`` is set (Mixtral)."""
        n = int(self.config.num_hidden_layers)
        types = getattr(self.config, "layer_types", None)
        if types:
            types = list(types)[:n]
        else:
            kind = "full_attention" if getattr(self.config, "sliding_window", None) is None else "sliding_attention"
            types = [kind] * n
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise MoetraceError(f"model config layer_types has {unknown[0]!r}; supported: full_attention, "
                                f"sliding_attention")
        return types

    def context(self, hidden: torch.Tensor, positions: torch.Tensor):
        """(attention kind -> causal mask, position embeddings) for one sequence (1, T, H), as the model's
        forward makes them; a layer takes the mask of its kind (:attr:`layer_types`)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = positions.unsqueeze(0)  # (1, T)
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        masks = {kind: makers[kind](config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                    position_ids=position_ids)
                 for kind in sorted(set(self.layer_types))}
        return masks, self.rotary(hidden, position_ids=position_ids)


def store_sizes(source) -> dict:
    """The sizes a trace store of ``source`` takes (see moetrace.tracer.store.schema): layers, hidden,
    expert, k, vocab, the MoE and dense layer indices, and whether the family has a shared expert."""
    cfg = source.config
    fam = arch.family_of(cfg)
    return {
        "layers": source.num_layers, "hidden": cfg.hidden_size, "expert": fam.n_experts(cfg),
        "k": fam.top_k(cfg), "vocab": cfg.vocab_size, "moe_layers": fam.moe_layers(cfg),
        "dense_layers": fam.dense_layers(cfg), "shared": fam.sites.shared is not None,
    }


def _cat(records: list[dict]) -> dict:
    if len(records) == 1:  # one sequence: no copy
        return records[0]
    return {k: torch.cat([r[k] for r in records], dim=0) for k in records[0]}


def _as_path(path):
    """A compute path object; a torch dtype stands for the simple path computing in it."""
    if isinstance(path, torch.dtype):
        from moetrace.kernels import compute

        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return compute.get(names[path])
    return path


class _VariantWeights:
    """Where one variant's weights come from: derived from the reference's, or a GGUF file's own (``gguf``).

    Both come in the form the variant's compute path asks for (see moetrace.kernels.compute).
    """

    def __init__(self, source, variant: Variant, gguf_src=None):
        from moetrace.kernels.compute import role_of

        self.variant = variant
        self.family = arch.family_of(source.config)
        path = variant.path
        self.gguf = gguf_src.get(variant.gguf_name) if variant.gguf_name is not None else None
        if self.gguf is not None:
            self.types = self.gguf.ggml_types()
            names = self.gguf.family.global_names
            dense = {hf: self._gguf_global(hf, names[hf]) for hf in names if self.gguf.has(hf)}
        else:
            self.types = tensor_types(source, variant)
            dense = variant_global(source, variant, self.types)
        names = self.family.global_names  # HF name -> GGUF name
        self.globals = {hf: path.global_weight(role_of(names[hf]), w) for hf, w in dense.items()}

    def _gguf_global(self, hf: str, g: str):
        """A global tensor of the GGUF file: its block bytes where the path takes them, else dense."""
        if takes_blocks(self.variant.path, self.family, hf, g, self.types):
            return self.gguf.blocks(g)
        return self.gguf.tensor(hf)

    def layer(self, L: int, ref_state, gguf_state) -> dict:
        """Layer L's weights in the path's form, not yet rounded (``ref_state``/``gguf_state``: callables, read once).

        The compute path's ``load`` rounds and casts them while copying into the module's tensors.
        """
        if self.gguf is not None:
            names = self.family.gguf_layer_names(L, self.gguf.config)
            path = self.variant.path
            blocks = {key: g for key, g in names.items() if takes_blocks(path, self.family, key, g, self.types)}
            out = LayerState(gguf_state() if not blocks else self.gguf.layer_state(L, only=set(names) - set(blocks)))
            for key, g in blocks.items():  # a fused tensor: its parts' blocks, in its GGUF tensors' order
                out[key] = tuple(self.gguf.blocks(n) for n in g) if isinstance(g, tuple) else self.gguf.blocks(g)
            out.roles = layer_roles(L, self.family)
            out.fp32 = frozenset(self.family.fp32_tensors) & set(out)
            return out
        # Dequantized chunk by chunk into the module's tensors where the path's load can (no float32 layer copy).
        return variant_layer_state(ref_state(), L, self.variant, self.types, cast=False,
                                   defer=self.variant.path.fills_deferred())


class _LayerLoader:
    """Every variant's weights of one layer at a time, optionally one layer ahead.

    Without prefetching, a variant's weights are derived when the executor asks for them, and
    the reference layer is read from the checkpoint once per layer. With prefetching, a
    background thread reads and derives all of layer L+1 while layer L runs, so reading,
    converting and quantizing overlap the forward passes (torch ops release the GIL); memory
    then holds two layers' weights of every variant.
    """

    # Share of the available memory two prefetched layers may take.
    MEMORY_SHARE = 0.25

    def __init__(self, source, gguf_src, weights: dict, variants: list[Variant], n_layers: int,
                 layer_numel: int, prefetch: bool | None):
        self.source, self.gguf_src, self.weights, self.variants = source, gguf_src, weights, variants
        self.n_layers, self.layer_numel = n_layers, layer_numel
        self.prefetch = prefetch
        self._pool = None
        self._ahead: tuple[int, object] | None = None

    def _lazy(self, L: int) -> "_LayerStates":
        return _LayerStates(L, self.source, self.gguf_src, self.weights)

    def _eager(self, L: int) -> dict:
        lazy = self._lazy(L)
        with torch.inference_mode():
            states = {v.name: lazy.pop(v.name) for v in self.variants}
            for state in states.values():  # dequantized here, in the prefetch thread, not in the forward's
                for k, w in state.items():
                    if hasattr(w, "dense"):
                        state[k] = w.dense()
            return states

    def _decide(self) -> bool:
        # The loader's torch ops need a core of their own: where torch's compute threads already
        # take every core, prefetching slowed a run down (measured: 2 cores, 2 threads, 1.19x).
        if (os.cpu_count() or 1) <= torch.get_num_threads():
            return False
        avail = _available_memory()
        if avail is None:
            return False
        need = 2 * self.layer_numel * sum(torch.empty(0, dtype=v.dtype).element_size() for v in self.variants)
        return need <= self.MEMORY_SHARE * avail

    def get(self, L: int):
        """Layer L's states: a mapping whose ``pop(variant name)`` gives that variant's weights."""
        if self.prefetch is None:
            self.prefetch = self._decide()
        if not self.prefetch:
            return self._lazy(L)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetrace-prefetch")
        if self._ahead is not None and self._ahead[0] == L:
            states = self._ahead[1].result()
        else:
            states = self._eager(L)
        self._ahead = (L + 1, self._pool.submit(self._eager, L + 1)) if L + 1 < self.n_layers else None
        return states

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _LayerStates:
    """One layer's weights for each variant, derived on demand; the checkpoint layer is read once."""

    def __init__(self, L: int, source, gguf_src, weights: dict):
        self.L, self.source, self.gguf_src, self.weights = L, source, gguf_src, weights
        self._cache: dict[str, dict] = {}

    def _ref_state(self):
        if "ref" not in self._cache:
            self._cache["ref"] = self.source.layer_state(self.L)
        return self._cache["ref"]

    def _gguf_state(self, key: str):
        # One read per GGUF file and layer, shared by every variant of that file.
        if ("gguf", key) not in self._cache:
            self._cache[("gguf", key)] = self.gguf_src[key].layer_state(self.L)
        return self._cache[("gguf", key)]

    def pop(self, name: str) -> dict[str, torch.Tensor]:
        key = self.weights[name].variant.gguf_name
        return self.weights[name].layer(self.L, self._ref_state, lambda: self._gguf_state(key))


def _available_memory() -> int | None:
    """MemAvailable in bytes (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _WriteFailed(Exception):
    def __init__(self, path, err: OSError):
        super().__init__(str(err))
        self.path, self.err = path, err


class _Guarded:
    """A store writer whose OS errors (a full disk, a lost mount) surface as :class:`_WriteFailed`."""

    def __init__(self, writer):
        self.writer = writer

    def __getattr__(self, name):
        attr = getattr(self.writer, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except OSError as e:
                raise _WriteFailed(self.writer.path, e) from e

        return call


def _open_writers(run_dir: Path, ref: Variant, variants: list[Variant], config: RunConfig, tokens: Tokens,
                  sizes: dict, base_attrs: dict, write_reference: bool, resume: bool, model_hash: str):
    """Create (or, resuming, reopen) the stores of a run.

    Returns:
        (writers, start, done): writers by variant name for the stores still to write, the
        first layer to compute, and the names of stores already complete (left alone).
    """
    from moetrace.tracer.execution import resume as R

    def new(v: Variant, modes):
        table = {"expert_table": "teacher" in modes and bool(sizes["moe_layers"])}  # the per-expert table
        return TraceWriter(store_loc.join(run_dir, f"{v.store_name}.zarr"), {**sizes, **table}, tokens, modes,
                           config.sites, {**base_attrs, "variant": v.name, "modes": list(modes)})

    wanted = ([ref] if write_reference else []) + variants
    if not resume:
        return {v.name: new(v, ["free"] if v is ref else config.modes) for v in wanted}, 0, []
    writers, done, starts = {}, [], []
    try:
        for v in wanted:
            path = store_loc.join(run_dir, f"{v.store_name}.zarr")
            attrs = R.store_state(path)
            if attrs is None:
                writers[v.name] = new(v, ["free"] if v is ref else config.modes)
                starts.append(0)
                continue
            R.check_resumable(path, attrs, model_hash, config.to_dict(), tokens)
            if attrs.get("complete"):
                done.append(v.name)
                continue
            w = R.ResumedWriter(path)
            writers[v.name] = w
            starts.append(w.layers_done if "resid" in config.sites else 0)
    except BaseException:
        for w in writers.values():
            w.release()
        raise
    return writers, min(starts, default=sizes["layers"]), done


def run_trace(source, config: RunConfig, tokens: Tokens, run_dir, progress=None, write_reference: bool = True,
              resume: bool = False, prefetch: bool | None = None):
    """Trace the reference and the variants of ``config`` over ``tokens`` into ``run_dir``.

    The steps: prepare the output folder, plan the run, open the stores, embed the tokens,
    run every layer (:func:`_run_layer`), the output head (:func:`_write_logits`), finish.

    Args:
        source: a model source (moetrace.tracer.sources.checkpoint).
        config: the run configuration.
        tokens: the tokens, flattened over sequences.
        run_dir: the run folder; stores are ``run_dir/VARIANT.zarr``.
        progress: optional callable ``progress(event: str, **info)``.
        write_reference: False to run the reference without storing it (its store exists).
        resume: continue the stores a stopped run left incomplete, from the last layer every one
            of them finished (see moetrace.tracer.execution.resume); stores already complete are left alone.
        prefetch: read and derive layer L+1's weights in a background thread while layer L
            runs; None (the default) does so when a core is left over from torch's compute
            threads and two layers' weights of every variant fit in a quarter of the available
            memory (see :class:`_LayerLoader`).

    Returns:
        dict variant name -> store path, for every store of the run (the reference's too when
        it was reused rather than written).

    Raises:
        MoetraceError: bad input, a GGUF file that does not match the reference, or a write
            that failed (the stores are then left marked incomplete, and the message says so).
    """
    from moetrace.tracer.execution.device import resolve

    device = resolve(config.device)  # before any store is touched
    run_dir = _prepare_output(run_dir)
    run = _plan(source, config, tokens, progress)
    run.model.to_device(device)
    all_paths = {v.name: store_loc.join(run_dir, f"{v.store_name}.zarr") for v in [run.ref] + run.variants}
    writers, start, done = _open_writers(run_dir, run.ref, run.variants, config, tokens, run.sizes, run.base_attrs,
                                         write_reference, resume, source.model_hash)
    run.variants = [v for v in run.variants if v.name not in done]  # complete stores need no work
    if resume:
        run.emit("resume", layer=start, layers=run.n_layers, complete=done)
    run.writers = {name: _Guarded(w) for name, w in writers.items()}
    stack = contextlib.ExitStack()
    try:
        _embed(run, start, all_paths)
        loader = _open_loader(run, stack, prefetch)
        with torch.inference_mode():
            for L in range(start, run.n_layers):
                _run_layer(run, L, loader)
            run.layer_now = run.n_layers
            _write_logits(run)
        loader.close()
        for name, w in run.writers.items():
            w.finish(run.findings.attrs(name))
    except _WriteFailed as e:
        _release(run.writers)
        where = f"at layer {run.layer_now}" if run.layer_now < run.n_layers else "writing the output logits"
        raise MoetraceError(
            f"writing the trace store {e.path} failed ({e.err.strerror or e.err}; noticed {where}); "
            f"the run stopped and its stores in {run_dir} are left marked incomplete (layers_done says how far "
            f"they got); free space or fix the cause, then continue with the same command and --resume"
        ) from e.err
    except BaseException:
        _release(run.writers)  # the stores stay marked incomplete
        raise
    finally:
        stack.close()
        run.model.drop_tensors()
    return all_paths


def _prepare_output(run_dir):
    """The run's location (a Path for a local folder, a URL string), checked writable.

    Raises:
        MoetraceError: the folder or bucket cannot be written.
    """
    run_dir = store_loc.as_location(run_dir)
    if isinstance(run_dir, Path):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".moetrace-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise MoetraceError(f"cannot write to output folder {str(run_dir)!r}: {e.strerror}") from None
        return run_dir
    fs, root = store_loc.filesystem(run_dir)
    try:
        fs.pipe_file(f"{root}/.moetrace-write-test", b"")
        fs.rm_file(f"{root}/.moetrace-write-test")
    except Exception as e:  # the client's errors differ per service: no credentials, no bucket, denied
        msg = " ".join(str(e).split()) or type(e).__name__
        raise MoetraceError(f"cannot write to output location {run_dir!r}: {msg}") from None
    return run_dir


@dataclass
class _Run:
    """What the steps of one run share: the plan, then the streams and stores as the run goes."""

    source: object
    config: RunConfig
    tokens: Tokens
    model: _Model
    ref: Variant
    variants: list[Variant]
    layer_sites: list[str]
    ref_sites: list[str]
    sizes: dict
    base_attrs: dict
    gguf_src: dict = field(default_factory=dict)  # "" or NAME -> GGUFSource
    progress: object = None
    writers: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)  # variant name -> _VariantWeights
    ref_h: list = field(default_factory=list)  # the reference's hidden states, per sequence (1, T_s, H)
    streams: dict = field(default_factory=dict)  # (variant name, mode) -> per sequence (1, T_s, H)
    ctx: dict = field(default_factory=dict)  # arithmetic dtype -> per sequence (mask, position embeddings)
    layer_now: int = 0
    findings: Findings = field(default_factory=Findings)  # the first non-finite site of each stream
    tables: dict = field(default_factory=dict)  # (variant name, mode) -> this layer's per-expert table
    ref_layer: object = None  # the reference's layer module, kept while the variants' tables need it

    @property
    def n_layers(self) -> int:
        return self.sizes["layers"]

    @property
    def dense_layers(self) -> set:
        return set(self.sizes["dense_layers"])

    def emit(self, event, **info):
        if self.progress:
            self.progress(event, **info)


def _plan(source, config: RunConfig, tokens: Tokens, progress) -> _Run:
    """The model, the parsed variants, the sites each records, the store sizes and attributes;
    a GGUF file is checked against the reference before any store is touched."""
    model = _Model.for_source(source)
    cfg = model.config
    ref = Variant.parse(config.reference)
    variants = [Variant.parse(v) for v in config.variants if Variant.parse(v).name != ref.name]
    layer_sites = [s for s in config.sites if s in LAYER_SITES]
    need_ref_topk = "routing" in config.modes
    ref_sites = sorted(set(layer_sites) | ({"topk_idx"} if need_ref_topk else set()))
    n_layers = source.num_layers
    fam = model.family
    moe_layers = fam.moe_layers(cfg)
    if need_ref_topk and not moe_layers:
        raise MoetraceError(f"{source.model_id} has no mixture-of-experts layer, so mode 'routing' (the reference's "
                            f"expert choices) does not apply; valid modes here: free, teacher")
    sizes = store_sizes(source)
    base_attrs = {"model": source.model_id, "model_hash": source.model_hash, "seed": config.seed,
                  "config": config.to_dict(), "reference": ref.name}
    gguf_src = {}  # "" (plain --gguf FILE) or NAME -> GGUFSource
    files = {**({"": config.gguf} if config.gguf else {}), **config.ggufs}
    if files:
        from moetrace.tracer.sources.gguf import GGUFSource

        for key, file in files.items():
            gguf_src[key] = GGUFSource(file)
            gguf_src[key].check_matches(source)  # before any store is touched
    return _Run(source, config, tokens, model, ref, variants, layer_sites, ref_sites, sizes, base_attrs,
                gguf_src=gguf_src, progress=progress)


def _embed(run: _Run, start: int, all_paths: dict) -> None:
    """Every stream's input to layer ``start``: the embedded tokens, or (resuming) the stored
    output of layer start-1; and the mask and position embeddings of each arithmetic dtype."""
    tokens, modes = run.tokens, run.config.modes
    dev = run.model.device
    seqs = [torch.from_numpy(s).to(dev) for s in tokens.sequences()]
    positions = [torch.from_numpy(tokens.pos[tokens.seq == s]).long().to(dev) for s in sorted(set(tokens.seq.tolist()))]
    run.weights = {v.name: _VariantWeights(run.source, v, run.gguf_src) for v in [run.ref] + run.variants}
    for w in run.weights.values():  # dense globals onto the device (block bytes stay where the path reads them)
        w.globals = {k: g.to(dev) if isinstance(g, torch.Tensor) else g for k, g in w.globals.items()}

    def embed(v: Variant, ids):
        return v.path.embed(run.weights[v.name].globals["model.embed_tokens.weight"], ids)  # (1, T, H)

    run.ref_h = [embed(run.ref, ids) for ids in seqs]  # per sequence (1, T_s, H)
    run.ctx = {run.ref.dtype: [run.model.context(h, p) for h, p in zip(run.ref_h, positions)]}
    for v in run.variants:
        if v.dtype not in run.ctx:
            run.ctx[v.dtype] = [run.model.context(embed(v, ids), p) for ids, p in zip(seqs, positions)]
        for m in modes:
            if m != "teacher":
                run.streams[(v.name, m)] = [embed(v, ids) for ids in seqs]
    if start > 0:  # resuming: every stream's input to layer `start` is its stored output of layer start-1
        from moetrace.tracer.execution.resume import read_streams

        run.ref_h = [h.to(dev) for h in read_streams(all_paths[run.ref.name], "free", start - 1, tokens, run.ref.dtype)]
        for (name, m) in run.streams:
            run.streams[(name, m)] = [h.to(dev) for h in read_streams(all_paths[name], m, start - 1, tokens,
                                                                      Variant.parse(name).dtype)]


def _open_loader(run: _Run, stack: contextlib.ExitStack, prefetch: bool | None) -> "_LayerLoader":
    """The layer-weights loader (closed with ``stack``); the checkpoint stays memory-mapped for the run."""
    if hasattr(run.source, "mapped"):  # one memory map of each checkpoint shard for the whole run
        stack.enter_context(run.source.mapped())
    layer_numel = max(sum(p.numel() for p in layer.parameters()) for layer in run.model.skeleton.model.layers)
    loader = _LayerLoader(run.source, run.gguf_src, run.weights, [run.ref] + run.variants, run.n_layers,
                          layer_numel, prefetch)
    stack.callback(loader.close)
    return loader


def _run_layer(run: _Run, L: int, loader: "_LayerLoader") -> None:
    """Layer L for the reference, then for every variant in every mode; its sites written."""
    run.layer_now = L
    run.emit("layer_start", layer=L, layers=run.n_layers)
    states = loader.get(L)
    ref_in = run.ref_h
    moe = L not in run.dense_layers
    table = moe and "teacher" in run.config.modes  # the per-expert table (tracer/execution/expert_table.py)
    ref_recs = _forward(run, L, run.ref, states.pop(run.ref.name), {"free": ref_in}, run.ref_sites, None, keep=table)
    run.ref_h = ref_recs["free"][1]
    _check_finite(run, run.ref.name, "free", L, *ref_recs["free"])
    if run.ref.name in run.writers:
        run.writers[run.ref.name].write_layer("free", L, _cat(ref_recs["free"][0]))
    ref_topk = [r["topk_idx"] for r in ref_recs["free"][0]] if "routing" in run.config.modes and moe else None
    for v in run.variants:
        inputs = {m: [h.to(v.dtype) for h in ref_in] if m == "teacher" else run.streams[(v.name, m)]
                  for m in run.config.modes}
        recs = _forward(run, L, v, states.pop(v.name), inputs, run.layer_sites, ref_topk,
                        ref_layer=run.ref_layer if table else None)
        for m, (rec, out) in recs.items():
            if m != "teacher":
                run.streams[(v.name, m)] = out
            _check_finite(run, v.name, m, L, rec, out)
            run.writers[v.name].write_layer(m, L, {**_cat(rec), **_table_of(run, v, m, table)})
    if run.ref_layer is not None:
        run.model.release(run.ref_layer)
        run.ref_layer = None
    for w in run.writers.values():
        w.mark_layers_done(L + 1)
    del states  # the layer's weights, freed by reference counting
    if hasattr(run.source, "release_layer"):  # its mapped checkpoint pages too (see CheckpointSource.release_layer)
        run.source.release_layer(L)
    run.emit("layer_done", layer=L, layers=run.n_layers)


def _table_of(run: _Run, v: Variant, mode: str, table: bool) -> dict:
    """The per-expert table records of ``v``'s layer in ``mode`` (teacher: computed; other modes: empty)."""
    from moetrace.tracer.execution.expert_table import empty_table

    if not table:
        return {}
    got = run.tables.pop((v.name, mode), None)
    return got if got is not None else empty_table(run.sizes["expert"], run.tokens.n)


def _forward(run: _Run, L: int, v: Variant, state: dict, inputs: dict, sites: list[str], ref_topk,
             ref_layer=None, keep: bool = False) -> dict:
    """Variant ``v``'s layer L on each mode's inputs (per sequence (1, T_s, H)), recording ``sites``.

    With ``ref_layer`` (the reference's layer module), the teacher mode also computes the layer's
    per-expert table into ``run.tables``; ``keep`` keeps this layer's module in ``run.ref_layer``
    instead of handing it back.

    Returns:
        mode -> (records per sequence, outputs per sequence (1, T_s, H)).
    """
    from moetrace.tracer.execution.expert_table import expert_inputs, layer_table

    layer = run.model.layer(L, state, v.path)
    sites = layer_kind_sites(sites, L not in run.dense_layers, run.sizes["shared"])
    out = {}
    adapter = run.model.adapter
    for m, hs in inputs.items():
        recs, outs = [], []
        table = ref_layer is not None and m == "teacher"
        with expert_inputs(layer, adapter, table) as calls:
            for s, h in enumerate(hs):
                masks, pe = run.ctx[v.dtype][s]
                mask = masks[run.model.layer_types[L]]
                forced = ref_topk[s] if m == "routing" and ref_topk is not None else None  # dense layers: none
                with capture(layer, adapter, sites, forced_topk=forced) as rec:
                    outs.append(layer(h, attention_mask=mask, position_embeddings=pe))
                recs.append(rec)
        if table:
            run.tables[(v.name, m)] = layer_table(adapter.experts(ref_layer), adapter.experts(layer), calls,
                                                  run.sizes["expert"], run.ref.dtype)
        out[m] = (recs, outs)
    if keep:
        run.ref_layer = layer
    else:
        run.model.release(layer)
    return out


def _check_finite(run: _Run, name: str, mode: str, L: int, recs: list[dict], outs: list[torch.Tensor]) -> None:
    """Note the first non-finite recorded site of a stream's layer L (its output counts as ``resid``)."""
    if (name, mode) not in run.findings.first:
        rec = _cat(recs)
        if "resid" not in rec:
            rec = {**rec, "resid": torch.cat([o[0] for o in outs], dim=0)}  # (token, hidden)
        run.findings.check(name, mode, L, rec)


def _write_logits(run: _Run) -> None:
    """Final norm and output head of every stream (teacher mode: on the reference's last hidden states)."""
    def head(v: Variant, hs: list[torch.Tensor]) -> torch.Tensor:
        g = run.weights[v.name].globals
        norm = run.model.norm(g["model.norm.weight"])
        w = g.get("lm_head.weight", g["model.embed_tokens.weight"])  # tied embeddings
        return torch.cat([v.path.head(norm, w, h) for h in hs], dim=0)  # (token, vocab)

    if run.ref.name in run.writers:
        logits = head(run.ref, run.ref_h)  # (token, vocab)
        run.findings.check(run.ref.name, "free", -1, {"logits": logits})
        run.writers[run.ref.name].write_logits("free", logits)
    for v in run.variants:
        for m in run.config.modes:
            hs = [h.to(v.dtype) for h in run.ref_h] if m == "teacher" else run.streams[(v.name, m)]
            logits = head(v, hs)  # (token, vocab)
            run.findings.check(v.name, m, -1, {"logits": logits})
            run.writers[v.name].write_logits(m, logits)


def _release(writers: dict) -> None:
    for w in writers.values():
        w.writer.release()
