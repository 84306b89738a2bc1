"""Dense layers and shared experts, per family: Qwen2-MoE (shared expert, dense layers), Qwen3-MoE with
``mlp_only_layers``, dense Qwen3 and Llama.

Each family's fixture is a tiny real transformers checkpoint built with its config class and
``save_pretrained``. Checked per family: the recorded reference logits and every layer's ``resid``
equal transformers' own fp32 forward (bit for bit); dense layers store ``mlp_out`` and no routing,
MoE layers routing along ``moe_layer``; a GGUF written by ``moetrace quantize`` loads in
transformers' GGUF loader with logits equal to moetrace's ``gguf-fp32`` variant; the analysis
commands run on the stores.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

import moetrace
from moetrace.errors import MoetraceError
from moetrace.hooks import arch

from cli_runner import moetrace as moetrace_cli

# transformers' GGUF loader and the gguf-fp32 variant dequantize q8_0 bit-exactly as ggml and run the
# same transformers modules in fp32: no tolerance (as tests/tracer/test_gguf_source.py).
GGUF_FP32_VS_TRANSFORMERS = 0.0
TEXT = "Dense and sparse layers."


def _common():
    return dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=256, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                tie_word_embeddings=False)


def _build(kind: str, folder):
    """A tiny checkpoint of ``kind``: (folder, dense layer indices, MoE layer indices)."""
    import transformers as T

    torch.manual_seed(0)
    if kind == "qwen2_moe":  # layer 1 dense through mlp_only_layers; shared expert with its gate
        config = T.Qwen2MoeConfig(**_common(), intermediate_size=96, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                  mlp_only_layers=[1], norm_topk_prob=False)
        cls, dense = T.Qwen2MoeForCausalLM, [1]
    elif kind == "qwen2_moe_all":  # every layer MoE: what llama.cpp's qwen2moe GGUF can hold
        config = T.Qwen2MoeConfig(**_common(), intermediate_size=96, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                  norm_topk_prob=False)
        cls, dense = T.Qwen2MoeForCausalLM, []
    elif kind == "qwen3_moe":  # decoder_sparse_step 2: layers 0 and 2 dense, and 1 MoE
        config = T.Qwen3MoeConfig(**_common(), head_dim=32, intermediate_size=96, moe_intermediate_size=32,
                                  num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2)
        cls, dense = T.Qwen3MoeForCausalLM, [0, 2]
    elif kind == "qwen3":
        config = T.Qwen3Config(**_common(), head_dim=32, intermediate_size=96)
        cls, dense = T.Qwen3ForCausalLM, [0, 1, 2]
    elif kind == "llama":
        config = T.LlamaConfig(**_common(), intermediate_size=96)
        cls, dense = T.LlamaForCausalLM, [0, 1, 2]
    else:
        raise AssertionError(kind)
    model = cls(config).eval()
    with torch.no_grad():  # weights of a trained model's scale, routers with real margins
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
            if name.endswith(".gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(str(folder))
    moe = [i for i in range(config.num_hidden_layers) if i not in dense]
    return folder, dense, moe


def _transformers_forward(folder, ids):
    """(logits (T, V), per-layer outputs (L, T, H)) of transformers' own fp32 forward."""
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


