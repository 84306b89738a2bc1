"""Mixtral and OLMoE end to end: sources in both key layouts, every command, GGUF files and llama.cpp's recipes.

Each family is traced from its tiny built-in preset (a real transformers checkpoint folder in the
per-expert layout its released checkpoints ship) and from the same weights in transformers 5's
fused layout; the reference must equal transformers' own fp32 forward of the folder bit for bit.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

import moetrace
from moetrace.errors import MoetraceError
from moetrace.hooks import arch

from cli_runner import moetrace as moetrace_cli

PRESETS = {"mixtral": "builtin:tiny-mixtral", "olmoe": "builtin:tiny-olmoe"}
# What a released checkpoint of the family holds for expert 0's gate and the router of layer 0.
PER_EXPERT_KEYS = {
    "mixtral": ("model.layers.0.block_sparse_moe.experts.0.w1.weight", "model.layers.0.block_sparse_moe.gate.weight"),
    "olmoe": ("model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.gate.weight"),
}
TEXT = "Experts route tokens; quantization error grows layer by layer."


def _source(spec):
    from moetrace.tracer.sources.checkpoint import open_source

    return open_source(spec)


def _tokens(src):
    from moetrace.tracer.sources.prompts import tokenize

    return tokenize([TEXT], src.tokenizer)


def _fused_folder(src, folder):
    """The preset's weights as transformers 5 holds them (fused expert keys), from transformers' own state dict."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.bfloat16)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(src.folder / "config.json", folder / "config.json")
    return folder


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_a_real_checkpoint_of_its_family(name):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = _source(PRESETS[name])
    assert src.family is arch.by_name(name)
    keys = set(safe_open(str(src.folder / "model.safetensors"), "pt").keys())
    assert set(PER_EXPERT_KEYS[name]) <= keys
    assert not any("gate_up_proj" in k for k in keys)
    model, info = AutoModelForCausalLM.from_pretrained(str(src.folder), output_loading_info=True)
    assert type(model).__name__ == src.family.hf_architecture
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_reference_equals_transformers_forward(name, layout, tmp_path):
    """Logits and every layer's resid (but the last, which transformers reports normed) bit for bit."""
    from transformers import AutoModelForCausalLM

    from moetrace.tracer.execution.executor import RunConfig, run_trace

    src = _source(PRESETS[name])
    if layout == "fused":
        src = _source(str(_fused_folder(src, tmp_path / "fused")))
    toks = _tokens(src)
    stores = run_trace(src, RunConfig(model=src.model_id, variants=[]), toks, tmp_path / "run")
    ref = moetrace.open_trace(stores["orig-fp32"])
    model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32).eval()
    ids = torch.from_numpy(toks.sequences()[0]).unsqueeze(0)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert np.array_equal(ref.logits.sel(mode="free").values, out.logits[0].numpy())
    resid = ref.resid.sel(mode="free").values  # (layer, token, hidden)
    for L in range(resid.shape[0] - 1):
        assert np.array_equal(resid[L], out.hidden_states[L + 1][0].numpy()), f"layer {L}"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_mode_and_command(name, tmp_path):
    """run (free, teacher, routing), diff, decompose, routing, report and audit through the real CLI."""
    out = tmp_path / "traces"
    moetrace_cli("run", "--model", PRESETS[name], "--variant", "q4_k_m-bf16", "--variant", "orig-bf16",
                 "--mode", "free", "--mode", "teacher", "--mode", "routing", "--text", TEXT, "--out", str(out),
                 "--run", name, "-q")
    run = out / name
    ref, var = run / "orig-fp32.zarr", run / "q4_k_m-bf16.zarr"
    r, v = moetrace.open_trace(ref), moetrace.open_trace(var)
    fam = arch.by_name(name)
    src = _source(PRESETS[name])
    assert r.sizes["expert"] == fam.n_experts(src.config) and r.sizes["k"] == fam.top_k(src.config)
    assert np.array_equal(v.topk_idx.sel(mode="routing").values, r.topk_idx.sel(mode="free").values)
    w = v.topk_weight.sel(mode="routing").values.sum(-1)
    if fam.routing.norm_always or fam.gguf_config.get("norm_topk_prob"):
        np.testing.assert_allclose(w, 1.0, rtol=1e-2)  # bf16 weights renormalized: within bf16's 2**-8
    else:
        # OLMoE keeps the softmax mass of the chosen experts: at most 1 (plus bf16 rounding), well under it on average
        assert (w <= 1.0 + 2**-7).all() and w.mean() < 0.95, w.mean()
    for cmd in (["diff", str(ref), str(var)], ["diff", str(ref), str(var), "--mode", "teacher"],
                ["decompose", str(ref), str(var)], ["routing", str(ref), str(var)],
                ["report", str(run), "--out", str(tmp_path / "report"), "-q", "--resamples", "20"]):
        moetrace_cli(*cmd)
    assert (tmp_path / "report" / "index.html").is_file()
    audit = moetrace_cli("audit", "--model", PRESETS[name], "--variant", "q4_k_m", "--json",
                         "--out", str(tmp_path / "audit.zarr"))
    assert json.loads(audit.stdout)


