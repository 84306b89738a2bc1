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

The decoder layers are transformers' own modules, so the reference's output equals the
transformers forward of the same model (tests/tracer/test_executor.py checks it bit for bit).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moetrace.errors import MoetraceError
from moetrace.hooks.qwen3_moe import adapter_for
from moetrace.hooks.sites import ALL_SITES, LAYER_SITES, capture
from moetrace.tracer.store import Tokens, TraceWriter
from moetrace.tracer.variants import REFERENCE, Variant
from moetrace.tracer.weights import tensor_types, variant_global, variant_layer_state

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

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise MoetraceError(f"unknown mode {bad[0] if bad else '(none)'!r}; valid modes: {', '.join(MODES)}")
        bad = [s for s in self.sites if s not in ALL_SITES]
        if bad:
            raise MoetraceError(f"unknown site {bad[0]!r}; valid sites: {', '.join(ALL_SITES)}")
        self.modes = [m for m in MODES if m in self.modes]  # canonical order
        Variant.parse(self.reference)
        for v in self.variants:
            Variant.parse(v)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(**d)


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
        self.adapter = adapter_for(self.config)
        rotary_cls = type(skeleton.model.rotary_emb)
        self.rotary = rotary_cls(config=self.config)  # real buffers, on the CPU

    def layer(self, index: int, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        layer = copy.deepcopy(self.skeleton.model.layers[index])
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    def norm(self, weight: torch.Tensor) -> torch.nn.Module:
        norm = copy.deepcopy(self.skeleton.model.norm)
        norm.load_state_dict({"weight": weight}, strict=True, assign=True)
        return norm.eval()

    def context(self, hidden: torch.Tensor, positions: torch.Tensor):
        """(causal mask, position embeddings) for one sequence (1, T, H), as the model's forward makes them."""
        from transformers.masking_utils import create_causal_mask

        position_ids = positions.unsqueeze(0)  # (1, T)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids
        )
        return mask, self.rotary(hidden, position_ids=position_ids)


def _cat(records: list[dict]) -> dict:
    return {k: torch.cat([r[k] for r in records], dim=0) for k in records[0]}


