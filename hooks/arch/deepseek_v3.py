"""DeepSeek-V3 (transformers ``deepseek_v3``, GGUF ``deepseek2``): DeepSeek-V3/R1, Kimi-K2, Moonlight.

Transformers 5.x's ``DeepseekV3DecoderLayer``:

- ``self_attn`` is multi-head latent attention (``DeepseekV3Attention``). The query is either one
  projection ``q_proj`` (``q_lora_rank`` None: DeepSeek-V2-Lite, Moonlight) or low-rank,
  ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` of rank ``q_lora_rank`` (V3, R1, Kimi-K2); keys and
  values come from one latent: ``kv_a_proj_with_mqa(x)`` gives ``kv_lora_rank`` latent values and
  ``qk_rope_head_dim`` shared rotary key values, the latent goes through ``kv_a_layernorm`` and
  ``kv_b_proj`` (heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank) expands it into each head's
  non-rotary key and its value. ``o_proj`` reads heads * v_head_dim. The config's ``head_dim`` is
  ``qk_rope_head_dim`` (the rotary width).
- ``mlp`` is a dense ``DeepseekV3MLP`` of width ``intermediate_size`` on the first
  ``first_k_dense_replace`` layers, else ``DeepseekV3MoE``: routed experts (fused
  ``experts.gate_up_proj`` (E, 2I, H), ``experts.down_proj`` (E, H, I)) plus ``shared_experts``, one
  ungated SwiGLU MLP of width ``moe_intermediate_size * n_shared_experts``, added to the routed sum.
- ``mlp.gate`` (``DeepseekV3TopkRouter``) returns ``(router_logits, topk_weights, topk_indices)``:
  fp32 logits, ``sigmoid`` scores; ``e_score_correction_bias`` is added to the scores for the
  choice only; the experts are split into ``n_group`` groups, a group scores the sum of its two best
  biased scores, the ``topk_group`` best groups are kept and top-k is taken among their experts; the
  weights are the *unbiased* scores of the chosen experts, divided by their sum plus 1e-20 when
  ``norm_topk_prob``, then multiplied by ``routed_scaling_factor``. Forcing a choice (``routing``
  mode) keeps that weighting (:class:`Router` ``norm_eps``/``scale_attr``).

Sites: ``attn_out`` is the whole MLA block's output (no site inside it: its error is localized by
the ``attn_out`` of teacher-forced runs, and by which MLA tensors a ``--tensor-type`` override
changes); ``shared_out`` is the shared experts' output; ``mlp_out`` the dense layers'.

GGUF (llama.cpp's ``deepseek2``, which DeepSeek-V2/V3, Kimi-K2 and Moonlight all convert to):
``attn_q`` or ``attn_q_a``/``attn_q_a_norm``/``attn_q_b``, ``attn_kv_a_mqa``, ``attn_kv_a_norm``,
``attn_output``; ``kv_b_proj`` is written as two 3-D tensors, ``attn_k_b`` (heads, kv_lora_rank,
qk_nope_head_dim) = each head's key rows transposed, and ``attn_v_b`` (heads, v_head_dim,
kv_lora_rank), as ``DeepseekV2Model.modify_tensors`` of convert_hf_to_gguf.py splits it for MLA's
absorbed form (ggml-org/llama.cpp; no ``attn_kv_b`` is written). The router's bias is
``exp_probs_b.bias`` (F32), shared experts ``ffn_{gate,up,down}_shexp``, the dense layers
``ffn_{gate,up,down}``. Hyperparameters as ``DeepseekV2Model.set_gguf_parameters`` writes them
(head_count_kv 1 and key/value lengths of the latent, the MLA head widths in
``key_length_mla``/``value_length_mla``): see :meth:`DeepseekFamily.gguf_metadata`.
llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp, read at commit 007dbbf3) has no
rule of its own for MLA tensors: ``attn_kv_b`` (absent from current conversions) would count as
``attn_v``; ``attn_k_b``, ``attn_v_b``, ``attn_q_a``, ``attn_q_b`` and ``attn_kv_a_mqa`` take the
file type's default type, with the row-size fallback (``attn_k_b`` rows are qk_nope_head_dim long:
128 is no multiple of 256, so Q4_K falls back to Q5_0).

Checked against llama.cpp's loader (src/llama-model.cpp ``LLM_ARCH_DEEPSEEK2``, read at commit
00342301d01a; ggml shapes reversed into numpy's): ``attn_kv_a_norm`` (kv_lora,), ``attn_kv_a_mqa``
(kv_lora + rope, hidden), ``attn_k_b`` (heads, kv_lora, nope), ``attn_v_b`` (heads, v, kv_lora),
``attn_output`` (hidden, heads*v); ``attn_q_a_norm``/``attn_q_a``/``attn_q_b`` or ``attn_q``;
``ffn_gate_inp`` (experts, hidden), ``exp_probs_b.bias`` optional (V2 has none), ``ffn_*_exps`` of
``expert_feed_forward_length``, ``ffn_*_shexp`` of that times ``expert_shared_count``, dense lead
layers ``ffn_*`` of ``feed_forward_length``; ``output`` required (no tied embeddings). All as
written here. One difference is llama.cpp's own: at that commit it picks the query form by the
layer count (``is_lite = n_layer == 27``, DeepSeek-V2-Lite's and Moonlight's), not by
``q_lora_rank``, so a file of a full-query model with another layer count (the moonlight-16b-a3b
preset at ``:layers=2``) or a low-rank one with 27 layers is written as convert_hf_to_gguf
writes it but is not loaded by that llama.cpp; moetrace reads it either way.
"""

