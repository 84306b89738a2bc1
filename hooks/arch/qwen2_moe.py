"""Qwen2-MoE (transformers ``qwen2_moe``, GGUF ``qwen2moe``): routed experts beside a gated shared expert.

Transformers 5's ``Qwen2MoeDecoderLayer``: attention with q/k/v biases (``qkv_bias``, on by
default) and no q/k norms; ``mlp`` is a ``Qwen2MoeSparseMoeBlock`` on the MoE layers, a
``Qwen2MoeMLP`` of width ``intermediate_size`` on the layers ``mlp_only_layers`` and
``decoder_sparse_step`` make dense. The MoE block's ``gate`` (``Qwen2MoeTopKRouter``) returns
``(router_logits, top_k_weights, top_k_index)`` (softmax, top-k, renormalized when
``norm_topk_prob``, False in Qwen1.5-MoE); its output is the routed experts' sum plus
``sigmoid(shared_expert_gate(x)) * shared_expert(x)``, the shared expert a SwiGLU MLP of width
``shared_expert_intermediate_size``. Experts are fused as in Qwen3-MoE; checkpoints ship
per-expert keys ``mlp.experts.E.{gate,up,down}_proj.weight``.

GGUF (llama.cpp's ``qwen2moe``): ``ffn_{gate,up,down}_shexp``, ``ffn_gate_inp_shexp`` (the shared
gate, a (1, hidden) matrix in transformers, a vector of ``hidden`` in GGUF), and
``{arch}.expert_shared_feed_forward_length``. llama.cpp's qwen2moe graph has no dense layers.
"""

from moetrace.hooks.arch.family import ConfigKeys, ExpertFusion, Family, Router, Sites

FAMILY = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    gguf_arch="qwen2moe",
    hf_architecture="Qwen2MoeForCausalLM",
    tensors={
        "input_layernorm.weight": ("hidden",),
        "self_attn.q_proj.weight": ("q_dim", "hidden"),
        "self_attn.q_proj.bias": ("q_dim",),
        "self_attn.k_proj.weight": ("kv_dim", "hidden"),
        "self_attn.k_proj.bias": ("kv_dim",),
        "self_attn.v_proj.weight": ("kv_dim", "hidden"),
        "self_attn.v_proj.bias": ("kv_dim",),
        "self_attn.o_proj.weight": ("hidden", "q_dim"),
        "post_attention_layernorm.weight": ("hidden",),
        "mlp.gate.weight": ("experts", "hidden"),
        "mlp.experts.gate_proj": ("experts", "expert_width", "hidden"),
        "mlp.experts.up_proj": ("experts", "expert_width", "hidden"),
        "mlp.experts.down_proj": ("experts", "hidden", "expert_width"),
        "mlp.shared_expert.gate_proj.weight": ("shared_width", "hidden"),
        "mlp.shared_expert.up_proj.weight": ("shared_width", "hidden"),
        "mlp.shared_expert.down_proj.weight": ("hidden", "shared_width"),
        "mlp.shared_expert_gate.weight": (1, "hidden"),
    },
    dense_tensors={
        "mlp.gate_proj.weight": ("ffn_width", "hidden"),
        "mlp.up_proj.weight": ("ffn_width", "hidden"),
        "mlp.down_proj.weight": ("hidden", "ffn_width"),
    },
    fused={"mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj")},
    expert_projs={"gate": "mlp.experts.gate_proj", "up": "mlp.experts.up_proj", "down": "mlp.experts.down_proj"},
    keys=ConfigKeys(shared_width="shared_expert_intermediate_size"),
    routing=Router(outputs=("logits", "weight", "idx"), scoring="softmax", norm_attr="norm_topk_prob"),
    sites=Sites(attention="self_attn", moe="mlp", router="mlp.gate", shared="mlp.shared_expert",
                shared_gate="mlp.shared_expert_gate"),
    fusion=ExpertFusion(),
    # llama.cpp's ffn_gate_inp_shexp is a vector of n_embd (transformers' GGUF loader expands it back).
    gguf_vectors=("mlp.shared_expert_gate.weight",),
    checked=(
        "reference logits and every layer's resid equal transformers' fp32 forward (bit for bit), with a dense layer (mlp_only_layers); shared_out stored",
        "GGUF written by quantize (every layer MoE) loads in transformers' own GGUF loader, logits = gguf-fp32",
        "llama.cpp recipe: shexp tensors by substring category, ffn_down_shexp layer from the name",
    ),
    # llama.cpp's qwen2moe graph: top-k weights not renormalized, every layer MoE, q/k/v biases.
    gguf_config={"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu",
                 "qkv_bias": True},
)
