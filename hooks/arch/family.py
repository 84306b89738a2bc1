"""What moetrace knows about one model family, as data, and the generic behaviour built on it.

A :class:`Family` holds the facts of one architecture in the style of gguf-py's tensor tables:
its transformers model types and GGUF architecture name, the config keys of its MoE sizes, the
shapes of its tensors (transformers' [out, in] layout, in symbols of :meth:`Family.dims`), which
fused transformers tensors are several GGUF tensors, how per-expert checkpoint keys fuse, where
its sites are, and how its router speaks. Everything generic (GGUF names through gguf-py's
``TensorNameMap``, GGUF metadata in both directions, forcing a routing choice) lives here; a
family file holds the data and only the code that is truly its own, by subclassing.

The GGUF tensor names are never written down: each unfused transformers name is looked up in
gguf-py's map for the family's architecture (``gguf.get_tensor_name_map``), so they follow
llama.cpp's convert script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from moetrace.errors import MoetraceError

# Shape symbols: a tensor's shape is a tuple of these (or ints); Family.dims gives their values.
SHAPE_SYMBOLS = ("vocab", "hidden", "head_dim", "q_dim", "kv_dim", "experts", "expert_width", "shared_width",
                 "ffn_width")


@dataclass(frozen=True)
class ConfigKeys:
    """Names of the MoE facts in a transformers config (None: the family has no such key).

    A dense family (no experts at all) sets ``experts``, ``top_k`` and ``expert_width`` to None:
    every one of its layers is dense.

    Attributes:
        experts: routed experts per MoE layer.
        top_k: experts chosen per token.
        expert_width: one routed expert's intermediate width.
        dense_layers: the list of layer indices whose MLP is dense.
        sparse_step: every how many layers one is MoE (``decoder_sparse_step``).
        norm_topk: whether the top-k weights are renormalized to sum to 1.
        shared_width: the shared expert's intermediate width.
        first_dense: the number of leading decoder layers whose MLP is dense
            (DeepSeek's ``first_k_dense_replace``; None: the family has no such key).
    """

    experts: str | None = "num_experts"
    top_k: str | None = "num_experts_per_tok"
    expert_width: str | None = "moe_intermediate_size"
    dense_layers: str | None = "mlp_only_layers"
    sparse_step: str | None = "decoder_sparse_step"
    norm_topk: str | None = "norm_topk_prob"
    shared_width: str | None = None
    first_dense: str | None = None


@dataclass(frozen=True)
class Router:
    """How a family's router module speaks.

    Attributes:
        outputs: the order of ``logits``, ``weight`` and ``idx`` in the router module's output tuple.
        scoring: ``softmax`` or ``sigmoid``: how logits become the probabilities top-k picks from.
        norm_attr: the router module's attribute saying whether chosen weights are renormalized
            (None: see ``norm_always``).
        norm_always: without a ``norm_attr``, whether the router always renormalizes its chosen
            weights (Mixtral's does; False: never).
        norm_eps: added to the sum of the chosen weights before dividing by it (DeepSeek's
            router adds 1e-20; 0: divide by the sum itself).
        scale_attr: the router module's attribute its chosen weights are multiplied by after any
            renormalization (DeepSeek's ``routed_scaling_factor``; None: no scaling).
        selection_bias: the router module's buffer added to the scores for the choice of
            experts only, not for their weights (DeepSeek's ``e_score_correction_bias``;
            None: none). Forcing a choice never needs it: the weights are the unbiased scores.
        groups: the router module's attributes (number of groups, groups kept) of group-limited
            top-k (DeepSeek's ``n_group``/``topk_group``; None: plain top-k). Documentation of
            how the router chooses; forcing a choice bypasses it.
    """

    outputs: tuple[str, str, str] = ("logits", "weight", "idx")
    scoring: str = "softmax"
    norm_attr: str | None = "norm_topk_prob"
    norm_always: bool = False
    norm_eps: float = 0.0
    scale_attr: str | None = None
    selection_bias: str | None = None
    groups: tuple[str, str] | None = None

    def renormalizes(self, router) -> bool:
        """Whether ``router`` (the module) renormalizes its chosen weights to sum to 1."""
        if self.norm_attr:
            return bool(getattr(router, self.norm_attr, False))
        return self.norm_always

    def scale(self, router) -> float | None:
        """The factor ``router`` (the module) multiplies its chosen weights by (None: none)."""
        return float(getattr(router, self.scale_attr)) if self.scale_attr else None


@dataclass(frozen=True)
class Sites:
    """Module paths of the sites inside a decoder layer (dotted, relative to the layer).

    Attributes:
        attention: the attention module (``attn_out``).
        moe: the MLP module: the MoE block of an MoE layer (``moe_out``), the dense MLP of a
            dense layer (``mlp_out``); the tensors under this prefix differ between the two kinds.
        router: the router module of an MoE layer (``router_logits``, ``topk_idx``, ``topk_weight``).
        shared: the shared expert's module (None: the family has none); ``shared_out`` is its
            output times the sigmoid of ``shared_gate``'s output, as the MoE block combines them.
        shared_gate: the shared expert's gate module (None: the shared output is not gated).
        experts: the routed experts' module of an MoE layer, called as ``experts(hidden (token, H),
            top_k_index (token, k), top_k_weights (token, k))`` (the per-expert error table runs it
            on chosen experts).
    """

    attention: str = "self_attn"
    moe: str = "mlp"
    router: str = "mlp.gate"
    shared: str | None = None
    shared_gate: str | None = None
    experts: str = "mlp.experts"


@dataclass(frozen=True, eq=False)
class ExpertFusion:
    """How per-expert checkpoint keys fuse into transformers 5's expert tensors.

    Attributes:
        key: a per-expert key inside a layer, with ``{expert}`` and ``{proj}`` fields.
        fused: fused key -> the projections stacked along its rows (dim 1), in order.
        renames: checkpoint key prefix inside a layer -> transformers 5's prefix, for the other
            keys of a per-expert checkpoint (Mixtral's ``block_sparse_moe.gate.weight`` is
            ``mlp.gate.weight``), as transformers' conversion mapping renames them on load.
    """

    key: str = "mlp.experts.{expert}.{proj}_proj.weight"
    fused: dict = field(default_factory=lambda: {"mlp.experts.gate_up_proj": ("gate", "up"),
                                                 "mlp.experts.down_proj": ("down",)})
    renames: dict = field(default_factory=dict)

    def rename(self, key: str) -> str:
        """A checkpoint key inside a layer under its transformers 5 name."""
        for old, new in self.renames.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key

    def checkpoint_key(self, key: str) -> str:
        """A transformers 5 key inside a layer under its name in a per-expert checkpoint (``rename`` reversed)."""
        for old, new in self.renames.items():
            if key.startswith(new):
                return old + key[len(new):]
        return key

    @property
    def projs(self) -> tuple[str, ...]:
        return tuple(p for ps in self.fused.values() for p in ps)

    @cached_property
    def _pattern(self) -> re.Pattern:
        projs = "|".join(map(re.escape, self.projs))
        return re.compile(re.escape(self.key).replace(r"\{expert\}", r"(?P<expert>\d+)")
                          .replace(r"\{proj\}", f"(?P<proj>{projs})"))

    def match(self, key: str) -> tuple[str, int] | None:
        """(proj, expert) of a per-expert key inside a layer, or None for any other key."""
        m = self._pattern.fullmatch(key)
        return (m["proj"], int(m["expert"])) if m else None

    def per_expert_key(self, expert: int, proj: str) -> str:
        """The per-expert key of ``proj`` of ``expert`` inside a layer."""
        return self.key.format(expert=expert, proj=proj)


@dataclass(frozen=True, eq=False)
class Family:
    """One architecture: data, plus the generic behaviour every family shares.

    Attributes:
        name: the family's name (listed in errors).
        model_types: transformers ``model_type`` values it serves.
        gguf_arch: the GGUF ``general.architecture`` name (one of ``gguf.MODEL_ARCH_NAMES``).
        hf_architecture: the transformers class name written in a config built from GGUF.
        tensors: unfused transformers name inside a decoder layer -> shape (symbols of :meth:`dims`), as an
            MoE layer holds them (a dense family: its layers' attention and norms).
        dense_tensors: the tensors of a dense layer's MLP (under ``sites.moe``), which replace the
            MoE block's tensors in the layers :meth:`dense_layers` names (see :meth:`layer_tensors`).
        gguf_vectors: unfused names whose GGUF tensor is a vector although transformers holds a
            matrix of one row (Qwen2-MoE's ``mlp.shared_expert_gate.weight``, (1, hidden) -> (hidden,)).
        gguf_permute_qk: llama.cpp's convert script permutes ``attn_q``/``attn_k`` rows for its
            rotary layout (``LlamaModel.permute``); True writes them permuted and unpermutes on read.
        global_tensors: transformers name outside the layers -> shape.
        fused: fused transformers key -> the unfused names concatenated along dim 1 (rows) to make it.
        expert_projs: projection name as users give it (``--plant 3:5:down``) -> unfused tensor name.
        keys: config keys of the MoE facts.
        routing: how the router speaks.
        sites: module paths of the sites.
        fusion: how per-expert checkpoint keys fuse.
        gguf_config: config entries a GGUF file has no key for (the engine's fixed behaviour).
        gguf_extra: extra hyperparameters, ``(gguf key suffix, config key, value type name)``.
        dim_keys: extra shape symbols of this family -> the config key holding each
            (``{"kv_lora": "kv_lora_rank"}`` for a latent-attention family).
        derived_dims: extra shape symbols a subclass's :meth:`dims` computes from several config
            keys (DeepSeek's ``q_heads_dim``, heads times the query head width).
        gguf_renames: name inside a layer -> the name convert_hf_to_gguf looks up in gguf-py's map
            (DeepSeek's buffer ``mlp.gate.e_score_correction_bias`` is renamed
            ``mlp.gate.e_score_correction.bias``, which maps to ``exp_probs_b.bias``).
        fp32_tensors: names inside a layer every compute path holds in float32, whatever its dtype:
            transformers' ``_keep_in_fp32_modules_strict`` (DeepSeek's router weight and selection
            bias), which llama.cpp also keeps F32; in bf16 a selection bias would change choices.
        gguf_experts: which files of ``gguf_arch`` the family serves, by their
            ``{arch}.expert_count``: ``any``, ``moe`` (expert_count > 0) or ``dense`` (none).
            llama.cpp's ``llama`` architecture is both Mixtral (with experts) and dense Llama,
            so two families may share a GGUF architecture when they split it this way.
        checked: what has been checked for this family (``moetrace models`` and README list it).
        transposed: transformers keys held as (E, in, out), the transpose of GGUF's [out, in]
            (GPT-OSS's ``mlp.experts.gate_up_proj`` and ``down_proj``); see :meth:`to_gguf`.
        interleaved: fused keys whose parts alternate along the fused rows (part i at rows i::n)
            instead of following one another (GPT-OSS's gate/up: gate at even, up at odd rows).
        packed: the checkpoint format of keys a published checkpoint may store quantized
            (``{"mlp.experts.down_proj": "mxfp4"}``: ``down_proj_blocks``/``down_proj_scales``),
            read exactly by :mod:`moetrace.tracer.sources.packed`.
    """

    name: str
    model_types: tuple[str, ...]
    gguf_arch: str
    hf_architecture: str
    tensors: dict
    global_tensors: dict = field(default_factory=lambda: {
        "model.embed_tokens.weight": ("vocab", "hidden"), "model.norm.weight": ("hidden",),
        "lm_head.weight": ("vocab", "hidden")})
    dense_tensors: dict = field(default_factory=dict)
    fused: dict = field(default_factory=dict)
    expert_projs: dict = field(default_factory=dict)
    keys: ConfigKeys = ConfigKeys()
    routing: Router = Router()
    sites: Sites = Sites()
    fusion: ExpertFusion | None = ExpertFusion()
    gguf_config: dict = field(default_factory=dict)
    gguf_extra: tuple = ()
    dim_keys: dict = field(default_factory=dict)
    derived_dims: tuple = ()
    gguf_permute_qk: bool = False
    gguf_vectors: tuple = ()
    gguf_renames: dict = field(default_factory=dict)
    fp32_tensors: tuple = ()
    gguf_experts: str = "any"
    checked: tuple = ()
    transposed: tuple = ()
    interleaved: tuple = ()
    packed: dict = field(default_factory=dict)

    def __post_init__(self):
        # A family file is data a user may write: check it when it is made, naming what is wrong.
        for hf, shape in {**self.tensors, **self.dense_tensors, **self.global_tensors}.items():
            valid = (*SHAPE_SYMBOLS, *self.dim_keys, *self.derived_dims)
            bad = [s for s in shape if not isinstance(s, int) and s not in valid]
            if bad:
                raise MoetraceError(f"family {self.name}: tensor {hf} has shape symbol {bad[0]!r}; "
                                    f"valid: {', '.join(valid)}")
        for what, names in (("fused", [n for ps in self.fused.values() for n in ps]),
                            ("expert_projs", list(self.expert_projs.values()))):
            missing = [n for n in names if n not in self.tensors]
            if missing:
                raise MoetraceError(f"family {self.name}: {what} names {missing[0]!r}, which is not in its tensors")
        layer_keys = {*self.fused, *(n for n in self.tensors if n not in {p for ps in self.fused.values() for p in ps})}
        for what, keys in (("transposed", self.transposed), ("interleaved", self.interleaved),
                           ("packed", tuple(self.packed))):
            stray = [k for k in keys if k not in layer_keys or (what == "interleaved" and k not in self.fused)]
            if stray:
                raise MoetraceError(f"family {self.name}: {what} names {stray[0]!r}, which is not one of its "
                                    f"{'fused keys' if what == 'interleaved' else 'layer keys'}")
        if self.gguf_experts not in ("any", "moe", "dense"):
            raise MoetraceError(f"family {self.name}: gguf_experts {self.gguf_experts!r}; valid: any, moe, dense")
        if self.routing.scoring not in ("softmax", "sigmoid"):
            raise MoetraceError(f"family {self.name}: router scoring {self.routing.scoring!r}; valid: softmax, sigmoid")

    def serves_gguf(self, arch: str, n_experts: int | None) -> bool:
        """Whether a GGUF file of architecture ``arch`` with ``n_experts`` experts (None: unknown) is this family's."""
        if arch != self.gguf_arch:
            return False
        if n_experts is None or self.gguf_experts == "any":
            return True
        return (n_experts > 0) == (self.gguf_experts == "moe")

    # -- sizes, read through the config keys ------------------------------------------------
    @property
    def has_experts(self) -> bool:
        """Whether the family has MoE layers at all (a dense family has none)."""
        return self.keys.experts is not None

    def n_experts(self, config) -> int:
        """Routed experts per MoE layer (0 for a dense family)."""
        return int(getattr(config, self.keys.experts) or 0) if self.has_experts else 0

    def top_k(self, config) -> int:
        return int(getattr(config, self.keys.top_k) or 0) if self.keys.top_k else 0

    def expert_width(self, config) -> int:
        return int(getattr(config, self.keys.expert_width) or 0) if self.keys.expert_width else 0

    def head_dim(self, config) -> int:
        """The attention head width; derived as transformers' modules derive it when the config has none."""
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def dense_layers(self, config) -> list[int]:
        """Indices of the decoder layers whose MLP is dense (no router, no experts)."""
        n = int(config.num_hidden_layers)
        if not self.has_experts or self.n_experts(config) == 0:
            return list(range(n))  # transformers builds a dense MLP where there are no experts
        dense = set(getattr(config, self.keys.dense_layers, None) or []) if self.keys.dense_layers else set()
        step = int(getattr(config, self.keys.sparse_step, 1) or 1) if self.keys.sparse_step else 1
        # transformers' rule: layer i is MoE when (i + 1) % step == 0 and it is not listed as dense.
        dense |= {i for i in range(n) if (i + 1) % step}
        if self.keys.first_dense:  # DeepSeek: the first first_k_dense_replace layers are dense
            dense |= set(range(int(getattr(config, self.keys.first_dense, 0) or 0)))
        return sorted(i for i in dense if 0 <= i < n)

    def moe_layers(self, config) -> list[int]:
        """Indices of the decoder layers whose MLP is a mixture of experts."""
        dense = set(self.dense_layers(config))
        return [i for i in range(int(config.num_hidden_layers)) if i not in dense]

    def _moe_prefix(self) -> str:
        return self.sites.moe + "."

    def layer_tensors(self, config, layer: int) -> dict:
        """Unfused transformers name inside decoder ``layer`` -> shape: an MoE layer's :attr:`tensors`, or for
        a dense layer those outside the MLP plus :attr:`dense_tensors`."""
        if layer not in set(self.dense_layers(config)):
            return dict(self.tensors)
        if not self.dense_tensors:
            raise MoetraceError(f"family {self.name}: layer {layer} is dense, but the family defines no dense MLP "
                                f"tensors (dense_tensors)")
        out = {hf: s for hf, s in self.tensors.items() if not hf.startswith(self._moe_prefix())}
        out.update(self.dense_tensors)
        return out

    def dims(self, config) -> dict[str, int]:
        """The value of every shape symbol for ``config``."""
        hd = self.head_dim(config)
        k = self.keys
        return {
            "vocab": int(config.vocab_size), "hidden": int(config.hidden_size), "head_dim": hd,
            "q_dim": int(config.num_attention_heads) * hd, "kv_dim": int(config.num_key_value_heads) * hd,
            "experts": self.n_experts(config), "expert_width": self.expert_width(config),
            "shared_width": int(getattr(config, k.shared_width, 0) or 0) if k.shared_width else 0,
            "ffn_width": int(getattr(config, "intermediate_size", 0) or 0),
            # a key the config leaves None (DeepSeek-V2-Lite's q_lora_rank: no low-rank query) is 0
            **{sym: int(getattr(config, key, 0) or 0) for sym, key in self.dim_keys.items()},
        }

    # -- tensor names -------------------------------------------------------------------------
    @cached_property
    def _name_map(self):
        import gguf

        archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        if self.gguf_arch not in archs:
            raise MoetraceError(f"family {self.name}: GGUF architecture {self.gguf_arch!r} is unknown to gguf-py")
        return gguf.get_tensor_name_map(archs[self.gguf_arch], 1)

    @cached_property
    def _generic_map(self):
        import gguf

        return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)

    def gguf_unwritable(self, config) -> str | None:
        """Why this model cannot be a GGUF file of the family's architecture (None: it can)."""
        import gguf

        archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[archs[self.gguf_arch]]}
        dense = self.dense_layers(config)
        for hf in self.dense_tensors:
            stem = self.layer_stems_unfused[hf]
            if dense and stem not in {k.format(bid=0).split(".", 2)[-1] if "{bid}" in k else k for k in known}:
                return (f"layers {dense} are dense (a {stem} tensor), which llama.cpp's {self.gguf_arch} "
                        f"architecture cannot hold")
        return None

    def _gguf_renamed(self, hf: str) -> str:
        """``hf`` under the name convert_hf_to_gguf maps (:attr:`gguf_renames`)."""
        for old, new in self.gguf_renames.items():
            if hf == old or hf.endswith("." + old):
                return hf[: -len(old)] + new
        return hf

    def gguf_suffix(self, hf: str) -> str:
        """``.bias`` or ``.weight``: the suffix of the GGUF name of transformers tensor ``hf``."""
        return ".bias" if self._gguf_renamed(hf).endswith(".bias") else ".weight"

    def _gguf_name(self, hf: str) -> str:
        """GGUF name (``blk.0.attn_q.weight``) of a transformers name (``model.layers.0.self_attn.q_proj.weight``)."""
        hf = self._gguf_renamed(hf)
        suffix = ".bias" if hf.endswith(".bias") else ".weight"
        base = hf[: -len(suffix)] if hf.endswith(suffix) else hf
        g = self._name_map.get_name(base)
        if g is None and hf.split("model.layers.0.")[-1] in self.dense_tensors:
            # A dense layer in an architecture whose llama.cpp graph has none (qwen3moe with
            # mlp_only_layers): llama.cpp's generic names (ffn_gate, ...) serve the recipe and the
            # audit; such a model cannot be written as a GGUF file (see gguf_unwritable).
            g = self._generic_map.get_name(base)
        if g is None:
            raise MoetraceError(f"family {self.name}: gguf-py has no {self.gguf_arch} tensor for {hf!r}")
        return g + suffix

    @cached_property
    def layer_stems(self) -> dict[str, str | tuple[str, ...]]:
        """Transformers key inside a layer, as transformers 5 holds it -> GGUF stem(s) (``attn_q``).

        A fused key maps to a tuple of stems, one per row block (gate_up -> ffn_gate_exps, ffn_up_exps).
        """
        unfused = self.layer_stems_unfused
        in_fused = {n for parts in self.fused.values() for n in parts}
        out: dict = {hf: stem for hf, stem in unfused.items() if hf not in in_fused}
        out.update({key: tuple(unfused[p] for p in parts) for key, parts in self.fused.items()})
        return out

    def gguf_layer_names(self, layer: int, config=None) -> dict[str, str | tuple[str, ...]]:
        """Transformers key inside layer ``layer`` -> full GGUF name(s).

        Without ``config``: the names of both layer kinds (an MoE layer's and a dense layer's MLP
        tensors never share a key), for lookups by key; with it: only the keys layer ``layer`` has.
        """
        def full(hf, s):
            suffix = self.gguf_suffix(self.fused[hf][0] if hf in self.fused else hf)  # a fused key's parts name it
            return tuple(f"blk.{layer}.{x}{suffix}" for x in s) if isinstance(s, tuple) else f"blk.{layer}.{s}{suffix}"

        names = {hf: full(hf, s) for hf, s in self.layer_stems.items()}
        if config is None:
            return names
        keys = self.layer_tensors(config, layer)
        in_fused = {n for parts in self.fused.values() for n in parts}
        keep = {hf for hf in keys if hf not in in_fused}
        keep |= {fk for fk, parts in self.fused.items() if all(p in keys for p in parts)}
        return {hf: g for hf, g in names.items() if hf in keep}

    @cached_property
    def global_names(self) -> dict[str, str]:
        """Transformers name outside the layers -> GGUF name."""
        return {hf: self._gguf_name(hf) for hf in self.global_tensors}

    @cached_property
    def expert_stems(self) -> dict[str, str]:
        """Projection name (``gate``) -> GGUF stem of its expert tensor (``ffn_gate_exps``)."""
        return {p: self.layer_stems_unfused[hf] for p, hf in self.expert_projs.items()}

    @cached_property
    def layer_stems_unfused(self) -> dict[str, str]:
        """Unfused transformers name inside a layer -> GGUF stem, from gguf-py's map."""
        def stem(hf):
            g = self._gguf_name("model.layers.0." + hf)[len("blk.0."):]
            return g.rsplit(".", 1)[0]

        return {hf: stem(hf) for hf in {**self.tensors, **self.dense_tensors}}

    @staticmethod
    def layer_prefix(layer: int) -> str:
        """The transformers key prefix of decoder layer ``layer``."""
        return f"model.layers.{layer}."

    def gguf_specs(self, config) -> dict[str, tuple[int, ...]]:
        """GGUF name -> shape as gguf.GGUFReader reports it (HF's [out, in]; (E, rows, row length) for experts)."""
        d = self.dims(config)
        shape = lambda sym: tuple(s if isinstance(s, int) else d[s] for s in sym)  # noqa: E731
        g = self.global_names
        out = {g["model.embed_tokens.weight"]: shape(self.global_tensors["model.embed_tokens.weight"])}
        for i in range(int(config.num_hidden_layers)):
            for hf, sym in self.layer_tensors(config, i).items():
                suffix = self.gguf_suffix(hf)
                dims = shape(sym)
                out[f"blk.{i}.{self.layer_stems_unfused[hf]}{suffix}"] = (
                    (int(np.prod(dims)),) if hf in self.gguf_vectors else dims)
        for hf, sym in self.global_tensors.items():
            if hf == "model.embed_tokens.weight" or (hf == "lm_head.weight" and getattr(config, "tie_word_embeddings",
                                                                                         False)):
                continue
            out[g[hf]] = shape(sym)
        return out

    # -- layout: a transformers tensor as its GGUF tensors, and back ----------------------------
    # One pair of methods takes every layer tensor between the two layouts: to_gguf / from_gguf.
    # The data fields say the common cases (fused row blocks, interleaved rows, transposed
    # experts); a family whose split is its own (DeepSeek's kv_b) overrides them for that key,
    # with fused_shape and fuses_rows to match.
    def to_gguf(self, key: str, w: torch.Tensor, config=None) -> list[torch.Tensor]:
        """A transformers tensor of a layer in its GGUF tensors' layout ([out, in]), one per part, in
        :attr:`fused` order (views where they can be).

        A fused key gives its parts (row blocks, or rows i::n where :attr:`interleaved`); a
        :attr:`transposed` key is transposed first; any other key is itself. ``config``: the
        model's, for a family that splits a tensor by its sizes.
        """
        if key in self.transposed:
            w = w.transpose(-1, -2)  # (E, in, out) -> (E, out, in)
        n = len(self.fused.get(key, (key,)))
        if n == 1:
            return [w]
        if key in self.interleaved:
            return [w[:, i::n] for i in range(n)]
        rows = w.shape[1] // n
        return [w[:, i * rows:(i + 1) * rows] for i in range(n)]

    def from_gguf(self, key: str, parts: list[torch.Tensor], config=None) -> torch.Tensor:
        """The inverse of :meth:`to_gguf`: GGUF-layout parts joined into the tensor transformers holds."""
        if len(parts) == 1:
            w = parts[0]
        elif key in self.interleaved:
            w = torch.stack(list(parts), dim=2).flatten(1, 2)  # rows part0[0], part1[0], part0[1], ...
        else:
            w = torch.cat(list(parts), dim=1)
        return w.transpose(-1, -2).contiguous() if key in self.transposed else w

    def fuses_rows(self, key: str) -> bool:
        """Whether fused tensor ``key``'s GGUF tensors are rows of it (row blocks, or :attr:`interleaved`
        rows), so that a block-computing path can take them as they are; False: it needs the tensor dense."""
        return True

    def fused_shape(self, key: str, config) -> tuple[int, ...]:
        """Fused tensor ``key``'s shape as transformers holds it before any :attr:`transposed` transposition;
        default: its parts stacked along dim 1 (rows of each expert; a bias (E, rows) too)."""
        first = self.hf_shape(self.fused[key][0], config)
        return (first[0], sum(self.hf_shape(p, config)[1] for p in self.fused[key]), *first[2:])

    def hf_shape(self, hf: str, config) -> tuple[int, ...]:
        """The shape of the unfused tensor ``hf`` (inside a layer), in GGUF's layout ([out, in])."""
        d = self.dims(config)
        sym = {**self.tensors, **self.dense_tensors}[hf]
        return tuple(s if isinstance(s, int) else d[s] for s in sym)

    def hf_layer_shapes(self, config, layer: int | None = None) -> dict[str, tuple[int, ...]]:
        """Key inside an MoE layer (or layer ``layer``) -> shape as transformers holds it (a source's
        ``layer_state``): fused keys joined (:meth:`fused_shape`), :attr:`transposed` keys as (E, in, out)."""
        tensors = self.tensors if layer is None else self.layer_tensors(config, layer)
        parts = {p for ps in self.fused.values() for p in ps}
        out = {hf: self.hf_shape(hf, config) for hf in tensors if hf not in parts}
        for fused, ps in self.fused.items():
            if all(p in tensors for p in ps):
                out[fused] = self.fused_shape(fused, config)
        for key in self.transposed:
            if key in out:
                out[key] = (*out[key][:-2], out[key][-1], out[key][-2])
        return out

    def gguf_row_order(self, gguf_name: str, config):
        """Row indices taking a transformers tensor to its GGUF row order (None: the same order).

        llama.cpp's convert script (``LlamaModel.permute``) regroups each head's rows of ``attn_q``
        and ``attn_k`` from halves (transformers' rotate_half) to interleaved pairs; GGUF row r is
        transformers row ``order[r]``. The inverse (``np.argsort``) undoes it on read.
        """
        if not self.gguf_permute_qk:
            return None
        stem = gguf_name.split(".")[-2]
        if stem not in ("attn_q", "attn_k"):
            return None
        heads = int(config.num_attention_heads if stem == "attn_q" else config.num_key_value_heads)
        rows = np.arange(heads * self.head_dim(config))
        return rows.reshape(heads, 2, -1).swapaxes(1, 2).reshape(-1)

    # -- GGUF metadata ------------------------------------------------------------------------
    def gguf_metadata(self, config) -> list[tuple]:
        """The architecture's hyperparameters as GGUF ``(key, value, GGUFValueType)`` (see :mod:`.gguf_meta`)."""
        from moetrace.hooks.arch.gguf_meta import write_hparams

        return write_hparams(self, config)

    def config_from_gguf(self, field, tensors: dict, where: str):
        """A transformers config from a GGUF file's metadata (see :func:`.gguf_meta.read_config`)."""
        from moetrace.hooks.arch.gguf_meta import read_config

        return read_config(self, field, tensors, where)

    # -- sites and router ----------------------------------------------------------------------
    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.get_submodule(self.sites.attention)

    def moe(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.get_submodule(self.sites.moe)

    def router(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.get_submodule(self.sites.router)

    def experts(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The routed experts' module of an MoE layer (see :attr:`Sites.experts`)."""
        return layer.get_submodule(self.sites.experts)

    def is_moe_layer(self, layer: torch.nn.Module) -> bool:
        """Whether a decoder-layer module holds an MoE block (its router exists), not a dense MLP."""
        try:
            layer.get_submodule(self.sites.router)
        except AttributeError:
            return False
        return self.has_experts

    def shared(self, layer: torch.nn.Module):
        """(shared expert module, its gate module or None) of an MoE layer, or None where the family has none."""
        if self.sites.shared is None:
            return None
        gate = layer.get_submodule(self.sites.shared_gate) if self.sites.shared_gate else None
        return layer.get_submodule(self.sites.shared), gate

    def router_outputs(self, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (token, expert), topk_idx (token, k), topk_weight (token, k)) from the router's output."""
        parts = dict(zip(self.routing.outputs, out))
        return parts["logits"], parts["idx"], parts["weight"]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(token, expert) the probabilities top-k picks from, in float32."""
        if self.routing.scoring == "softmax":
            return torch.softmax(logits, dim=-1, dtype=torch.float)
        if self.routing.scoring == "sigmoid":
            return torch.sigmoid(logits.float())
        raise MoetraceError(f"family {self.name}: unknown router scoring {self.routing.scoring!r}; "
                            f"valid: softmax, sigmoid")

    def force_choice(self, router: torch.nn.Module, out, forced_idx: torch.Tensor):
        """The router's output with ``forced_idx`` (token, k) as its choice.

        The weights are the router's own probabilities at the forced experts, renormalized as
        the router renormalizes its own choice, so only *which* experts run changes.
        """
        logits, _, _ = self.router_outputs(out)
        probs = self.scores(logits)  # (token, expert)
        idx = forced_idx.to(device=logits.device, dtype=torch.long).reshape(logits.shape[0], -1)  # (token, k)
        w = probs.gather(-1, idx)  # (token, k)
        if self.routing.renormalizes(router):
            total = w.sum(dim=-1, keepdim=True)
            w = w / (total + self.routing.norm_eps if self.routing.norm_eps else total)
        scale = self.routing.scale(router)
        if scale is not None:  # after the renormalization, as DeepSeek's router scales
            w = w * scale
        parts = {"logits": logits, "weight": w.to(logits.dtype), "idx": idx}
        return tuple(parts[k] for k in self.routing.outputs)