FAMILIES = {"qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "qwen3": "qwen3", "llama": "llama"}


@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen3_moe", "qwen3", "llama"])
def test_reference_equals_transformers_and_layers_are_stored_by_kind(kind, tmp_path):
    folder, dense, moe = _build(kind, tmp_path / kind)
    ids = list(TEXT.encode())
    modes = ["--mode", "free", "--mode", "teacher"] + (["--mode", "routing"] if moe else [])
    t0 = time.monotonic()
    moetrace_cli("run", "--model", str(folder), "--variant", "q8_0-fp32", *modes, "--text", TEXT,
                 "--out", str(tmp_path / "traces"), "--run", kind, "-q")
    print(f"moetrace run {kind}: {time.monotonic() - t0:.1f} s")
    run = tmp_path / "traces" / kind
    ref = moetrace.open_trace(run / "orig-fp32.zarr")
    var = moetrace.open_trace(run / "q8_0-fp32.zarr")

    logits, resid = _transformers_forward(folder, ids)
    assert np.array_equal(ref.logits.sel(mode="free").values, logits)
    assert np.array_equal(ref.resid.sel(mode="free").values, resid)  # every layer, bit for bit

    # dense layers: mlp_out, no routing; MoE layers: routing along moe_layer, with their true indices
    if dense:
        assert list(ref.dense_layer.values) == dense and ref.mlp_out.dims[1] == "dense_layer"
        assert not np.isnan(ref.mlp_out.values).any()
    else:
        assert "mlp_out" not in ref and "dense_layer" not in ref.coords
    if moe:
        assert list(ref.moe_layer.values) == moe
        for name in ("router_logits", "topk_idx", "topk_weight", "moe_out"):
            assert ref[name].dims[1] == "moe_layer" and ref[name].sizes["moe_layer"] == len(moe)
        assert (ref.topk_idx.values >= 0).all() and not np.isnan(ref.router_logits.values).any()
        assert np.array_equal(var.topk_idx.sel(mode="routing").values, ref.topk_idx.sel(mode="free").values)
    else:
        for name in ("router_logits", "topk_idx", "topk_weight", "moe_out", "shared_out"):
            assert name not in ref
    fam = arch.by_model_type(json.loads((folder / "config.json").read_text())["model_type"])
    assert ("shared_out" in ref) == (fam.sites.shared is not None and bool(moe))

    # every analysis command handles the layer kinds: no NaN crash, routing only over MoE layers
    diff = json.loads(moetrace_cli("diff", str(run / "orig-fp32.zarr"), str(run / "q8_0-fp32.zarr"),
                                   "--json").stdout)
    assert [row["layer"] for row in diff["layers"]] == [0, 1, 2]
    moetrace_cli("decompose", str(run / "orig-fp32.zarr"), str(run / "q8_0-fp32.zarr"))
    routing = moetrace_cli("routing", str(run / "orig-fp32.zarr"), str(run / "q8_0-fp32.zarr"), "--json",
                           check=False)
    if moe:
        assert routing.returncode == 0, routing.stderr
        assert [row["layer"] for row in json.loads(routing.stdout)["layers"]] == moe
    else:
        assert routing.returncode == 2 and routing.stderr.count("\n") == 1
        assert "no mixture-of-experts layer" in routing.stderr
    report = moetrace_cli("report", str(run), "--out", str(tmp_path / "report"), check=False)
    assert report.returncode == 0, report.stderr
    assert var.moetrace.headline(ref, n_resamples=50)["figures"]["final_rel_l2"] > 0
    assert float(var.moetrace.diff(ref)["resid_rel_l2_mean"].max()) > 0


@pytest.mark.parametrize("kind", ["qwen2_moe_all", "qwen3", "llama"])
def test_quantized_gguf_loads_in_transformers_equal_to_gguf_variant(kind, tmp_path):
    """``moetrace quantize`` writes a file transformers' own GGUF loader reads (names, shapes, llama's q/k row
    permutation, qwen2moe's shared-expert gate vector) with logits equal to moetrace's gguf-fp32 variant."""
    from transformers import AutoModelForCausalLM

    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate (pip install accelerate)")
    from moetrace.tracer.sources.gguf import GGUFSource

    folder, _, _ = _build(kind, tmp_path / kind)
    path = tmp_path / f"{kind}.gguf"
    moetrace_cli("quantize", "pure_q8_0", "-o", str(path), "--model", str(folder), "-q")
    src = GGUFSource(path)
    assert src.family is arch.by_model_type(src.config.model_type)
    moetrace_cli("run", "--model", str(folder), "--variant", "gguf-fp32", "--gguf", str(path), "--text", TEXT,
                 "--out", str(tmp_path / "traces"), "--run", "g", "-q")
    got = moetrace.open_trace(tmp_path / "traces" / "g" / "gguf-fp32.zarr").logits.sel(mode="free").values
    # transformers' GGUF config mappings lack the expert and shared widths (qwen2moe) and key_length:
    # the config read from the file is passed; the weights are the loader's own.
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 config=src.config).eval()
    with torch.no_grad():
        expect = model(torch.tensor([list(TEXT.encode())])).logits[0].numpy()
    err = float(np.abs(got - expect).max())
    assert err <= GGUF_FP32_VS_TRANSFORMERS, f"max abs diff {err}"


def test_gguf_llama_arch_picks_the_dense_family_by_its_tensors(tmp_path):
    folder, _, _ = _build("llama", tmp_path / "llama")
    path = tmp_path / "llama.gguf"
    moetrace_cli("quantize", "pure_q8_0", "-o", str(path), "--model", str(folder), "-q")
    from moetrace.tracer.sources.gguf import GGUFSource

    assert GGUFSource(path).family.name == "llama"
    assert arch.by_gguf_arch("llama", n_experts=0).name == "llama"


# llama.cpp src/llama-quant.cpp at commit 007dbbf3 (the commit kernels/recipes.py cites), for Q4_K_M:
# use_more_bits(i, n) = i < n/8 || i >= 7*n/8 || (i - n/8) % 3 == 2 in C integer arithmetic; for n = 16:
# i < 2, i >= 14, or (i - 2) % 3 == 2, i.e. these layers. attn_v counts its tensors (layer order), and
# ffn_down takes n_layer = hparams.n_layer_all with i_layer from the name when n_expert > 1 and from
# the ffn_down counter (again the layer, in the loader's layer-then-name order) otherwise.
MORE_BITS_16 = {0, 1, 4, 7, 10, 13, 14, 15}


def _q4_k_m_types(config):
    from moetrace.kernels import recipes

    fam = arch.by_model_type(config.model_type)
    specs, shape = recipes.family_specs(fam, config)
    return recipes.assign_types(specs, "q4_k_m", shape)


