"""GLM-4.5/4.6 (transformers ``glm4_moe``, GGUF ``glm4moe``): DeepSeek-V3's MoE with grouped-query attention.

Transformers 5.x's ``Glm4MoeDecoderLayer``: ``self_attn`` is grouped-query attention with q/k/v
biases (``attention_bias``, true in GLM-4.5), optional per-head q/k RMS norms (``use_qk_norm``) and
rotary embeddings on the first ``partial_rotary_factor`` (0.5) of each head; ``mlp`` is a dense
``Glm4MoeMLP`` of width ``intermediate_size`` on the first ``first_k_dense_replace`` layers, else
``Glm4MoeMoE``: routed experts, an ungated shared expert of width ``moe_intermediate_size *
n_shared_experts`` and ``Glm4MoeTopkRouter``, the DeepSeek-V3 router line for line (sigmoid scores,
``e_score_correction_bias`` for the choice only, group-limited top-k, weights renormalized with
1e-20 and scaled by ``routed_scaling_factor``): see :mod:`.deepseek_v3`.

GGUF (llama.cpp's ``glm4moe``): ``attn_{q,k,v}`` with ``.bias``, ``attn_{q,k}_norm``,
``post_attention_norm`` (the norm before the MLP), ``exp_probs_b.bias``, ``ffn_*_shexp``, dense
``ffn_*``; hyperparameters as convert_hf_to_gguf's ``Glm4MoeModel.set_gguf_parameters`` adds them:
``rope.dimension_count`` = head_dim * partial_rotary_factor, ``expert_shared_count``,
``leading_dense_block_count``, sigmoid ``expert_gating_func``, ``expert_weights_scale``.
The MTP layer (``num_nextn_predict_layers``) is not part of the decoder stack traced here.

Checked against llama.cpp's loader (src/llama-model.cpp ``LLM_ARCH_GLM4_MOE``, read at commit
00342301d01a): ``attn_{q,k,v}.weight`` and ``.bias``, ``attn_output`` (hidden, heads*head_dim),
``post_attention_norm``, ``ffn_gate_inp`` and ``exp_probs_b.bias`` are required; ``attn_{q,k}_norm``
are optional (head_dim,); dense lead layers ``ffn_{gate,up,down}`` of ``feed_forward_length``, MoE
layers ``ffn_*_exps`` of ``expert_feed_forward_length`` and ``ffn_*_shexp`` of that times
``expert_shared_count``; ``output`` optional (tied embeddings). Since the q/k/v biases are required,
a model without them (``attention_bias`` false) cannot be a glm4moe file llama.cpp loads:
:meth:`Glm4MoeFamily.gguf_unwritable` says so.
"""

from __future__ import annotations

from moetrace.hooks.arch.deepseek_meta import SIGMOID
from moetrace.hooks.arch.deepseek_v3 import DEEPSEEK_KEYS, DENSE_MLP, ROUTED_TENSORS, SIGMOID_GROUP_ROUTER
from moetrace.hooks.arch.family import ExpertFusion, Family, Sites

QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
QKV_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


