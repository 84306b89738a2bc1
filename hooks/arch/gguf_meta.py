"""A family's GGUF hyperparameters in both directions: written from a transformers config, read back into one.

The keys are gguf-py's (``gguf.Keys.LLM``, ``gguf.Keys.Attention``, ``gguf.Keys.Rope``) with the
family's architecture name filled in; the config keys of the MoE facts come from the family
(:class:`~moetrace.hooks.arch.family.ConfigKeys`), so one table serves every MoE family. What
convert_hf_to_gguf.py writes for an MoE model (``set_gguf_parameters``); the keys transformers'
GGUF loader reads are all present. Its mapping has no key for the expert width: llama.cpp's
``expert_feed_forward_length`` is written, and read back here.
"""

from __future__ import annotations

import numpy as np

from moetrace.errors import MoetraceError


def _f32(value) -> float:
    # GGUF stores these as float32: 1e-6 comes back as 9.99999997e-07. The shortest decimal
    # that rounds to the same float32 gives the value the checkpoint's config.json had.
    return float(str(np.float32(value)))


def _rope(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def write_hparams(family, config) -> list[tuple]:
    """The architecture's key-value pairs, ``(key, value, gguf.GGUFValueType)``, in convert_hf_to_gguf's order.

    Raises:
        MoetraceError: a RoPE scaling that has no GGUF encoding (valid: linear, yarn).
    """
    import gguf

    V, K, A = gguf.GGUFValueType, gguf.Keys.LLM, gguf.Keys.Attention
    key = lambda tmpl: tmpl.format(arch=family.gguf_arch)  # noqa: E731
    c, d = config, family.dims(config)
    theta, rope = _rope(c)
    kv: list[tuple] = [
        (key(K.CONTEXT_LENGTH), int(c.max_position_embeddings), V.UINT32),
        (key(K.EMBEDDING_LENGTH), d["hidden"], V.UINT32),
        (key(K.FEED_FORWARD_LENGTH), d["ffn_width"] or 3 * d["expert_width"], V.UINT32),
        (key(K.BLOCK_COUNT), int(c.num_hidden_layers), V.UINT32),
        (key(A.HEAD_COUNT), int(c.num_attention_heads), V.UINT32),
        (key(A.HEAD_COUNT_KV), int(c.num_key_value_heads), V.UINT32),
        (key(gguf.Keys.Rope.FREQ_BASE), theta, V.FLOAT32),
        (key(A.LAYERNORM_RMS_EPS), float(c.rms_norm_eps), V.FLOAT32),
        (key(A.KEY_LENGTH), d["head_dim"], V.UINT32),
        (key(A.VALUE_LENGTH), d["head_dim"], V.UINT32),
    ]
    if family.has_experts:  # a dense family (Qwen3, Llama) writes no expert keys, as convert_hf_to_gguf
        kv += [(key(K.EXPERT_COUNT), d["experts"], V.UINT32), (key(K.EXPERT_USED_COUNT), family.top_k(c), V.UINT32),
               (key(K.EXPERT_FEED_FORWARD_LENGTH), d["expert_width"], V.UINT32)]
    if family.keys.norm_topk:
        kv.append((key(K.EXPERT_WEIGHTS_NORM), bool(getattr(c, family.keys.norm_topk, True)), V.BOOL))
    if d["shared_width"]:
        kv.append((key(K.EXPERT_SHARED_FEED_FORWARD_LENGTH), d["shared_width"], V.UINT32))
    for suffix, cfg_key, vtype in family.gguf_extra:
        kv.append((f"{family.gguf_arch}.{suffix}", getattr(c, cfg_key), V[vtype]))
    kv.append((key(K.VOCAB_SIZE), d["vocab"], V.UINT32))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        if rope_type not in ("linear", "yarn"):
            raise MoetraceError(f"RoPE scaling {rope_type!r} has no GGUF encoding in moetrace; supported: linear, yarn")
        kv.append((key(gguf.Keys.Rope.SCALING_TYPE), rope_type, V.STRING))
        kv.append((key(gguf.Keys.Rope.SCALING_FACTOR), float(rope["factor"]), V.FLOAT32))
        if "original_max_position_embeddings" in rope:
            kv.append((key(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN), int(rope["original_max_position_embeddings"]),
                       V.UINT32))
    return kv


def read_config(family, field, tensors: dict, where: str):
    """A transformers config from a GGUF file's metadata and tensor table.

    Args:
        family: the file's family.
        field: ``field(key, required=False, default=None)`` reading one metadata value.
        tensors: GGUF tensor name -> gguf-py ReaderTensor (``shape`` is ggml's ``ne``).
        where: the file, for messages.

    Raises:
        MoetraceError: a missing required key or tensor, or RoPE scaling moetrace does not support.
    """
    import gguf
    from transformers import AutoConfig

    K, A = gguf.Keys.LLM, gguf.Keys.Attention
    key = lambda tmpl: tmpl.format(arch=family.gguf_arch)  # noqa: E731
    req = lambda tmpl: field(key(tmpl), required=True)  # noqa: E731
    opt = lambda tmpl, default=None: field(key(tmpl), default=default)  # noqa: E731
    hidden = int(req(K.EMBEDDING_LENGTH))
    heads = int(req(A.HEAD_COUNT))
    embd = family.global_names["model.embed_tokens.weight"]
    if embd not in tensors:
        raise MoetraceError(f"GGUF file {where!r} has no {embd} tensor")
    vocab = int(tensors[embd].shape[-1])  # ne = (hidden, vocab)
    expert_ff = opt(K.EXPERT_FEED_FORWARD_LENGTH)
    gate = tensors.get(f"blk.0.{family.expert_stems.get('gate', '')}.weight")
    if expert_ff is None and gate is not None:
        expert_ff = int(gate.shape[1])  # ne = (hidden, I, E)
    if expert_ff is None and family.has_experts:
        raise MoetraceError(f"GGUF file {where!r} lacks {key(K.EXPERT_FEED_FORWARD_LENGTH)}")
    scaling = opt(gguf.Keys.Rope.SCALING_TYPE)
    if scaling not in (None, "none", "yarn"):
        raise MoetraceError(f"GGUF file {where!r} uses RoPE scaling {scaling!r}, which moetrace does not support yet; "
                            f"supported: none, yarn")
    k = family.keys
    d = {
        "architectures": [family.hf_architecture],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(opt(K.FEED_FORWARD_LENGTH) if not family.has_experts else
                                 opt(K.FEED_FORWARD_LENGTH, 3 * int(expert_ff))),
        "num_hidden_layers": int(req(K.BLOCK_COUNT)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(opt(A.HEAD_COUNT_KV, heads)),
        "head_dim": int(opt(A.KEY_LENGTH, hidden // heads)),
        "max_position_embeddings": int(opt(K.CONTEXT_LENGTH, 4096)),
        "rms_norm_eps": _f32(req(A.LAYERNORM_RMS_EPS)),
        "rope_parameters": {"rope_type": "default", "rope_theta": _f32(opt(gguf.Keys.Rope.FREQ_BASE, 1_000_000.0))},
        "tie_word_embeddings": family.global_names["lm_head.weight"] not in tensors,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if family.has_experts:
        d.update({k.expert_width: int(expert_ff), k.experts: int(req(K.EXPERT_COUNT)),
                  k.top_k: int(req(K.EXPERT_USED_COUNT))})
    if k.shared_width:
        d[k.shared_width] = int(opt(K.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0))
    if scaling == "yarn":
        d["rope_parameters"].update({"rope_type": "yarn", "factor": _f32(req(gguf.Keys.Rope.SCALING_FACTOR)),
                                     "original_max_position_embeddings": int(req(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN))})
    for suffix, cfg_key, _ in family.gguf_extra:
        value = field(f"{family.gguf_arch}.{suffix}")
        if value is not None:
            d[cfg_key] = value
    fixed = dict(family.gguf_config)
    # A family's fixed RoPE details (GPT-OSS's YaRN without truncation) join what the file says.
    d["rope_parameters"].update(fixed.pop("rope_parameters", {}) if scaling == "yarn" else {})
    fixed.pop("rope_parameters", None)
    d.update(fixed)
    return AutoConfig.for_model(family.model_types[0], **d)
