"""Llama (transformers ``llama``, GGUF ``llama`` without experts): a dense model, every decoder layer an MLP.

``LlamaDecoderLayer``: ``self_attn`` (no q/k norms, no biases by default), ``mlp`` a SwiGLU
``LlamaMLP`` of width ``intermediate_size`` (site ``mlp_out``). GGUF ``llama`` is also Mixtral's
architecture name: a file with ``llama.expert_count`` > 0 is Mixtral's, one without is this
family's (``gguf_experts="dense"``; the registry picks by the expert count). llama.cpp's convert script permutes the rows
of ``attn_q``/``attn_k`` into its rotary layout, and transformers' GGUF loader undoes it, so this
family writes them permuted (``gguf_permute_qk``).
"""

from moetrace.hooks.arch.family import ConfigKeys, Family, Sites

FAMILY = Family(
    name="llama",
    model_types=("llama",),
    gguf_arch="llama",
    gguf_experts="dense",
    hf_architecture="LlamaForCausalLM",
    tensors={
        "input_layernorm.weight": ("hidden",),
        "self_attn.q_proj.weight": ("q_dim", "hidden"),
        "self_attn.k_proj.weight": ("kv_dim", "hidden"),
        "self_attn.v_proj.weight": ("kv_dim", "hidden"),
        "self_attn.o_proj.weight": ("hidden", "q_dim"),
        "post_attention_layernorm.weight": ("hidden",),
    },
    dense_tensors={
        "mlp.gate_proj.weight": ("ffn_width", "hidden"),
        "mlp.up_proj.weight": ("ffn_width", "hidden"),
        "mlp.down_proj.weight": ("hidden", "ffn_width"),
    },
    keys=ConfigKeys(experts=None, top_k=None, expert_width=None, dense_layers=None, sparse_step=None, norm_topk=None),
    sites=Sites(attention="self_attn", moe="mlp", router="mlp.gate"),
    fusion=None,
    gguf_config={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    gguf_permute_qk=True,
    checked=(
        "reference logits and every layer's resid equal transformers' fp32 forward (bit for bit)",
        "GGUF written by quantize (q/k rows permuted) loads in transformers' own GGUF loader, logits = gguf-fp32",
        "llama.cpp recipe: dense ffn_down by the layer counter",
    ),
)
