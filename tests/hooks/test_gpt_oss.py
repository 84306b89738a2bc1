"""GPT-OSS end to end: its MXFP4 checkpoint read exactly, its reference equal to transformers' fp32 forward,
its GGUF layout (gguf-py's names, llama.cpp's convert layout) and llama.cpp's recipe rules, every command.

builtin:tiny-gpt-oss is written as openai/gpt-oss-20b is published: experts as MXFP4 blocks and scales,
``quantization_config.quant_method = "mxfp4"``, the rest BF16; sliding window 8 on alternate layers so a
prompt of a few dozen tokens crosses it.
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

PRESET = "builtin:tiny-gpt-oss"
TEXT = "Experts route tokens; quantization error grows layer by layer, past a sliding window of eight."


def _source(spec=PRESET):
    from moetrace.tracer.sources.checkpoint import open_source

    return open_source(spec)


def _tokens(src):
    from moetrace.tracer.sources.prompts import tokenize

    return tokenize([TEXT], src.tokenizer)


def _hf_forward(folder, toks, **config_changes):
    """transformers' own fp32 forward of the folder (its MXFP4 loader dequantizes the experts itself)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    for k, v in config_changes.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=torch.float32).eval()
    ids = torch.from_numpy(toks.sequences()[0]).unsqueeze(0)
    with torch.no_grad():
        return model(ids, output_hidden_states=True), model


def test_mxfp4_unpacking_equals_transformers():
    """Every code and a wide range of exponents: moetrace's reading equals transformers' integrations/mxfp4.py."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moetrace.tracer.sources.packed import pack_mxfp4, unpack_mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 6, 4, 16), generator=g, dtype=torch.uint8)  # (E, rows, blocks, 16)
    scales = torch.randint(90, 160, (3, 6, 4), generator=g, dtype=torch.uint8)
    # Writing exact values back gives the same values (the built-in presets' writer is faithful).
    ours = unpack_mxfp4(blocks, scales)  # (E, rows, cols) [out, in]
    assert torch.equal(unpack_mxfp4(*pack_mxfp4(ours)), ours)
    scales[0, 0, 0], scales[0, 0, 1] = 1, 254  # the extremes of the normal range
    ours = unpack_mxfp4(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (E, cols, rows): transformers' layout
    assert torch.equal(ours.transpose(1, 2), theirs)


def test_layout_round_trip_and_gguf_names():
    """to_gguf/from_gguf invert each other; every layer tensor is named by gguf-py's gpt-oss table."""
    fam = arch.by_name("gpt_oss")
    src = _source()
    state = src.layer_state(1)
    for key, w in state.items():
        back = fam.from_gguf(key, [p.clone() for p in fam.to_gguf(key, w)])
        assert torch.equal(back, w), key
    gate, up = fam.to_gguf("mlp.experts.gate_up_proj", state["mlp.experts.gate_up_proj"])
    assert torch.equal(gate, state["mlp.experts.gate_up_proj"][:, :, ::2].transpose(1, 2))  # (E, I, H)
    assert torch.equal(up, state["mlp.experts.gate_up_proj"][:, :, 1::2].transpose(1, 2))
    known = {gguf.TENSOR_NAMES[t].format(bid=1) for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT_OSS]}
    names = fam.gguf_layer_names(1, src.config)
    flat = [n for g in names.values() for n in (g if isinstance(g, tuple) else (g,))]
    assert {n.rsplit(".", 1)[0] for n in flat} <= known
    assert names["mlp.experts.down_proj_bias"] == ("blk.1.ffn_down_exps.bias",)
    assert names["self_attn.sinks"] == "blk.1.attn_sinks.weight"
    assert names["mlp.router.bias"] == "blk.1.ffn_gate_inp.bias"