class Glm4MoeFamily(Family):
    """GLM-4.5: the shared expert's width from the shared count; q/k norms and biases as the config says."""

    def dims(self, config) -> dict[str, int]:
        d = super().dims(config)
        d["shared_width"] = d["expert_width"] * d["n_shared"]
        return d

    def layer_tensors(self, config, layer: int) -> dict:
        drop = set()
        if not getattr(config, "use_qk_norm", False):
            drop.update(QK_NORMS)
        if not getattr(config, "attention_bias", False):
            drop.update(QKV_BIASES)
        return {hf: s for hf, s in super().layer_tensors(config, layer).items() if hf not in drop}

    def gguf_unwritable(self, config) -> str | None:
        """llama.cpp's glm4moe loader requires the q/k/v biases (llama-model.cpp at 00342301d01a)."""
        if not getattr(config, "attention_bias", False):
            return ("its attention has no q/k/v biases (attention_bias false), which llama.cpp's glm4moe loader "
                    "requires")
        return super().gguf_unwritable(config)

    def config_from_gguf(self, field, tensors: dict, where: str):
        """The generic config; q/k norms and q/k/v biases as the file's tensors show (no GGUF key says them)."""
        config = super().config_from_gguf(field, tensors, where)
        config.use_qk_norm = "blk.0.attn_q_norm.weight" in tensors
        config.attention_bias = "blk.0.attn_q.bias" in tensors
        return config

    def gguf_metadata(self, config) -> list[tuple]:
        """The generic MoE keys plus Glm4MoeModel.set_gguf_parameters' own (sigmoid gating, partial rotary)."""
        import gguf

        V, K = gguf.GGUFValueType, gguf.Keys.LLM
        key = lambda tmpl: tmpl.format(arch=self.gguf_arch)  # noqa: E731
        generic = [e for e in super().gguf_metadata(config) if e[0] != key(K.EXPERT_SHARED_FEED_FORWARD_LENGTH)]
        rope = int(self.head_dim(config) * float(getattr(config, "partial_rotary_factor", 0.5)))
        return generic + [(key(K.EXPERT_GATING_FUNC), SIGMOID, V.UINT32),
                          (key(gguf.Keys.Rope.DIMENSION_COUNT), rope, V.UINT32)]


FAMILY = Glm4MoeFamily(
    name="glm4_moe",
    model_types=("glm4_moe",),
    gguf_arch="glm4moe",
    hf_architecture="Glm4MoeForCausalLM",
    tensors={
        "input_layernorm.weight": ("hidden",),
        "self_attn.q_proj.weight": ("q_dim", "hidden"),
        "self_attn.q_proj.bias": ("q_dim",),
        "self_attn.k_proj.weight": ("kv_dim", "hidden"),
        "self_attn.k_proj.bias": ("kv_dim",),
        "self_attn.v_proj.weight": ("kv_dim", "hidden"),
        "self_attn.v_proj.bias": ("kv_dim",),
        "self_attn.o_proj.weight": ("hidden", "q_dim"),
        "self_attn.q_norm.weight": ("head_dim",),
        "self_attn.k_norm.weight": ("head_dim",),
        "post_attention_layernorm.weight": ("hidden",),
        **ROUTED_TENSORS,
    },
    dense_tensors=DENSE_MLP,
    fused={"mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj")},
    expert_projs={"gate": "mlp.experts.gate_proj", "up": "mlp.experts.up_proj", "down": "mlp.experts.down_proj"},
    keys=DEEPSEEK_KEYS,
    routing=SIGMOID_GROUP_ROUTER,
    sites=Sites(attention="self_attn", moe="mlp", router="mlp.gate", shared="mlp.shared_experts"),
    fusion=ExpertFusion(),
    dim_keys={"n_shared": "n_shared_experts"},
    gguf_renames={"mlp.gate.e_score_correction_bias": "mlp.gate.e_score_correction.bias"},
    # transformers' _keep_in_fp32_modules_strict; llama.cpp's ffn_gate_inp and exp_probs_b are F32 too
    fp32_tensors=("mlp.gate.weight", "mlp.gate.e_score_correction_bias"),
    gguf_extra=(("expert_shared_count", "n_shared_experts", "UINT32"),
                ("leading_dense_block_count", "first_k_dense_replace", "UINT32"),
                ("expert_weights_scale", "routed_scaling_factor", "FLOAT32")),
    # llama.cpp's glm4moe graph: SwiGLU, half-rotary heads, one group, q/k/v biases, no MTP in the stack.
    gguf_config={"hidden_act": "silu", "partial_rotary_factor": 0.5, "n_group": 1, "topk_group": 1,
                 "attention_bias": True, "num_nextn_predict_layers": 0},
    checked=(
        "reference logits and every layer's resid equal transformers' fp32 forward (bit for bit): a dense first "
        "layer, shared expert, biased sigmoid routing, q/k norms and q/k/v biases",
        "GGUF written by quantize pure_q8_0: glm4moe names (exp_probs_b.bias, post_attention_norm), read back as "
        "a model source: its reference = the checkpoint's q8_0-fp32 variant (bit for bit)",
    ),
)
