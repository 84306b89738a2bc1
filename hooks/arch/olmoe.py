"""OLMoE (transformers ``olmoe``, GGUF ``olmoe``): every layer MoE, top-k weights not renormalized.

Transformers 5's ``OlmoeDecoderLayer``: ``self_attn`` applies RMS norms to the whole query and
key projections (``q_norm`` ``hidden`` wide, ``k_norm`` ``kv_dim`` wide, unlike Qwen3's per-head
norms); ``mlp`` is the ``OlmoeSparseMoeBlock`` whose ``gate`` returns ``(router_logits,
top_k_weights, top_k_index)``, fp32 softmax, top-k, renormalized only when ``norm_topk_prob``
(False in OLMoE's config and in llama.cpp's olmoe graph). The expert width is
``intermediate_size``. Checkpoints ship per-expert keys ``mlp.experts.E.{gate,up,down}_proj.weight``,
fused on load as Qwen3-MoE's are.
"""

from moetrace.hooks.arch.family import ConfigKeys, ExpertFusion, Family, Router, Sites

FAMILY = Family(
    name="olmoe",
    model_types=("olmoe",),
    gguf_arch="olmoe",
    hf_architecture="OlmoeForCausalLM",
    tensors={
        "input_layernorm.weight": ("hidden",),
        "self_attn.q_proj.weight": ("q_dim", "hidden"),
        "self_attn.k_proj.weight": ("kv_dim", "hidden"),
        "self_attn.v_proj.weight": ("kv_dim", "hidden"),
        "self_attn.o_proj.weight": ("hidden", "q_dim"),
        "self_attn.q_norm.weight": ("hidden",),
        "self_attn.k_norm.weight": ("kv_dim",),
        "post_attention_layernorm.weight": ("hidden",),
        "mlp.gate.weight": ("experts", "hidden"),
        "mlp.experts.gate_proj": ("experts", "expert_width", "hidden"),
        "mlp.experts.up_proj": ("experts", "expert_width", "hidden"),
        "mlp.experts.down_proj": ("experts", "hidden", "expert_width"),
    },
    fused={"mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj")},
    expert_projs={"gate": "mlp.experts.gate_proj", "up": "mlp.experts.up_proj", "down": "mlp.experts.down_proj"},
    keys=ConfigKeys(expert_width="intermediate_size", dense_layers=None, sparse_step=None),
    routing=Router(outputs=("logits", "weight", "idx"), scoring="softmax", norm_attr="norm_topk_prob"),
    sites=Sites(attention="self_attn", moe="mlp", router="mlp.gate"),
    fusion=ExpertFusion(),
    # llama.cpp's olmoe graph never renormalizes the top-k weights.
    gguf_config={"norm_topk_prob": False, "hidden_act": "silu", "clip_qkv": None},
    checked=(
        "reference logits and every layer's resid equal transformers' fp32 forward (per-expert and fused keys)",
        "GGUF written by quantize: gguf-py names, re-read as a model source equal to gguf-fp32",
        "llama.cpp recipe (n_expert 64/16: the generic MoE rules)",
    ),
)
