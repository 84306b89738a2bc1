"""DeepSeek-V3 (and its GGUF architecture deepseek2) end to end.

The tiny preset is a real transformers checkpoint (per-expert keys as released checkpoints ship)
with every mechanism of the family: latent attention with a low-rank query, a dense first layer,
a shared expert, a sigmoid router with a selection bias and group-limited top-k, renormalized and
scaled weights. A second checkpoint, built with transformers' own config class and
``save_pretrained``, has the full query projection of Moonlight and DeepSeek-V2-Lite. Checked: the
reference equals transformers' fp32 forward bit for bit; forcing a choice keeps the router's own
weighting bit for bit; every command runs; ``quantize`` writes llama.cpp's deepseek2 layout, which
gguf-py dequantizes into the gguf-fp32 logits; llama.cpp's recipe rules for the MLA tensors. GLM-4.5
(glm4_moe), which shares the MoE, is checked against transformers and through its glm4moe GGUF file.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

import moetrace
from moetrace.hooks import arch

from cli_runner import moetrace as moetrace_cli

# Two layers (the dense lead layer and one MoE layer) keep the suite fast; every mechanism is in them.
PRESET = "builtin:tiny-deepseek-v3:layers=2"
TEXT = "Latent attention, shared experts and biased groups."


def _source(spec):
    from moetrace.tracer.sources.checkpoint import open_source

    return open_source(spec)


def _full_query_checkpoint(folder):
    """A tiny deepseek_v3 checkpoint with q_lora_rank None (one query projection), from transformers itself."""
    import transformers as T

    torch.manual_seed(0)
    config = T.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2,
        routed_scaling_factor=2.446, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
        max_position_embeddings=256, num_nextn_predict_layers=0, pad_token_id=None, bos_token_id=None,
        eos_token_id=None)
    model = T.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # a trained model's scales; routers with real margins; a selection bias that matters
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
            if name.endswith(".gate.weight"):
                p.normal_(0.0, 0.5)
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(str(folder))
    return folder


def _transformers_forward(folder, ids):
    """(logits (T, V), every decoder layer's output (L, T, H)) of transformers' own fp32 forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    for h in hooks:
        h.remove()
    return logits, np.stack([o[0].numpy() for o in outs])


def test_preset_is_a_real_checkpoint_of_its_family():
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = _source(PRESET)
    fam = arch.by_name("deepseek_v3")
    assert src.family is fam
    keys = set(safe_open(str(src.folder / "model.safetensors"), "pt").keys())
    assert {"model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.1.self_attn.q_a_proj.weight", "model.layers.0.mlp.gate_proj.weight"} <= keys
    assert not any("gate_up_proj" in k for k in keys) and "model.layers.0.mlp.gate.weight" not in keys
    model, info = AutoModelForCausalLM.from_pretrained(str(src.folder), output_loading_info=True)
    assert type(model).__name__ == fam.hf_architecture
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert fam.dense_layers(src.config) == [0] and fam.moe_layers(src.config) == [1]
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert float(bias.abs().max()) > 0  # the selection bias is not the zeros of a fresh model


@pytest.mark.parametrize("query", ["low_rank", "full"])
def test_reference_equals_transformers_forward(query, tmp_path):
    """Logits and every layer's resid, bit for bit; layer 0 dense (mlp_out), the others MoE with shared_out."""
    from moetrace.tracer.execution.executor import RunConfig, run_trace
    from moetrace.tracer.sources.prompts import tokenize

    src = _source(PRESET if query == "low_rank" else str(_full_query_checkpoint(tmp_path / "ckpt")))
    assert bool(getattr(src.config, "q_lora_rank", None)) == (query == "low_rank")
    toks = tokenize([TEXT], src.tokenizer)
    # the block-computing engine path too: kv_b reaches it dense (its GGUF parts are no row blocks of it)
    variants = ["q4_k_m-fp32", "q4_k_m-llamacpp_cpu", "orig-bf16"] if query == "low_rank" else []
    stores = run_trace(src, RunConfig(model=src.model_id, variants=variants, modes=["free"]), toks, tmp_path / "run")
    ref = moetrace.open_trace(stores["orig-fp32"])
    logits, resid = _transformers_forward(src.folder, toks.sequences()[0].tolist())
    assert np.array_equal(ref.logits.sel(mode="free").values, logits)
    assert np.array_equal(ref.resid.sel(mode="free").values, resid)
    assert list(ref.dense_layer.values) == [0] and list(ref.moe_layer.values) == list(range(1, resid.shape[0]))
    assert "shared_out" in ref and not np.isnan(ref.shared_out.values).any()
    if variants:  # the engine computes from the same blocks: it picks the fp32 variant's next token almost always
        fp32, cpu, bf16 = (moetrace.open_trace(stores[v]).logits.sel(mode="free").values for v in variants)
        assert np.isfinite(cpu).all() and (cpu.argmax(-1) == fp32.argmax(-1)).mean() > 0.9
        # orig-bf16 is transformers' own bf16 model, router weight and selection bias kept in float32
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.bfloat16).eval()
        assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
        with torch.no_grad():
            expect = model(torch.tensor([toks.sequences()[0].tolist()])).logits[0].float().numpy()
        assert np.array_equal(bf16, expect), np.abs(bf16 - expect).max()