def test_reference_equals_transformers_forward(tmp_path):
    """Logits and every layer's resid (but the last, which transformers reports normed) bit for bit, from the
    MXFP4 checkpoint and from the same weights stored plain (BF16, transformers' own layout)."""
    from safetensors.torch import save_file

    from moetrace.tracer.execution.executor import RunConfig, run_trace

    src = _source()
    toks = _tokens(src)
    assert len(toks.ids) > 2 * src.config.sliding_window  # the window cuts in
    assert src.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    out, model = _hf_forward(src.folder, toks)
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              str(plain / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src.folder / "config.json").read_text())
    del cfg["quantization_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    for i, folder in enumerate((None, plain)):
        s = src if folder is None else _source(str(folder))
        stores = run_trace(s, RunConfig(model=s.model_id, variants=[]), toks, tmp_path / f"run{i}")
        ref = moetrace.open_trace(stores["orig-fp32"])
        assert np.array_equal(ref.logits.sel(mode="free").values, out.logits[0].numpy())
        resid = ref.resid.sel(mode="free").values  # (layer, token, hidden)
        for L in range(resid.shape[0] - 1):
            assert np.array_equal(resid[L], out.hidden_states[L + 1][0].numpy()), (folder, L)
    # The window matters here: without it transformers computes other logits.
    unwindowed, _ = _hf_forward(src.folder, toks, layer_types=["full_attention"] * src.config.num_hidden_layers)
    assert not np.array_equal(unwindowed.logits[0].numpy(), out.logits[0].numpy())


def test_every_mode_and_command(tmp_path):
    """run (free, teacher, routing), diff, decompose, routing, report and audit through the real CLI."""
    out = tmp_path / "traces"
    moetrace_cli("run", "--model", PRESET, "--variant", "q4_k_m-bf16",
                 "--mode", "free", "--mode", "teacher", "--mode", "routing", "--text", TEXT, "--out", str(out),
                 "--run", "g", "-q")
    run = out / "g"
    ref, var = run / "orig-fp32.zarr", run / "q4_k_m-bf16.zarr"
    r, v = moetrace.open_trace(ref), moetrace.open_trace(var)
    assert r.sizes["expert"] == 16 and r.sizes["k"] == 4
    assert np.array_equal(v.topk_idx.sel(mode="routing").values, r.topk_idx.sel(mode="free").values)
    # softmax over the chosen logits: the weights sum to 1 (bf16 rounding aside)
    np.testing.assert_allclose(v.topk_weight.sel(mode="routing").values.sum(-1), 1.0, rtol=1e-2)
    # the router's logits include its bias: the reference's equal x W^T + b of the layer input
    # The analysis commands in this process (click's runner): the run above is the subprocess end to end,
    # and each further interpreter would cost seconds of imports.
    for cmd in (["diff", str(ref), str(var), "--mode", "teacher"],
                ["decompose", str(ref), str(var)], ["routing", str(ref), str(var)],
                ["report", str(run), "--out", str(tmp_path / "report"), "-q", "--resamples", "20"]):
        _cli(*cmd)
    assert (tmp_path / "report" / "index.html").is_file()
    audit = json.loads(_cli("audit", "--model", PRESET, "--variant", "q4_k_m", "--json",
                            "--out", str(tmp_path / "audit.zarr")))
    assert audit


def _cli(*args) -> str:
    """A moetrace command run in this process; its stdout."""
    from click.testing import CliRunner

    from moetrace.cli.main import main

    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 0, (args, res.output, res.exception)
    return res.stdout


def _dequantized_with_gguf_py(path, model):
    """The GGUF file's tensors by gguf-py, laid out as transformers' GptOss holds them, per llama.cpp's
    convert script (conversion/gpt_oss.py): gate/up interleaved back along the last axis, experts transposed."""
    reader = gguf.GGUFReader(str(path))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, model.config.num_hidden_layers)
    data = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        data[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape))
    state = {}
    for key in model.state_dict():
        base, kind = (key[:-len(".weight")], "weight") if key.endswith(".weight") else (key, "weight")
        if key.endswith(".bias"):
            base, kind = key[:-len(".bias")], "bias"
        if base.endswith("_bias"):
            base, kind = base[:-len("_bias")], "bias"
        if base.endswith("gate_up_proj"):
            g = data[tmap.get_name(base.replace("gate_up_proj", "gate_proj")) + "." + kind]
            u = data[tmap.get_name(base.replace("gate_up_proj", "up_proj")) + "." + kind]
            w = torch.stack([g, u], dim=2).flatten(1, 2)  # rows gate0, up0, gate1, ...
            state[key] = w.transpose(1, 2) if kind == "weight" else w
        elif base.endswith("down_proj") and kind == "weight":
            state[key] = data[tmap.get_name(base) + ".weight"].transpose(1, 2)
        else:
            state[key] = data[tmap.get_name(base) + "." + kind]
    return state


