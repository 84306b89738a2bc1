"""Qwen3-MoE (transformers ``qwen3_moe``, GGUF ``qwen3moe``): every decoder layer a mixture of experts.

Transformers 5's ``Qwen3MoeDecoderLayer``: ``self_attn`` returns ``(attn_output, attn_weights)``;
``mlp`` is the ``Qwen3MoeSparseMoeBlock`` whose ``gate`` (``Qwen3MoeTopKRouter``) returns
``(router_logits (token, expert), top_k_weights (token, k), top_k_index (token, k))``, softmax
over all experts, top-k, renormalized when ``norm_topk_prob``. Experts are held fused:
``mlp.experts.gate_up_proj`` (E, 2I, H), gate in [:, :I], up in [:, I:], and
``mlp.experts.down_proj`` (E, H, I); Qwen3-30B-A3B ships per-expert keys, fused on read.
"""

from moetrace.hooks.arch.family import ConfigKeys, ExpertFusion, Family, Router, Sites

FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    gguf_arch="qwen3moe",
    hf_architecture="Qwen3MoeForCausalLM",
    # Unfused transformers names inside a layer -> shape ([out, in]), in llama.cpp's tensor order.
    tensors={
        "input_layernorm.weight": ("hidden",),
        "self_attn.q_proj.weight": ("q_dim", "hidden"),
        "self_attn.k_proj.weight": ("kv_dim", "hidden"),
        "self_attn.v_proj.weight": ("kv_dim", "hidden"),
        "self_attn.o_proj.weight": ("hidden", "q_dim"),
        "self_attn.q_norm.weight": ("head_dim",),
        "self_attn.k_norm.weight": ("head_dim",),
        "post_attention_layernorm.weight": ("hidden",),
        "mlp.gate.weight": ("experts", "hidden"),
        "mlp.experts.gate_proj": ("experts", "expert_width", "hidden"),
        "mlp.experts.up_proj": ("experts", "expert_width", "hidden"),
        "mlp.experts.down_proj": ("experts", "hidden", "expert_width"),
    },
    # The layers mlp_only_layers / decoder_sparse_step make dense hold a Qwen3MoeMLP of intermediate_size.
    dense_tensors={
        "mlp.gate_proj.weight": ("ffn_width", "hidden"),
        "mlp.up_proj.weight": ("ffn_width", "hidden"),
        "mlp.down_proj.weight": ("hidden", "ffn_width"),
    },
    fused={"mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj")},
    expert_projs={"gate": "mlp.experts.gate_proj", "up": "mlp.experts.up_proj", "down": "mlp.experts.down_proj"},
    keys=ConfigKeys(),
    routing=Router(outputs=("logits", "weight", "idx"), scoring="softmax", norm_attr="norm_topk_prob"),
    sites=Sites(attention="self_attn", moe="mlp", router="mlp.gate"),
    fusion=ExpertFusion(),
    # llama.cpp's qwen3moe graph always renormalizes the top-k weights, and every layer is MoE.
    gguf_config={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu",
                 "attention_bias": False},
    checked=(
        "reference logits and every layer's resid equal transformers' fp32 forward (fused keys; per-expert fused on read)",
        "GGUF written by quantize loads in transformers' own GGUF loader",
        "llama.cpp recipe (Qwen3-30B-A3B's table in NUMERICS.md)",
        "dense layers (decoder_sparse_step, mlp_only_layers): every layer's resid equal transformers' fp32 "
        "forward; refused as a qwen3moe GGUF in one line",
    ),
)