def _configs16():
    import transformers as T

    common = dict(_common(), hidden_size=256, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=4)
    return {
        "qwen2_moe": T.Qwen2MoeConfig(**common, intermediate_size=512, moe_intermediate_size=256,
                                      shared_expert_intermediate_size=512, num_experts=4, num_experts_per_tok=2),
        "qwen3_moe": T.Qwen3MoeConfig(**common, head_dim=64, intermediate_size=512, moe_intermediate_size=256,
                                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0, 5]),
        "llama": T.LlamaConfig(**common, intermediate_size=512),
    }


def test_recipe_shared_expert_tensors_follow_llama_cpp():
    """qwen2moe Q4_K_M: ffn_down_shexp falls in llama.cpp's FFN_DOWN category by substring, its layer read from
    the name as for ffn_down_exps (n_expert > 1), so both take Q6_K on the use_more_bits layers; the shared
    gate and up projections stay at the default type; the shared gate vector (1-D) and the router are never
    quantized, nor the q/k/v biases."""
    types = _q4_k_m_types(_configs16()["qwen2_moe"])
    for i in range(16):
        down = "Q6_K" if i in MORE_BITS_16 else "Q4_K"
        assert types[f"blk.{i}.ffn_down_shexp.weight"] == down, i
        assert types[f"blk.{i}.ffn_down_exps.weight"] == down, i
        assert types[f"blk.{i}.attn_v.weight"] == down, i
        for name in ("ffn_gate_shexp", "ffn_up_shexp", "ffn_gate_exps", "ffn_up_exps", "attn_q", "attn_k",
                     "attn_output"):
            assert types[f"blk.{i}.{name}.weight"] == "Q4_K", (i, name)
        for name in ("ffn_gate_inp_shexp.weight", "ffn_gate_inp.weight", "attn_q.bias", "attn_k.bias",
                     "attn_v.bias"):
            assert types[f"blk.{i}.{name}"] == "F32", (i, name)
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"


def test_recipe_dense_layers_follow_llama_cpp():
    """A dense layer's ffn_down in an MoE model (Qwen3-MoE mlp_only_layers) takes its layer from the name; a
    dense model's ffn_down from the counter, which is the layer again: Q6_K on the use_more_bits layers."""
    cfg = _configs16()
    moe = _q4_k_m_types(cfg["qwen3_moe"])
    for i in range(16):
        down = "Q6_K" if i in MORE_BITS_16 else "Q4_K"
        stem = "ffn_down" if i in (0, 5) else "ffn_down_exps"
        assert moe[f"blk.{i}.{stem}.weight"] == down, i
        if i in (0, 5):
            assert moe[f"blk.{i}.ffn_gate.weight"] == moe[f"blk.{i}.ffn_up.weight"] == "Q4_K"
            assert f"blk.{i}.ffn_down_exps.weight" not in moe and f"blk.{i}.ffn_gate_inp.weight" not in moe
    dense = _q4_k_m_types(cfg["llama"])
    for i in range(16):
        down = "Q6_K" if i in MORE_BITS_16 else "Q4_K"
        assert dense[f"blk.{i}.ffn_down.weight"] == dense[f"blk.{i}.attn_v.weight"] == down, i
        assert dense[f"blk.{i}.ffn_gate.weight"] == dense[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert dense[f"blk.{i}.attn_k.weight"] == dense[f"blk.{i}.attn_output.weight"] == "Q4_K"


def test_recipe_small_rows_fall_back_as_llama_cpp():
    """Rows of 32 and 64 are no multiple of 256: tensor_type_fallback turns Q4_K into Q5_0 and Q6_K into Q8_0.
    With 3 layers use_more_bits holds for layer 2 alone (n/8 = 0, 7n/8 = 2 in integers)."""
    import transformers as T

    types = _q4_k_m_types(T.Qwen2MoeConfig(**_common(), intermediate_size=96, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2))
    for i in range(3):
        down = "Q8_0" if i == 2 else "Q5_0"
        assert types[f"blk.{i}.ffn_down_shexp.weight"] == types[f"blk.{i}.ffn_down_exps.weight"] == down, i
        assert types[f"blk.{i}.ffn_gate_shexp.weight"] == types[f"blk.{i}.ffn_up_exps.weight"] == "Q5_0", i
        assert types[f"blk.{i}.ffn_gate_inp_shexp.weight"] == "F32"


def test_models_lists_every_family():
    out = moetrace_cli("models").stdout
    for fam in arch.families():
        assert f"{fam.name}: model type {'/'.join(fam.model_types)}, GGUF {fam.gguf_arch}" in out


def test_qwen3_moe_with_dense_layers_cannot_be_a_qwen3moe_gguf(tmp_path):
    folder, _, _ = _build("qwen3_moe", tmp_path / "q3")
    r = moetrace_cli("quantize", "pure_q8_0", "-o", str(tmp_path / "x.gguf"), "--model", str(folder), "-q",
                     check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "dense" in r.stderr