def test_quantized_gguf(tmp_path):
    """quantize writes llama.cpp's gpt-oss layout; gguf-py's dequantization in transformers gives gguf-fp32's logits."""
    from moetrace.tracer.weights import derive as W

    src = _source()
    path = tmp_path / "g.gguf"
    moetrace_cli("quantize", "q8_0", "--model", PRESET, "-o", str(path), "-q")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "gpt-oss"
    assert reader.get_field("gpt-oss.expert_count").contents() == 16
    assert reader.get_field("gpt-oss.expert_used_count").contents() == 4
    assert reader.get_field("gpt-oss.attention.sliding_window").contents() == 8
    assert reader.get_field("gpt-oss.rope.scaling.type").contents() == "yarn"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == W.file_type_types(src, "q8_0", context=None)
    for name in ("blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.bias", "blk.0.ffn_gate_exps.bias",
                 "blk.0.ffn_down_exps.bias", "blk.0.attn_q.bias"):
        assert types[name] == "F32", name  # llama-quantize quantizes only 2-D+ tensors ending in 'weight'
    assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0"
    _, model = _hf_forward(src.folder, _tokens(src))
    model.load_state_dict(_dequantized_with_gguf_py(path, model), strict=True)
    ids = torch.from_numpy(_tokens(src).sequences()[0]).unsqueeze(0)
    with torch.no_grad():
        expect = model(ids).logits[0].numpy()
    out = tmp_path / "traces"
    _cli("run", "--model", PRESET, "--gguf", str(path), "--variant", "gguf-fp32", "--mode", "free",
         "--text", TEXT, "--out", str(out), "--run", "g", "-q")
    got = moetrace.open_trace(out / "g" / "gguf-fp32.zarr").logits.sel(mode="free").values
    assert np.array_equal(got, expect), np.abs(got - expect).max()
    # The file as a model source: its config read back from the metadata (YaRN, window), the same logits.
    _cli("run", "--model", str(path), "--variant", "orig-bf16", "--mode", "free", "--text", TEXT,
         "--out", str(out), "--run", "m", "-q")
    assert np.array_equal(moetrace.open_trace(out / "m" / "orig-fp32.zarr").logits.sel(mode="free").values, expect)


def _use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def test_recipe_is_llama_cpp_at_gpt_oss_20b_widths():
    """llama_tensor_get_type (src/llama-quant.cpp at 007dbbf3) for gpt-oss-20b (24 layers, rows of 2880, 32
    experts): rows of 2880 are no multiple of 256, so K types fall back (Q4_K -> Q5_0, Q6_K -> Q8_0; attn_output
    has rows of 64 heads x 64 = 4096 and keeps Q4_K) and the
    output head takes Q8_0; biases, sinks, norms and the router stay F32."""
    from moetrace.tracer.weights import derive as W

    src = W.config_source("builtin:gpt-oss-20b:layers=24")
    assert W.family_of(src).name == "gpt_oss"
    types = W.file_type_types(src, "q4_k_m", context=None)
    n = 24
    for i in range(n):
        more = _use_more_bits(i, n)
        want = {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0" if more else "Q5_0", "attn_output": "Q4_K",
                "ffn_gate_exps": "Q5_0", "ffn_up_exps": "Q5_0", "ffn_down_exps": "Q8_0" if more else "Q5_0"}
        assert {s: types[f"blk.{i}.{s}.weight"] for s in want} == want, i
        for s in ("attn_norm.weight", "post_attention_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp.bias",
                  "attn_sinks.weight", "attn_q.bias", "ffn_gate_exps.bias", "ffn_down_exps.bias"):
            assert types[f"blk.{i}.{s}"] == "F32", (i, s)
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q5_0"


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """One trace of the variants the tests below read: mxfp4-fp32 and q8_0-llamacpp_cpu, free and teacher."""
    from moetrace.tracer.execution.executor import RunConfig, run_trace

    src = _source()
    return run_trace(src, RunConfig(model=src.model_id, variants=["mxfp4-fp32", "q8_0-llamacpp_cpu"],
                                    modes=["free", "teacher"]), _tokens(src), tmp_path_factory.mktemp("engines"))