def _dequantized_with_gguf_py(path, model):
    """The GGUF file's tensors dequantized by gguf-py, under transformers' names from gguf-py's own name map.

    Independent of moetrace's reader: names from ``gguf.get_tensor_name_map``, values from
    ``gguf.quants.dequantize``, fused gate_up assembled as transformers 5 holds it.
    """
    reader = gguf.GGUFReader(str(path))
    arch_name = reader.get_field("general.architecture").contents()
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    n = model.config.num_hidden_layers
    tmap = gguf.get_tensor_name_map(arch_id, n)
    # llama.cpp's convert script permutes llama's attn_q/attn_k rows; transformers' own tensor
    # processor for the architecture (where it has one) undoes it.
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    heads = {"num_attention_heads": model.config.num_attention_heads,
             "num_key_value_heads": model.config.num_key_value_heads}
    proc = TENSOR_PROCESSORS[arch_name](config=heads) if arch_name in TENSOR_PROCESSORS else None
    data = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape)
        if proc is not None and ("attn_q." in t.name or "attn_k." in t.name):
            w = proc.process(w, t.name).weights
        data[t.name] = torch.from_numpy(np.ascontiguousarray(w))
    state = {}
    for key in model.state_dict():
        base = key[: -len(".weight")] if key.endswith(".weight") else key
        if base.endswith("experts.gate_up_proj"):
            g = tmap.get_name(base.replace("gate_up_proj", "gate_proj"))
            u = tmap.get_name(base.replace("gate_up_proj", "up_proj"))
            state[key] = torch.cat([data[g + ".weight"], data[u + ".weight"]], dim=1)
        else:
            state[key] = data[tmap.get_name(base) + ".weight"]
    return state


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_quantized_gguf(name, tmp_path):
    """quantize writes llama.cpp's layout; gguf-py's dequantization in transformers gives the gguf-fp32 logits."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from moetrace.tracer.weights import derive as W

    fam = arch.by_name(name)
    src = _source(PRESETS[name])
    path = tmp_path / f"{name}.gguf"
    moetrace_cli("quantize", "q4_k_m", "--model", PRESETS[name], "-o", str(path), "-q")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == fam.gguf_arch
    assert reader.get_field(f"{fam.gguf_arch}.expert_count").contents() == fam.n_experts(src.config)
    assert reader.get_field(f"{fam.gguf_arch}.expert_used_count").contents() == fam.top_k(src.config)
    assert reader.get_field(f"{fam.gguf_arch}.feed_forward_length").contents() == fam.expert_width(src.config)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == W.file_type_types(src, "q4_k_m", context=None)
    # transformers' GGUF loader has neither architecture as an MoE (llama maps no expert keys): the
    # independent check is gguf-py's names and dequantization in transformers' own modules.
    assert "olmoe" not in GGUF_SUPPORTED_ARCHITECTURES
    assert "expert_count" not in GGUF_CONFIG_MAPPING["llama"]
    model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32).eval()
    model.load_state_dict(_dequantized_with_gguf_py(path, model), strict=True)
    toks = _tokens(src)
    ids = torch.from_numpy(toks.sequences()[0]).unsqueeze(0)
    with torch.no_grad():
        expect = model(ids).logits[0].numpy()

    out = tmp_path / "traces"
    moetrace_cli("run", "--model", PRESETS[name], "--gguf", str(path), "--variant", "gguf-fp32", "--mode", "free",
                 "--text", TEXT, "--out", str(out), "--run", "g", "-q")
    got = moetrace.open_trace(out / "g" / "gguf-fp32.zarr").logits.sel(mode="free").values
    assert np.array_equal(got, expect), np.abs(got - expect).max()
    # The file as a model source: its family found by architecture and expert count, its reference the same logits.
    moetrace_cli("run", "--model", str(path), "--variant", "orig-bf16", "--mode", "free", "--text", TEXT,
                 "--out", str(out), "--run", "m", "-q")
    assert np.array_equal(moetrace.open_trace(out / "m" / "orig-fp32.zarr").logits.sel(mode="free").values, expect)


def _use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# llama.cpp's llama_tensor_get_type (src/llama-quant.cpp at 007dbbf3) written out per tensor kind:
# (attn_q, attn_k, attn_v, attn_output, gate/up exps, down exps(layer), output, token_embd).
def _mixtral_expect(ft, i, n):
    """Mixtral has 8 experts: attn_v and attn_k Q8_0 for every K/legacy type, attn_output Q5_K below Q5."""
    return {
        "q4_k_m": ("Q4_K", "Q8_0", "Q8_0", "Q5_K", "Q4_K", "Q6_K" if _use_more_bits(i, n) else "Q4_K", "Q6_K", "Q4_K"),
        "q2_k": ("Q2_K", "Q8_0", "Q8_0", "Q5_K", "Q2_K", "Q3_K", "Q6_K", "Q2_K"),
        "q6_k": ("Q6_K", "Q8_0", "Q8_0", "Q6_K", "Q6_K", "Q6_K", "Q6_K", "Q6_K"),
        "q5_k_m": ("Q5_K", "Q8_0", "Q8_0", "Q5_K", "Q5_K", "Q6_K" if _use_more_bits(i, n) else "Q5_K", "Q6_K", "Q5_K"),
    }[ft]


def _olmoe_expect(ft, i, n):
    """OLMoE (64 experts, no GQA): the generic rules; n_gqa 1 keeps q2_k's attn_v at Q3_K."""
    return {
        "q4_k_m": ("Q4_K", "Q4_K", "Q6_K" if _use_more_bits(i, n) else "Q4_K", "Q4_K", "Q4_K",
                   "Q6_K" if _use_more_bits(i, n) else "Q4_K", "Q6_K", "Q4_K"),
        "q2_k": ("Q2_K", "Q2_K", "Q3_K", "Q3_K", "Q2_K", "Q3_K", "Q6_K", "Q2_K"),
        "q6_k": ("Q6_K",) * 8,
        "q5_k_m": ("Q5_K", "Q5_K", "Q6_K" if _use_more_bits(i, n) else "Q5_K", "Q5_K", "Q5_K",
                   "Q6_K" if _use_more_bits(i, n) else "Q5_K", "Q6_K", "Q5_K"),
    }[ft]