from __future__ import annotations

import torch

from moetrace.hooks.arch.family import ConfigKeys, ExpertFusion, Family, Router, Sites

KV_B = "self_attn.kv_b_proj.weight"
# Query tensors of the two query forms: low-rank (q_lora_rank set) and one projection (None).
Q_LOW_RANK = ("self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight")
Q_FULL = ("self_attn.q_proj.weight",)


class DeepseekFamily(Family):
    """A latent-attention family: MLA shapes, the query form by ``q_lora_rank``, kv_b split for GGUF."""

    def dims(self, config) -> dict[str, int]:
        d = super().dims(config)
        d["q_heads_dim"] = d["heads"] * (d["qk_nope"] + d["qk_rope"])
        d["kv_a"] = d["kv_lora"] + d["qk_rope"]
        d["v_heads_dim"] = d["heads"] * d["v_head"]
        d["kv_b"] = d["heads"] * (d["qk_nope"] + d["v_head"])
        d["shared_width"] = d["expert_width"] * d["n_shared"]
        return d

    def layer_tensors(self, config, layer: int) -> dict:
        """The layer's tensors, with the query projections of the config's query form."""
        drop = Q_FULL if getattr(config, "q_lora_rank", None) else Q_LOW_RANK
        return {hf: s for hf, s in super().layer_tensors(config, layer).items() if hf not in drop}

    def fuses_rows(self, key: str) -> bool:
        return key != KV_B

    def _kv_b_sizes(self, config) -> tuple[int, int, int]:
        if config is None:
            from moetrace.errors import InternalError

            raise InternalError(f"family {self.name}: splitting {KV_B} needs the model's config")
        d = self.dims(config)
        return d["heads"], d["qk_nope"], d["v_head"]

    def to_gguf(self, key: str, w: torch.Tensor, config=None) -> list[torch.Tensor]:
        """kv_b (heads*(nope+v), kv_lora) -> attn_k_b (heads, kv_lora, nope), attn_v_b (heads, v, kv_lora)."""
        if key != KV_B:
            return super().to_gguf(key, w, config)
        heads, nope, v = self._kv_b_sizes(config)
        per_head = w.reshape(heads, nope + v, w.shape[-1])  # (heads, nope+v, kv_lora)
        return [per_head[:, :nope].transpose(1, 2), per_head[:, nope:]]

    def from_gguf(self, key: str, parts: list[torch.Tensor], config=None) -> torch.Tensor:
        if key != KV_B:
            return super().from_gguf(key, parts, config)
        k_b, v_b = parts  # (heads, kv_lora, nope), (heads, v, kv_lora)
        merged = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # (heads, nope+v, kv_lora)
        return merged.reshape(-1, merged.shape[-1])

    def fused_shape(self, key: str, config) -> tuple[int, ...]:
        if key != KV_B:
            return super().fused_shape(key, config)
        d = self.dims(config)
        return (d["kv_b"], d["kv_lora"])

    def gguf_metadata(self, config) -> list[tuple]:
        """convert_hf_to_gguf's deepseek2 hyperparameters (see :mod:`.deepseek_meta`)."""
        from moetrace.hooks.arch.deepseek_meta import write_mla_hparams

        return write_mla_hparams(self, config, super().gguf_metadata(config))

    def config_from_gguf(self, field, tensors: dict, where: str):
        from moetrace.hooks.arch.deepseek_meta import read_mla_config

        return read_mla_config(self, field, tensors, where)