def test_mxfp4_variant_keeps_the_checkpoint(engine_run):
    """mxfp4-*: ggml's MXFP4 quantizer run on the exactly dequantized experts gives back the checkpoint's values,
    so mxfp4-fp32 equals the reference bit for bit; the checkpoint's own blocks as ggml bytes
    (kernels' from_ocp, what llama.cpp's convert script writes) dequantize to the same values."""
    from safetensors import safe_open

    from moetrace.kernels import dequantize
    from moetrace.kernels.formats_mxfp4 import from_ocp
    from moetrace.tracer.weights import derive as W

    src = _source()
    fam = src.family
    state = src.layer_state(0)
    with safe_open(str(src.folder / "model.safetensors"), "pt") as f:
        p = "model.layers.0.mlp.experts.down_proj"
        own = from_ocp(f.get_tensor(p + "_blocks"), f.get_tensor(p + "_scales"))  # (E, H, bytes) ggml rows
    down = fam.to_gguf("mlp.experts.down_proj", state["mlp.experts.down_proj"])[0].float()  # (E, H, I)
    cols = down.shape[-1]
    assert torch.equal(dequantize(own.reshape(-1, own.shape[-1]), "MXFP4", cols).reshape(down.shape), down)
    requant = W.quantized_bytes(down, "blk.0.ffn_down_exps.weight", "MXFP4")  # ggml's quantizer
    assert torch.equal(dequantize(torch.from_numpy(requant.reshape(-1, requant.shape[-1])), "MXFP4", cols)
                       .reshape(down.shape), down)
    ref, var = moetrace.open_trace(engine_run["orig-fp32"]), moetrace.open_trace(engine_run["mxfp4-fp32"])
    assert np.array_equal(var.resid.sel(mode="free").values, ref.resid.sel(mode="free").values)
    assert np.array_equal(var.logits.sel(mode="free").values, ref.logits.sel(mode="free").values)


# llama.cpp's CPU path against a float64 statement of its algorithm: they differ only in float32 sums.
LLAMACPP_VS_FLOAT64 = 1e-4


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """``x`` (n, cols) through ggml's Q8_0 (the activations' vec_dot_type for Q8_0 weights), as float64."""
    from moetrace.kernels import dequantize, quantize

    return dequantize(quantize(x.float().contiguous(), "Q8_0"), "Q8_0", x.shape[-1]).double()


def test_llamacpp_cpu_computes_the_gpt_oss_experts(engine_run):
    """q8_0-llamacpp_cpu's teacher-forced moe_out of layer 0 equals a float64 model of llama.cpp's gpt-oss experts
    (activations to Q8_0 before each matmul, biases added after it, the clamped SwiGLU, weighted sum), far
    inside what the expert biases alone contribute."""
    from moetrace.tracer.variants import Variant
    from moetrace.tracer.weights import derive as W

    src = _source()
    fam, cfg = src.family, src.config
    toks = _tokens(src)
    v = moetrace.open_trace(engine_run["q8_0-llamacpp_cpu"]).sel(mode="teacher")
    state = src.layer_state(0)
    deq = W.variant_layer_state(state, 0, Variant.parse("q8_0-fp32"), W.tensor_types(src, Variant.parse("q8_0-fp32"),
                                                                                     context=None), family=fam)
    emb = src.tensor("model.embed_tokens.weight").double()[torch.from_numpy(toks.sequences()[0]).long()]  # (T, H)
    h = emb + torch.from_numpy(v.attn_out.values[0]).double()  # the MoE block's residual input (teacher: ref input)
    # the layer's RMSNorm in float32, as transformers computes it: Q8_0 rounds this input, so a float64 norm
    # would move some values across a rounding boundary (a whole Q8_0 step, not a float32 sum's error)
    hf = h.float()
    norm = state["post_attention_layernorm.weight"].float()
    x = (norm * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))).double()  # (T, H)
    gate, up = (p.double() for p in fam.to_gguf("mlp.experts.gate_up_proj", deq["mlp.experts.gate_up_proj"]))
    gb, ub = (p.double() for p in fam.to_gguf("mlp.experts.gate_up_proj_bias", state["mlp.experts.gate_up_proj_bias"]))
    down = fam.to_gguf("mlp.experts.down_proj", deq["mlp.experts.down_proj"])[0].double()  # (E, H, I)
    db = state["mlp.experts.down_proj_bias"].double()
    # layer 0's routing (the router sites' first MoE layer: every GPT-OSS layer is MoE)
    idx, w = torch.from_numpy(v.topk_idx.values[0]).long(), torch.from_numpy(v.topk_weight.values[0]).double()
    xq = _q8_0(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            g = (gate[e] @ xq[t] + gb[e]).clamp(max=cfg.swiglu_limit)
            u = (up[e] @ xq[t] + ub[e]).clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
            act = (u + 1) * g * torch.sigmoid(cfg.swiglu_alpha * g)
            out[t] += w[t, j] * (down[e] @ _q8_0(act[None])[0] + db[e])
    got = torch.from_numpy(v.moe_out.values[0]).double()
    err = float(torch.linalg.vector_norm(got - out) / torch.linalg.vector_norm(out))
    biases = (w[..., None] * db[idx]).sum(1)  # (T, H): what the down biases add
    share = float(torch.linalg.vector_norm(biases) / torch.linalg.vector_norm(out))
    assert err < LLAMACPP_VS_FLOAT64 and share > 100 * LLAMACPP_VS_FLOAT64, (err, share)