def run_trace(source, config: RunConfig, tokens: Tokens, run_dir, progress=None, write_reference: bool = True):
    """Trace the reference and the variants of ``config`` over ``tokens`` into ``run_dir``.

    Args:
        source: a model source (moetrace.tracer.source).
        config: the run configuration.
        tokens: the tokens, flattened over sequences.
        run_dir: the run folder; stores are ``run_dir/VARIANT.zarr``.
        progress: optional callable ``progress(event: str, **info)``.
        write_reference: False to run the reference without storing it (its store exists).

    Returns:
        dict variant name -> store path, for every store written.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".moetrace-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MoetraceError(f"cannot write to output folder {str(run_dir)!r}: {e.strerror}") from None
    model = _Model(source)
    cfg = model.config
    ref = Variant.parse(config.reference)
    variants = [Variant.parse(v) for v in config.variants if Variant.parse(v).name != ref.name]
    layer_sites = [s for s in config.sites if s in LAYER_SITES]
    need_ref_topk = "routing" in config.modes
    ref_sites = sorted(set(layer_sites) | ({"topk_idx"} if need_ref_topk else set()))
    n_layers = source.num_layers
    sizes = {
        "layers": n_layers, "hidden": cfg.hidden_size, "expert": cfg.num_experts,
        "k": cfg.num_experts_per_tok, "vocab": cfg.vocab_size,
    }
    base_attrs = {"model": source.model_id, "model_hash": source.model_hash, "seed": config.seed,
                  "config": config.to_dict(), "reference": ref.name}

    def emit(event, **info):
        if progress:
            progress(event, **info)

    types = {v.name: tensor_types(source, v) for v in [ref] + variants}
    writers: dict[str, TraceWriter] = {}
    if write_reference:
        writers[ref.name] = TraceWriter(run_dir / f"{ref.name}.zarr", sizes, tokens, ["free"], config.sites,
                                        {**base_attrs, "variant": ref.name, "modes": ["free"]})
    for v in variants:
        writers[v.name] = TraceWriter(run_dir / f"{v.name}.zarr", sizes, tokens, config.modes, config.sites,
                                      {**base_attrs, "variant": v.name})
    try:
        seqs = [torch.from_numpy(s) for s in tokens.sequences()]
        positions = [torch.from_numpy(tokens.pos[tokens.seq == s]).long() for s in sorted(set(tokens.seq.tolist()))]
        globals_ = {v.name: variant_global(source, v, types[v.name]) for v in [ref] + variants}

        def embed(v: Variant, ids):
            return torch.nn.functional.embedding(ids, globals_[v.name]["model.embed_tokens.weight"]).unsqueeze(0)

        ref_h = [embed(ref, ids) for ids in seqs]  # per sequence (1, T_s, H)
        ctx = {ref.dtype: [model.context(h, p) for h, p in zip(ref_h, positions)]}
        streams: dict[tuple[str, str], list[torch.Tensor]] = {}
        for v in variants:
            if v.dtype not in ctx:
                ctx[v.dtype] = [model.context(embed(v, ids), p) for ids, p in zip(seqs, positions)]
            for m in config.modes:
                if m != "teacher":
                    streams[(v.name, m)] = [embed(v, ids) for ids in seqs]

        with torch.inference_mode():
            for L in range(n_layers):
                emit("layer_start", layer=L, layers=n_layers)
                ref_state = source.layer_state(L)
                # Reference.
                layer = model.layer(L, variant_layer_state(ref_state, L, ref, types[ref.name]))
                recs, ref_in = [], ref_h
                ref_h = []
                for s, h in enumerate(ref_in):
                    mask, pe = ctx[ref.dtype][s]
                    with capture(layer, model.adapter, ref_sites) as rec:
                        ref_h.append(layer(h, attention_mask=mask, position_embeddings=pe))
                    recs.append(rec)
                ref_rec = _cat(recs)
                if ref.name in writers:
                    writers[ref.name].write_layer("free", L, ref_rec)
                ref_topk = [r["topk_idx"] for r in recs] if need_ref_topk else None
                del layer
                # Variants, each in every mode.
                for v in variants:
                    layer = model.layer(L, variant_layer_state(ref_state, L, v, types[v.name]))
                    for m in config.modes:
                        recs = []
                        for s in range(len(seqs)):
                            mask, pe = ctx[v.dtype][s]
                            h = ref_in[s].to(v.dtype) if m == "teacher" else streams[(v.name, m)][s]
                            forced = ref_topk[s] if m == "routing" else None
                            with capture(layer, model.adapter, layer_sites, forced_topk=forced) as rec:
                                out = layer(h, attention_mask=mask, position_embeddings=pe)
                            if m != "teacher":
                                streams[(v.name, m)][s] = out
                            recs.append(rec)
                        writers[v.name].write_layer(m, L, _cat(recs))
                    del layer
                for w in writers.values():
                    w.mark_layers_done(L + 1)
                del ref_state  # freed by reference counting; no gc pass needed per layer
                emit("layer_done", layer=L, layers=n_layers)

            # Final norm and output head.
            def head(v: Variant, hs: list[torch.Tensor]) -> torch.Tensor:
                g = globals_[v.name]
                norm = model.norm(g["model.norm.weight"])
                w = g.get("lm_head.weight", g["model.embed_tokens.weight"])  # tied embeddings
                return torch.cat([torch.nn.functional.linear(norm(h), w)[0] for h in hs], dim=0)  # (token, vocab)

            if ref.name in writers:
                writers[ref.name].write_logits("free", head(ref, ref_h))
            for v in variants:
                for m in config.modes:
                    hs = [h.to(v.dtype) for h in ref_h] if m == "teacher" else streams[(v.name, m)]
                    writers[v.name].write_logits(m, head(v, hs))
        for w in writers.values():
            w.finish()
    except BaseException:
        for w in writers.values():
            w.release()  # the store stays marked incomplete
        raise
    return {name: w.path for name, w in writers.items()}