def test_forced_choice_keeps_the_router_weighting():
    """Forcing a DeepSeek router's own choice on it gives back its own weights, bit for bit: sigmoid
    scores without the selection bias, divided by their sum plus 1e-20, times routed_scaling_factor."""
    import transformers as T
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    fam = arch.by_name("deepseek_v3")
    config = T.DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                routed_scaling_factor=2.5, norm_topk_prob=True)
    router = DeepseekV3TopkRouter(config)
    torch.manual_seed(1)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
        router.e_score_correction_bias.normal_(0.0, 0.3)
    x = torch.randn(7, 32)
    with torch.no_grad():
        out = router(x)
        forced = fam.force_choice(router, out, out[2])
    assert np.array_equal(forced[1].numpy(), out[1].numpy()) and torch.equal(forced[2], out[2])
    # The bias chose: the biased top-k differs from the unbiased one for some token, so the test can fail.
    plain = torch.sigmoid(out[0]).topk(4, dim=-1).indices.sort(-1).values
    assert not torch.equal(plain, out[2].sort(-1).values)
    # Another choice keeps the weighting: unbiased scores, renormalized, scaled by 2.5.
    other = torch.arange(4).expand(7, 4)
    with torch.no_grad():
        w = fam.force_choice(router, out, other)[1]
    np.testing.assert_allclose(w.sum(-1).numpy(), 2.5, rtol=1e-6)  # fp32 rounding of a sum of 4


def _gguf_py_state(path, model):
    """The GGUF file dequantized by gguf-py, under transformers' names, kv_b rebuilt from attn_k_b and attn_v_b.

    Independent of moetrace's reader: names from gguf-py's map, values from ``gguf.quants.dequantize``,
    kv_b as convert_hf_to_gguf's split reversed, written out here.
    """
    reader = gguf.GGUFReader(str(path))
    cfg = model.config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)
    data = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        data[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape).copy())
    state = {}
    for key in model.state_dict():
        if key.endswith("kv_b_proj.weight"):
            k_b = data[tmap.get_name(key.replace("kv_b_proj.weight", "k_b_proj")) + ".weight"]  # (H, r, nope)
            v_b = data[tmap.get_name(key.replace("kv_b_proj.weight", "v_b_proj")) + ".weight"]  # (H, v, r)
            state[key] = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, cfg.kv_lora_rank)
        elif key.endswith("e_score_correction_bias"):
            state[key] = data[tmap.get_name(key.replace("_bias", "")) + ".bias"]
        elif key.endswith("experts.gate_up_proj"):
            g = tmap.get_name(key.replace("gate_up_proj", "gate_proj"))
            u = tmap.get_name(key.replace("gate_up_proj", "up_proj"))
            state[key] = torch.cat([data[g + ".weight"], data[u + ".weight"]], dim=1)
        else:
            base = key[: -len(".weight")] if key.endswith(".weight") else key
            state[key] = data[tmap.get_name(base) + ".weight"]
    return state