MLA_TENSORS = {
    "input_layernorm.weight": ("hidden",),
    "self_attn.q_proj.weight": ("q_heads_dim", "hidden"),
    "self_attn.q_a_proj.weight": ("q_lora", "hidden"),
    "self_attn.q_a_layernorm.weight": ("q_lora",),
    "self_attn.q_b_proj.weight": ("q_heads_dim", "q_lora"),
    "self_attn.kv_a_proj_with_mqa.weight": ("kv_a", "hidden"),
    "self_attn.kv_a_layernorm.weight": ("kv_lora",),
    # kv_b_proj (kv_b, kv_lora) as GGUF holds it: two 3-D tensors (see to_gguf)
    "self_attn.k_b_proj.weight": ("heads", "kv_lora", "qk_nope"),
    "self_attn.v_b_proj.weight": ("heads", "v_head", "kv_lora"),
    "self_attn.o_proj.weight": ("hidden", "v_heads_dim"),
    "post_attention_layernorm.weight": ("hidden",),
}
ROUTED_TENSORS = {
    "mlp.gate.weight": ("experts", "hidden"),
    "mlp.gate.e_score_correction_bias": ("experts",),
    "mlp.experts.gate_proj": ("experts", "expert_width", "hidden"),
    "mlp.experts.up_proj": ("experts", "expert_width", "hidden"),
    "mlp.experts.down_proj": ("experts", "hidden", "expert_width"),
    "mlp.shared_experts.gate_proj.weight": ("shared_width", "hidden"),
    "mlp.shared_experts.up_proj.weight": ("shared_width", "hidden"),
    "mlp.shared_experts.down_proj.weight": ("hidden", "shared_width"),
}
DENSE_MLP = {
    "mlp.gate_proj.weight": ("ffn_width", "hidden"),
    "mlp.up_proj.weight": ("ffn_width", "hidden"),
    "mlp.down_proj.weight": ("hidden", "ffn_width"),
}
MLA_DIMS = {"heads": "num_attention_heads", "q_lora": "q_lora_rank", "kv_lora": "kv_lora_rank",
            "qk_nope": "qk_nope_head_dim", "qk_rope": "qk_rope_head_dim", "v_head": "v_head_dim",
            "n_shared": "n_shared_experts"}
# The DeepSeek-V3 router: sigmoid, selection bias, group-limited top-k, renormalized (+1e-20), scaled.
SIGMOID_GROUP_ROUTER = Router(outputs=("logits", "weight", "idx"), scoring="sigmoid", norm_attr="norm_topk_prob",
                              norm_eps=1e-20, scale_attr="routed_scaling_factor",
                              selection_bias="e_score_correction_bias", groups=("num_group", "topk_group"))
DEEPSEEK_KEYS = ConfigKeys(experts="n_routed_experts", top_k="num_experts_per_tok",
                           expert_width="moe_intermediate_size", dense_layers=None, sparse_step=None,
                           norm_topk="norm_topk_prob", shared_width=None, first_dense="first_k_dense_replace")

FAMILY = DeepseekFamily(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    gguf_arch="deepseek2",
    hf_architecture="DeepseekV3ForCausalLM",
    tensors={**MLA_TENSORS, **ROUTED_TENSORS},
    dense_tensors=DENSE_MLP,
    fused={KV_B: ("self_attn.k_b_proj.weight", "self_attn.v_b_proj.weight"),
           "mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj")},
    expert_projs={"gate": "mlp.experts.gate_proj", "up": "mlp.experts.up_proj", "down": "mlp.experts.down_proj"},
    keys=DEEPSEEK_KEYS,
    routing=SIGMOID_GROUP_ROUTER,
    sites=Sites(attention="self_attn", moe="mlp", router="mlp.gate", shared="mlp.shared_experts"),
    fusion=ExpertFusion(),
    dim_keys=MLA_DIMS,
    derived_dims=("q_heads_dim", "kv_a", "v_heads_dim", "kv_b"),
    # convert_hf_to_gguf renames the buffer so that gguf-py maps it to exp_probs_b with a .bias suffix
    gguf_renames={"mlp.gate.e_score_correction_bias": "mlp.gate.e_score_correction.bias"},
    # transformers' _keep_in_fp32_modules_strict; llama.cpp's ffn_gate_inp and exp_probs_b are F32 too
    fp32_tensors=("mlp.gate.weight", "mlp.gate.e_score_correction_bias"),
    # llama.cpp's deepseek2 graph: SwiGLU experts, no MTP layers in the decoder stack.
    gguf_config={"hidden_act": "silu", "num_nextn_predict_layers": 0, "rope_interleave": True},
    checked=(
        "reference logits and every layer's resid equal transformers' fp32 forward (bit for bit), low-rank "
        "and full query, a dense first layer, shared experts, biased group routing",
        "routing mode on the reference reproduces its own weights bit for bit (scaling and 1e-20 kept)",
        "GGUF written by quantize: deepseek2 names (kv_b as attn_k_b/attn_v_b), dequantized by gguf-py "
        "in transformers' modules = gguf-fp32",
        "llama.cpp recipe (007dbbf3): MLA tensors take the default type with the row fallback",
    ),
)
