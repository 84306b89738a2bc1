"""Mixtral (transformers ``mixtral``, GGUF ``llama`` with experts): 8 experts top-2 in every layer.

Transformers 5's ``MixtralDecoderLayer``: ``self_attn`` (no q/k norms) returns
``(attn_output, attn_weights)``; ``mlp`` is the ``MixtralSparseMoeBlock`` whose ``gate``
(``MixtralTopKRouter``) returns ``(router_logits (token, expert), top_k_weights (token, k),
top_k_index (token, k))``: fp32 softmax over all experts, top-k, always renormalized (no config
switch). Experts are held fused, ``mlp.experts.gate_up_proj`` (E, 2I, H) and
``mlp.experts.down_proj`` (E, H, I), with I = ``intermediate_size``.

Released checkpoints (and transformers 5's ``save_pretrained``) use the original names:
``block_sparse_moe.experts.E.w1/w3/w2.weight`` (gate, up, down) and
``block_sparse_moe.gate.weight``; transformers' conversion mapping renames
``block_sparse_moe.`` to ``mlp.`` and fuses w1 and w3 into ``gate_up_proj``. llama.cpp writes
Mixtral as architecture ``llama`` with ``llama.expert_count`` 8; the ``llama`` architecture
without experts is dense Llama, another family.
"""

from moetrace.hooks.arch.family import ConfigKeys, ExpertFusion, Family, Router, Sites

FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    gguf_arch="llama",
    gguf_experts="moe",
    hf_architecture="MixtralForCausalLM",
    # Unfused transformers names inside a layer -> shape ([out, in]), in llama.cpp's tensor order.
    tensors={
        "input_layernorm.weight": ("hidden",),
        "self_attn.q_proj.weight": ("q_dim", "hidden"),
        "self_attn.k_proj.weight": ("kv_dim", "hidden"),
        "self_attn.v_proj.weight": ("kv_dim", "hidden"),
        "self_attn.o_proj.weight": ("hidden", "q_dim"),
        "post_attention_layernorm.weight": ("hidden",),
        "mlp.gate.weight": ("experts", "hidden"),
        "mlp.experts.gate_proj": ("experts", "expert_width", "hidden"),
        "mlp.experts.up_proj": ("experts", "expert_width", "hidden"),
        "mlp.experts.down_proj": ("experts", "hidden", "expert_width"),
    },
    fused={"mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj")},
    expert_projs={"gate": "mlp.experts.gate_proj", "up": "mlp.experts.up_proj", "down": "mlp.experts.down_proj"},
    # The expert width is intermediate_size; every layer is MoE; the router always renormalizes.
    keys=ConfigKeys(experts="num_local_experts", top_k="num_experts_per_tok", expert_width="intermediate_size",
                    dense_layers=None, sparse_step=None, norm_topk=None),
    routing=Router(outputs=("logits", "weight", "idx"), scoring="softmax", norm_attr=None, norm_always=True),
    sites=Sites(attention="self_attn", moe="mlp", router="mlp.gate"),
    fusion=ExpertFusion(
        key="block_sparse_moe.experts.{expert}.{proj}.weight",
        fused={"mlp.experts.gate_up_proj": ("w1", "w3"), "mlp.experts.down_proj": ("w2",)},
        renames={"block_sparse_moe.": "mlp."},
    ),
    gguf_config={"hidden_act": "silu", "sliding_window": None},
    # llama.cpp's convert script (LlamaModel, which Mixtral uses) permutes attn_q/attn_k rows.
    gguf_permute_qk=True,
    checked=(
        "reference logits and every layer's resid equal transformers' fp32 forward (per-expert and fused keys)",
        "GGUF written by quantize: gguf-py names, re-read as a model source equal to gguf-fp32",
        "llama.cpp recipe with the n_expert == 8 rules",
    ),
)