def test_quantized_gguf_every_mode_and_command(tmp_path):
    """quantize writes llama.cpp's deepseek2 layout; gguf-py's dequantization in transformers' modules gives
    the gguf-fp32 logits; run (free, teacher, routing with this router's weighting), diff, decompose,
    routing, report and audit through the real CLI; the file read as a model source gives the same logits."""
    from transformers import AutoModelForCausalLM

    from moetrace.tracer.sources.prompts import tokenize
    from moetrace.tracer.weights import derive as W

    src = _source(PRESET)
    path = tmp_path / "ds.gguf"
    moetrace_cli("quantize", "q4_k_m", "--model", PRESET, "-o", str(path), "-q")
    reader = gguf.GGUFReader(str(path))
    field = lambda k: reader.get_field(f"deepseek2.{k}").contents()  # noqa: E731
    assert reader.get_field("general.architecture").contents() == "deepseek2"
    assert (field("expert_count"), field("expert_used_count"), field("expert_shared_count")) == (16, 4, 1)
    assert (field("leading_dense_block_count"), field("expert_group_count"), field("expert_group_used_count")) == (1, 4, 2)
    assert (field("attention.q_lora_rank"), field("attention.kv_lora_rank"), field("attention.head_count_kv")) == (
        256, 256, 1)
    assert (field("attention.key_length_mla"), field("attention.value_length_mla"), field("rope.dimension_count")) == (
        192, 128, 64)
    assert field("expert_gating_func") == 2 and field("expert_weights_scale") == 2.5
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == W.file_type_types(src, "q4_k_m", context=None)
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}
    assert shapes["blk.1.attn_k_b.weight"] == (4, 256, 128) and shapes["blk.1.attn_v_b.weight"] == (4, 128, 256)
    assert "blk.1.attn_kv_b.weight" not in shapes and types["blk.1.exp_probs_b.bias"] == "F32"
    assert "blk.0.ffn_gate.weight" in shapes and "blk.0.ffn_gate_exps.weight" not in shapes
    model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32).eval()
    model.load_state_dict(_gguf_py_state(path, model), strict=True)
    toks = tokenize([TEXT], src.tokenizer)
    with torch.no_grad():
        expect = model(torch.from_numpy(toks.sequences()[0]).unsqueeze(0)).logits[0].numpy()

    out = tmp_path / "traces"
    moetrace_cli("run", "--model", PRESET, "--gguf", str(path), "--variant", "gguf-fp32", "--variant", "q4_k_m-fp32",
                 "--variant", "q4_k_m-bf16",
                 "--mode", "free", "--mode", "teacher", "--mode", "routing", "--text", TEXT, "--out", str(out),
                 "--run", "ds", "-q")
    run = out / "ds"
    ref, var = run / "orig-fp32.zarr", run / "q4_k_m-bf16.zarr"
    g = moetrace.open_trace(run / "gguf-fp32.zarr").logits.sel(mode="free").values
    assert np.array_equal(g, expect), np.abs(g - expect).max()
    # moetrace's own q4_k_m (kv_b split, quantized as attn_k_b/attn_v_b, merged back) is the file's model
    assert np.array_equal(moetrace.open_trace(run / "q4_k_m-fp32.zarr").logits.sel(mode="free").values, g)
    r, v = moetrace.open_trace(ref), moetrace.open_trace(var)
    assert r.sizes["expert"] == 16 and r.sizes["k"] == 4 and list(r.moe_layer.values) == [1]
    assert np.array_equal(v.topk_idx.sel(mode="routing").values, r.topk_idx.sel(mode="free").values)
    # Routing mode keeps this router's weighting of the forced experts: the variant's own sigmoid
    # scores there, divided by their sum plus 1e-20, times 2.5; recomputed here from its router_logits.
    logits = torch.from_numpy(v.router_logits.sel(mode="routing").values.astype(np.float32))
    idx = torch.from_numpy(v.topk_idx.sel(mode="routing").values.astype(np.int64))
    w = torch.sigmoid(logits).gather(-1, idx)
    want = (w / (w.sum(-1, keepdim=True) + 1e-20) * 2.5).numpy()
    np.testing.assert_allclose(v.topk_weight.sel(mode="routing").values, want, rtol=2**-7)  # stored bf16
    for cmd in (["diff", str(ref), str(var), "--mode", "teacher"], ["decompose", str(ref), str(var)],
                ["routing", str(ref), str(var)],
                ["report", str(run), "--out", str(tmp_path / "report"), "-q", "--resamples", "20"]):
        moetrace_cli(*cmd)
    assert (tmp_path / "report" / "index.html").is_file()
    audit = json.loads(moetrace_cli("audit", "--model", PRESET, "--variant", "q4_k_m", "--json",
                                    "--out", str(tmp_path / "audit.zarr")).stdout)
    assert audit
    moetrace_cli("run", "--model", str(path), "--variant", "orig-bf16", "--mode", "free", "--text", TEXT,
                 "--out", str(out), "--run", "m", "-q")
    assert np.array_equal(moetrace.open_trace(out / "m" / "orig-fp32.zarr").logits.sel(mode="free").values, expect)


