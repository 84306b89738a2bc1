"""GGUF hyperparameters of llama.cpp's ``deepseek2`` architecture (multi-head latent attention), both ways.

What convert_hf_to_gguf.py's ``DeepseekV2Model.set_gguf_parameters`` writes (ggml-org/llama.cpp),
on top of the generic MoE keys of :mod:`.gguf_meta`: the latent form of attention as llama.cpp
runs it (MQA with one KV head of ``kv_lora_rank + qk_rope_head_dim`` keys and ``kv_lora_rank``
values, the per-head widths in ``key_length_mla``/``value_length_mla``), the ranks, the dense
lead layers, the shared-expert count, the router's scale, sigmoid gating and groups, and the rotary
width. Read back, the same keys make a transformers config of the family's model type.
"""

from __future__ import annotations

from moetrace.errors import MoetraceError
from moetrace.hooks.arch.gguf_meta import _f32

SIGMOID = 2  # gguf.ExpertGatingFuncType.SIGMOID, llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


def write_mla_hparams(family, config, generic: list[tuple]) -> list[tuple]:
    """``generic`` (the MoE family's keys) with the MLA keys replacing the per-head ones."""
    import gguf

    V, K, A, R = gguf.GGUFValueType, gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    key = lambda tmpl: tmpl.format(arch=family.gguf_arch)  # noqa: E731
    c, d = config, family.dims(config)
    replaced = {key(A.HEAD_COUNT_KV), key(A.KEY_LENGTH), key(A.VALUE_LENGTH),
                key(K.EXPERT_SHARED_FEED_FORWARD_LENGTH)}
    kv = [e for e in generic if e[0] not in replaced]
    kv += [
        (key(A.HEAD_COUNT_KV), 1, V.UINT32),  # MLA runs as MQA over the latent
        (key(K.LEADING_DENSE_BLOCK_COUNT), int(getattr(c, "first_k_dense_replace", 0) or 0), V.UINT32),
        (key(A.KV_LORA_RANK), d["kv_lora"], V.UINT32),
        (key(A.KEY_LENGTH), d["kv_lora"] + d["qk_rope"], V.UINT32),
        (key(A.VALUE_LENGTH), d["kv_lora"], V.UINT32),
        (key(A.KEY_LENGTH_MLA), d["qk_nope"] + d["qk_rope"], V.UINT32),
        (key(A.VALUE_LENGTH_MLA), d["v_head"], V.UINT32),
        (key(K.EXPERT_SHARED_COUNT), d["n_shared"], V.UINT32),
        (key(K.EXPERT_WEIGHTS_SCALE), float(c.routed_scaling_factor), V.FLOAT32),
        (key(K.EXPERT_GATING_FUNC), SIGMOID, V.UINT32),
        (key(K.EXPERT_GROUP_COUNT), int(c.n_group), V.UINT32),
        (key(K.EXPERT_GROUP_USED_COUNT), int(c.topk_group), V.UINT32),
        (key(R.DIMENSION_COUNT), d["qk_rope"], V.UINT32),
    ]
    if d["q_lora"]:
        kv.append((key(A.Q_LORA_RANK), d["q_lora"], V.UINT32))
    return kv


def read_mla_config(family, field, tensors: dict, where: str):
    """A transformers config of ``family`` from a deepseek2 GGUF file's metadata and tensor table.

    Raises:
        MoetraceError: a missing required key or tensor, or a gating function other than sigmoid.
    """
    import gguf
    from transformers import AutoConfig

    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    key = lambda tmpl: tmpl.format(arch=family.gguf_arch)  # noqa: E731
    req = lambda tmpl: field(key(tmpl), required=True)  # noqa: E731
    opt = lambda tmpl, default=None: field(key(tmpl), default=default)  # noqa: E731
    embd = family.global_names["model.embed_tokens.weight"]
    if embd not in tensors:
        raise MoetraceError(f"GGUF file {where!r} has no {embd} tensor")
    gating = int(opt(K.EXPERT_GATING_FUNC, SIGMOID))
    if gating != SIGMOID:
        raise MoetraceError(f"GGUF file {where!r}: {key(K.EXPERT_GATING_FUNC)} is {gating}; family {family.name} "
                            f"routes with sigmoid scores ({SIGMOID})")
    scaling = opt(R.SCALING_TYPE)
    if scaling not in (None, "none"):
        raise MoetraceError(f"GGUF file {where!r} uses RoPE scaling {scaling!r}, which moetrace does not support yet")
    rope = int(req(R.DIMENSION_COUNT))
    heads = int(req(A.HEAD_COUNT))
    q_lora = opt(A.Q_LORA_RANK)
    d = {
        "architectures": [family.hf_architecture],
        "vocab_size": int(tensors[embd].shape[-1]),  # ne = (hidden, vocab)
        "hidden_size": int(req(K.EMBEDDING_LENGTH)),
        "intermediate_size": int(req(K.FEED_FORWARD_LENGTH)),
        "moe_intermediate_size": int(req(K.EXPERT_FEED_FORWARD_LENGTH)),
        "num_hidden_layers": int(req(K.BLOCK_COUNT)),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,  # transformers' MLA expands the latent to every head
        "n_routed_experts": int(req(K.EXPERT_COUNT)),
        "num_experts_per_tok": int(req(K.EXPERT_USED_COUNT)),
        "n_shared_experts": int(opt(K.EXPERT_SHARED_COUNT, 0)),
        "routed_scaling_factor": _f32(opt(K.EXPERT_WEIGHTS_SCALE, 1.0)),
        "norm_topk_prob": bool(opt(K.EXPERT_WEIGHTS_NORM, False)),
        "n_group": int(opt(K.EXPERT_GROUP_COUNT, 1)),
        "topk_group": int(opt(K.EXPERT_GROUP_USED_COUNT, 1)),
        "first_k_dense_replace": int(opt(K.LEADING_DENSE_BLOCK_COUNT, 0)),
        "q_lora_rank": int(q_lora) if q_lora else None,
        "kv_lora_rank": int(req(A.KV_LORA_RANK)),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": int(req(A.KEY_LENGTH_MLA)) - rope,
        "v_head_dim": int(req(A.VALUE_LENGTH_MLA)),
        "max_position_embeddings": int(opt(K.CONTEXT_LENGTH, 4096)),
        "rms_norm_eps": _f32(req(A.LAYERNORM_RMS_EPS)),
        "rope_parameters": {"rope_type": "default", "rope_theta": _f32(opt(R.FREQ_BASE, 10000.0))},
        "tie_word_embeddings": family.global_names["lm_head.weight"] not in tensors,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    d.update(family.gguf_config)
    return AutoConfig.for_model(family.model_types[0], **d)