@pytest.mark.parametrize("ft", ["q4_k_m", "q2_k", "q6_k", "q5_k_m"])
@pytest.mark.parametrize("name, spec, expect", [
    ("mixtral", "builtin:mixtral-8x7b:layers=32", _mixtral_expect),
    ("olmoe", "builtin:olmoe-1b-7b:layers=16", _olmoe_expect),
])
def test_recipe_is_llama_cpp(name, spec, expect, ft):
    """At the real models' widths and depths (described from the preset: nothing is generated)."""
    from moetrace.tracer.weights import derive as W

    src = W.config_source(spec)
    assert W.family_of(src).name == name
    types = W.file_type_types(src, ft, context=None)
    n = src.config.num_hidden_layers
    for i in range(n):
        q, k, v, o, gu, down, _, _ = expect(ft, i, n)
        got = {s: types[f"blk.{i}.{s}.weight"] for s in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                          "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
        assert got == {"attn_q": q, "attn_k": k, "attn_v": v, "attn_output": o, "ffn_gate_exps": gu,
                       "ffn_up_exps": gu, "ffn_down_exps": down}, (i, got)
        for s in ("attn_norm", "ffn_norm", "ffn_gate_inp"):
            assert types[f"blk.{i}.{s}.weight"] == "F32"
    *_, out, emb = expect(ft, 0, n)
    assert types["output.weight"] == out and types["token_embd.weight"] == emb


def test_recipe_cli_prints_the_family_types():
    p = moetrace_cli("recipe", "q4_k_m", "--model", "builtin:mixtral-8x7b:layers=32")
    line = next(x for x in p.stdout.splitlines() if x.startswith("blk.5.attn_v.weight"))
    assert "Q8_0" in line


def test_llama_gguf_architecture_is_split_by_expert_count(tmp_path):
    """llama.cpp's llama architecture is Mixtral with experts and dense Llama without; a file that
    lacks what the chosen family needs is a one-line error naming the key."""
    path = tmp_path / "dense.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p = moetrace_cli("run", "--model", str(path), "--variant", "orig-bf16", "-q", check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "'llama.embedding_length'" in p.stderr
    moe, dense = arch.by_gguf_arch("llama", n_experts=8), arch.by_gguf_arch("llama", n_experts=0)
    assert moe is arch.by_name("mixtral") and dense.gguf_experts == "dense" and not dense.has_experts
    with pytest.raises(MoetraceError, match="told apart by llama.expert_count") as e:
        arch.by_gguf_arch("llama")
    assert "\n" not in str(e.value)


def test_mixtral_depth_is_never_llama_70b():
    """llama.cpp types a llama file with 8 experts by its layer count as 8x7B/8x22B, never 70B (its attn_v rule)."""
    from moetrace.kernels.recipes import ModelShape

    assert not ModelShape(n_layer=80, n_expert=8, n_head=64, n_head_kv=8, arch="llama").is_70b
    assert ModelShape(n_layer=80, n_expert=0, n_head=64, n_head_kv=8, arch="llama").is_70b