def _use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(t, row):
    """llama.cpp's tensor_type_fallback for the K types used here."""
    if row % 256 == 0:
        return t
    return {"Q4_K": "Q5_0", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q5_K": "Q5_1"}[t]


@pytest.mark.parametrize("ft", ["q4_k_m", "q2_k", "q6_k"])
def test_recipe_is_llama_cpp_at_moonlight_widths(ft):
    """llama_tensor_get_type (src/llama-quant.cpp at 007dbbf3) at Moonlight-16B-A3B's 27 layers, from the
    preset's description alone: MLA tensors have no rule of their own (the default type, with the row
    fallback: attn_k_b rows of 128), ffn_down and ffn_down_shexp by layer from the name, routers F32."""
    from moetrace.tracer.weights import derive as W

    src = W.config_source("builtin:moonlight-16b-a3b:layers=27")
    assert W.family_of(src).name == "deepseek_v3"
    types = W.file_type_types(src, ft, context=None)
    n = 27
    base = {"q4_k_m": "Q4_K", "q2_k": "Q2_K", "q6_k": "Q6_K"}[ft]

    def down(i):
        if ft == "q2_k":
            return "Q3_K"
        return "Q6_K" if ft == "q6_k" or _use_more_bits(i, n) else base

    attn_out = {"q2_k": "Q3_K"}.get(ft, base)  # 64 experts: not the n_expert == 8 rules
    assert not any("attn_kv_b" in k or "attn_q_a" in k for k in types)  # no low-rank query, no kv_b
    for i in range(n):
        got = {k.split(".", 2)[2]: t for k, t in types.items() if k.startswith(f"blk.{i}.")}
        expect = {"attn_q.weight": base, "attn_kv_a_mqa.weight": base, "attn_k_b.weight": _fallback(base, 128),
                  "attn_v_b.weight": base, "attn_output.weight": attn_out,
                  "attn_norm.weight": "F32", "attn_kv_a_norm.weight": "F32", "ffn_norm.weight": "F32"}
        if i == 0:  # the dense lead layer (width 11264)
            expect.update({"ffn_gate.weight": base, "ffn_up.weight": base, "ffn_down.weight": down(i)})
        else:  # expert rows of 1408 fall back; the shared experts' 2816 do not
            expect.update({"ffn_gate_inp.weight": "F32", "exp_probs_b.bias": "F32",
                           "ffn_gate_exps.weight": base, "ffn_up_exps.weight": base,
                           "ffn_down_exps.weight": _fallback(down(i), 1408),
                           "ffn_gate_shexp.weight": base, "ffn_up_shexp.weight": base,
                           "ffn_down_shexp.weight": down(i)})
        assert got == expect, (i, {k: (got.get(k), expect.get(k)) for k in set(got) | set(expect)
                                   if got.get(k) != expect.get(k)})
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == base


GLM = "builtin:tiny-glm4-moe:layers=2"


def test_glm4_moe_reference_equals_transformers_and_its_gguf(tmp_path):
    """GLM-4.5's tiny preset: a real checkpoint (q/k norms, biases, dense layer 0, shared expert, biased
    routing); the reference equals transformers' fp32 forward bit for bit; ``quantize q8_0`` writes
    llama.cpp's glm4moe layout, whose file read back as a model source gives the same reference."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from moetrace.tracer.execution.executor import RunConfig, run_trace
    from moetrace.tracer.sources.prompts import tokenize

    src = _source(GLM)
    fam = arch.by_name("glm4_moe")
    assert src.family is fam and fam.dense_layers(src.config) == [0]
    keys = set(safe_open(str(src.folder / "model.safetensors"), "pt").keys())
    assert {"model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.q_proj.bias",
            "model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"} <= keys
    _, info = AutoModelForCausalLM.from_pretrained(str(src.folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    toks = tokenize([TEXT], src.tokenizer)
    stores = run_trace(src, RunConfig(model=src.model_id, variants=["q8_0-fp32"], modes=["free"]), toks,
                       tmp_path / "run")
    ref = moetrace.open_trace(stores["orig-fp32"])
    logits, resid = _transformers_forward(src.folder, toks.sequences()[0].tolist())
    assert np.array_equal(ref.logits.sel(mode="free").values, logits)
    assert np.array_equal(ref.resid.sel(mode="free").values, resid)

    path = tmp_path / "glm.gguf"
    moetrace_cli("quantize", "pure_q8_0", "--model", GLM, "-o", str(path), "-q")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "glm4moe"
    names = {t.name for t in reader.tensors}
    assert {"blk.1.exp_probs_b.bias", "blk.1.attn_q.bias", "blk.1.post_attention_norm.weight",
            "blk.1.ffn_down_shexp.weight", "blk.0.ffn_down.weight"} <= names
    assert reader.get_field("glm4moe.rope.dimension_count").contents() == 32
    assert reader.get_field("glm4moe.leading_dense_block_count").contents() == 1
    moetrace_cli("run", "--model", str(path), "--variant", "orig-bf16", "--mode", "free", "--text", TEXT,
                 "--out", str(tmp_path / "t"), "--run", "m", "-q")
    from_file = moetrace.open_trace(tmp_path / "t" / "m" / "orig-fp32.zarr")
    # The file's weights are Q8_0 (pure_q8_0: every matrix), so its reference is the q8_0-fp32 model:
    # equal to moetrace's own q8_0-fp32 variant of the checkpoint, bit for bit.
    q8 = moetrace.open_trace(stores["q8_0-fp32"])
    assert np.array_equal(from_file.logits.sel(mode="free").values, q8.logits.sel(mode="free").values)



def test_glm4_moe_without_qkv_biases_is_no_llama_cpp_file(tmp_path):
    """llama.cpp's glm4moe loader requires attn_{q,k,v}.bias (llama-model.cpp at 00342301d01a): a model without
    them is refused by quantize with a one-line error, while the same model with them writes its file."""
    import copy
    from types import SimpleNamespace

    from moetrace.errors import MoetraceError
    from moetrace.tracer.weights.derive import config_source
    from moetrace.tracer.weights.gguf_writer import write_gguf

    fam = arch.by_name("glm4_moe")
    config = config_source(GLM).config
    assert config.attention_bias and fam.gguf_unwritable(config) is None
    plain = copy.copy(config)
    plain.attention_bias = False
    assert "attention_bias" in fam.gguf_unwritable(plain)
    src = SimpleNamespace(config=plain, family=fam, model_id="glm-without-biases")
    with pytest.raises(MoetraceError, match="cannot be written as a GGUF file: its attention has no q/k/v biases"):
        write_gguf(src, "q8_0", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
