"""GPT-OSS (transformers ``gpt_oss``, GGUF ``gpt-oss``): sinks, alternating sliding window, biased router, clamped SwiGLU.

Transformers 5's ``GptOssDecoderLayer``:

- ``self_attn`` (``GptOssAttention``): q/k/v/o projections with biases, and ``sinks`` (one learned
  logit per head, (heads,)) joined to every query's scores before the softmax and dropped after,
  so a head can put weight on "nothing". ``config.layer_types`` alternates ``sliding_attention``
  (window ``sliding_window``, 128 in gpt-oss-20b) and ``full_attention``, starting sliding; the
  executor gives each layer the mask of its kind.
- ``mlp`` (``GptOssMLP``) returns ``(hidden, router_scores)``; its ``router``
  (``GptOssTopKRouter``) is a linear *with bias*: logits = x W^T + b, top-k of the logits, softmax
  over the k chosen logits (the same weights as the full softmax renormalized over them). It
  returns ``(router_logits, router_scores, router_indices)``.
- ``mlp.experts`` (``GptOssExperts``) holds its tensors *transposed*, (E, in, out):
  ``gate_up_proj`` (E, H, 2I) with gate and up *interleaved* along the last axis (gate at even,
  up at odd columns), ``gate_up_proj_bias`` (E, 2I) likewise, ``down_proj`` (E, I, H) and
  ``down_proj_bias`` (E, H). Its activation is a clamped SwiGLU: gate clamped above at
  ``swiglu_limit`` (7), up clamped to [-7, 7], out = (up + 1) * gate * sigmoid(1.702 * gate).

Published checkpoints (openai/gpt-oss-20b, -120b) store the experts in MXFP4:
``gate_up_proj_blocks``/``_scales`` and ``down_proj_blocks``/``_scales`` in the [out, in] layout,
with ``quantization_config.quant_method = "mxfp4"``; the rest is BF16. moetrace's reference is
those blocks dequantized exactly (MXFP4 values are exactly representable in float32 and BF16;
see moetrace.tracer.sources.packed), so the reference is the checkpoint as published.

GGUF (llama.cpp's ``gpt-oss``, convert_hf_to_gguf.py ``GptOssModel``): the gate/up columns are
de-interleaved into ``ffn_gate_exps`` and ``ffn_up_exps`` (E, I, H), their biases into
``ffn_gate_exps.bias`` and ``ffn_up_exps.bias`` (E, I); ``ffn_down_exps`` (E, H, I) and its
``.bias`` (E, H); the router ``ffn_gate_inp`` with ``.bias``; ``attn_sinks`` (heads,);
``post_attention_norm`` (not ffn_norm); q/k not permuted (NeoX rotary). llama-quantize keeps
every tensor whose name does not end in ``weight`` (the biases) and 1-D tensors (the sinks) as
they are.

Checked against llama.cpp's loader (src/llama-model.cpp ``LLM_ARCH_OPENAI_MOE``, read at commit
00342301d01a; ggml shapes reversed into numpy's): every tensor is required: ``attn_norm``,
``post_attention_norm``, ``attn_{q,k,v}`` (heads*head_dim or kv_heads*head_dim, hidden) with
biases, ``attn_output`` (hidden, heads*head_dim) with bias, ``attn_sinks`` (heads,),
``ffn_gate_inp`` (experts, hidden) with bias (experts,), ``ffn_{gate,up}_exps`` (experts,
expert_width, hidden) with biases (experts, expert_width), ``ffn_down_exps`` (experts, hidden,
expert_width) with bias (experts, hidden), and ``output`` (no tied embeddings). All as written here.
"""

from moetrace.hooks.arch.family import ConfigKeys, Family, Router, Sites

FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    gguf_arch="gpt-oss",
    hf_architecture="GptOssForCausalLM",
    # Unfused names inside a layer -> shape in GGUF's [out, in] layout (transformers holds the
    # experts transposed: see `transposed`).
    tensors={
        "input_layernorm.weight": ("hidden",),
        "self_attn.q_proj.weight": ("q_dim", "hidden"),
        "self_attn.q_proj.bias": ("q_dim",),
        "self_attn.k_proj.weight": ("kv_dim", "hidden"),
        "self_attn.k_proj.bias": ("kv_dim",),
        "self_attn.v_proj.weight": ("kv_dim", "hidden"),
        "self_attn.v_proj.bias": ("kv_dim",),
        "self_attn.o_proj.weight": ("hidden", "q_dim"),
        "self_attn.o_proj.bias": ("hidden",),
        "self_attn.sinks": ("heads",),
        "post_attention_layernorm.weight": ("hidden",),
        "mlp.router.weight": ("experts", "hidden"),
        "mlp.router.bias": ("experts",),
        "mlp.experts.gate_proj": ("experts", "expert_width", "hidden"),
        "mlp.experts.up_proj": ("experts", "expert_width", "hidden"),
        "mlp.experts.gate_proj.bias": ("experts", "expert_width"),
        "mlp.experts.up_proj.bias": ("experts", "expert_width"),
        "mlp.experts.down_proj": ("experts", "hidden", "expert_width"),
        "mlp.experts.down_proj.bias": ("experts", "hidden"),
    },
    # Transformers keys made of GGUF tensors; down_proj_bias is one tensor under another name.
    fused={
        "mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj"),
        "mlp.experts.gate_up_proj_bias": ("mlp.experts.gate_proj.bias", "mlp.experts.up_proj.bias"),
        "mlp.experts.down_proj_bias": ("mlp.experts.down_proj.bias",),
    },
    transposed=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    interleaved=("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias"),
    packed={"mlp.experts.gate_up_proj": "mxfp4", "mlp.experts.down_proj": "mxfp4"},
    expert_projs={"gate": "mlp.experts.gate_proj", "up": "mlp.experts.up_proj", "down": "mlp.experts.down_proj"},
    dim_keys={"heads": "num_attention_heads"},
    # The expert width is intermediate_size; every layer is MoE; softmax over the top-k logits
    # is the full softmax renormalized over the chosen experts.
    keys=ConfigKeys(experts="num_local_experts", top_k="num_experts_per_tok", expert_width="intermediate_size",
                    dense_layers=None, sparse_step=None, norm_topk=None),
    routing=Router(outputs=("logits", "weight", "idx"), scoring="softmax", norm_attr=None, norm_always=True),
    sites=Sites(attention="self_attn", moe="mlp", router="mlp.router"),
    fusion=None,
    gguf_extra=(("attention.sliding_window", "sliding_window", "UINT32"),),
    # What llama.cpp's gpt-oss graph fixes: biases everywhere, the clamped SwiGLU's constants,
    # YaRN without truncation (transformers' GptOssConfig default), starting with a sliding layer.
    gguf_config={"hidden_act": "silu", "attention_bias": True, "swiglu_limit": 7.0, "swiglu_alpha": 1.702,
                 "rope_parameters": {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}},
    checked=(
        "reference logits and every layer's resid equal transformers' fp32 forward (bit for bit), from an MXFP4 "
        "checkpoint (blocks dequantized as transformers' integrations/mxfp4.py does) and from plain weights",
        "GGUF written by quantize: gguf-py names and shapes (experts de-interleaved, transposed), re-read as a "
        "model source equal to gguf-fp32",
        "llama.cpp recipe: biases and sinks unquantized, rows of 2880 fall back (llama-quant.cpp)",
        "mxfp4-fp32 equals the reference bit for bit (ggml's quantizer gives the checkpoint's MXFP4 values back)",
        "llamacpp_cpu experts (biases after the matmuls, clamped SwiGLU) equal a float64 model of llama.cpp's",
    ),
)
