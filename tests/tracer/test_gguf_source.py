"""GGUF files as model sources and as the weights of the gguf-* variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_files import mixed_types, write_gguf

import moetrace
from moetrace.errors import MoetraceError
from moetrace.tracer.execution.executor import RunConfig, run_trace
from moetrace.tracer.sources.gguf import GGUFSource
from moetrace.tracer.sources.checkpoint import open_source

# transformers' GGUF loader and moetrace's gguf-fp32 variant are compared without tolerance:
# both dequantize bit-exactly as ggml does (gguf-py's numpy code there, moetrace.kernels here)
# and run the same transformers decoder modules in fp32 on the same tokens, so any difference
# at all means a name, a layout or a dequantizer is wrong.
GGUF_FP32_VS_TRANSFORMERS = 0.0
TINY2 = "builtin:tiny:layers=2"


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, tiny_source):
    d = tmp_path_factory.mktemp("gguf")
    write_gguf(tiny_source, d / "f32.gguf")
    write_gguf(tiny_source, d / "mixed.gguf", mixed_types(tiny_source))
    return d


def test_f32_file_reads_as_the_checkpoint(gguf_files, tiny_source):
    """Architecture, hyperparameters and every tensor come back under HF names, shapes and values."""
    src = open_source(str(gguf_files / "f32.gguf"))
    assert isinstance(src, GGUFSource)
    for key in ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
                "tie_word_embeddings"):
        assert getattr(src.config, key) == getattr(tiny_source.config, key), key
    assert src.config.rope_parameters["rope_theta"] == tiny_source.config.rope_parameters["rope_theta"]
    for L in range(src.num_layers):
        got, want = src.layer_state(L), tiny_source.layer_state(L)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k].float()), f"layer {L} {k}"
    for hf in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(src.tensor(hf), tiny_source.tensor(hf).float()), hf


def test_quantized_tensors_dequantize_expert_by_expert(gguf_files, tiny_source):
    """Quantized 3-D expert tensors equal moetrace.kernels' dequantization of the whole tensor."""
    import gguf

    from moetrace.kernels import dequantize

    src = GGUFSource(gguf_files / "mixed.gguf")
    reader = gguf.GGUFReader(str(gguf_files / "mixed.gguf"))
    raw = {t.name: t for t in reader.tensors}
    state = src.layer_state(1)
    gate, up = raw["blk.1.ffn_gate_exps.weight"], raw["blk.1.ffn_up_exps.weight"]  # Q4_K, BF16
    e, i, h = tuple(reversed(gate.shape.tolist()))
    want_gate = dequantize(torch.from_numpy(np.array(gate.data)).reshape(e * i, -1), "Q4_K", h).reshape(e, i, h)
    want_up = torch.from_numpy(np.array(up.data).view(np.int16)).view(torch.bfloat16).float().reshape(e, i, h)
    assert torch.equal(state["mlp.experts.gate_up_proj"], torch.cat([want_gate, want_up], dim=1))
    assert state["self_attn.k_proj.weight"].dtype == torch.float32  # Q8_0, dequantized
    assert src.layer_state(0)["self_attn.o_proj.weight"].dtype == torch.float16  # F16, as stored
    assert src.ggml_types()["blk.1.ffn_up_exps.weight"] == "BF16"


@pytest.fixture(scope="module")
def quantize_file(tmp_path_factory):
    """A Q4_K_M file written by `moetrace quantize` (tracer/weights/gguf_writer.py) of a 2-layer tiny model."""
    writer = pytest.importorskip("moetrace.tracer.weights.gguf_writer")
    path = tmp_path_factory.mktemp("quantize") / "tiny2-q4_k_m.gguf"
    writer.write_gguf(open_source(TINY2), "q4_k_m", path, cache=False)
    return path


@pytest.mark.parametrize("which", ["test-writer", "moetrace-quantize"])
def test_gguf_fp32_equals_transformers_gguf_loader(which, gguf_files, request, tiny_tokens, tmp_path):
    """Independent check: transformers' own GGUF loader gives the gguf-fp32 variant's logits.

    Two files: one written here with gguf-py's GGUFWriter (K-quants, Q8_0, F16, BF16, F32), and
    a Q4_K_M file written by `moetrace quantize`.
    """
    from transformers import AutoModelForCausalLM

    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate (pip install accelerate)")
    if which == "test-writer":
        path, model = gguf_files / "mixed.gguf", "builtin:tiny"
    else:
        path, model = request.getfixturevalue("quantize_file"), TINY2
    stores = run_trace(open_source(model), RunConfig(model=model, variants=["gguf-fp32"], gguf=str(path),
                                                     sites=["logits"]),
                       tiny_tokens, tmp_path / "run")
    logits = moetrace.open_trace(stores["gguf-fp32"]).logits.sel(mode="free").values
    # transformers' qwen3_moe GGUF config mapping has no expert_feed_forward_length (it would build
    # experts 768 wide), so the config is passed; the weights are its own: names, fusion, dequantization.
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 config=GGUFSource(path).config).eval()
    for s, ids in enumerate(tiny_tokens.sequences()):
        with torch.no_grad():
            expect = model(torch.from_numpy(ids).unsqueeze(0)).logits[0].numpy()
        got = logits[tiny_tokens.seq == s]
        err = float(np.abs(got - expect).max())
        assert err <= GGUF_FP32_VS_TRANSFORMERS, f"sequence {s}: max abs diff {err}"


def test_gguf_model_source_runs_and_matches_gguf_variant(gguf_files, tiny_tokens, tmp_path):
    """--model FILE.gguf traces the file as the reference; equal to the gguf-fp32 variant of the same file."""
    path = str(gguf_files / "mixed.gguf")
    src = open_source(path)
    a = run_trace(src, RunConfig(model=path, variants=["orig-bf16"], sites=["resid", "logits"]), tiny_tokens,
                  tmp_path / "a")
    b = run_trace(open_source("builtin:tiny"), RunConfig(model="builtin:tiny", variants=["gguf-fp32", "gguf-bf16"],
                                                         gguf=path, sites=["resid", "logits"]), tiny_tokens,
                  tmp_path / "b")
    ref, var = moetrace.open_trace(a["orig-fp32"]), moetrace.open_trace(b["gguf-fp32"])
    assert np.array_equal(ref.resid.values, var.resid.values)
    assert np.array_equal(ref.logits.values, var.logits.values)
    bf16 = moetrace.open_trace(b["gguf-bf16"]).logits.values
    rel = np.linalg.norm(bf16 - var.logits.values) / np.linalg.norm(var.logits.values)
    assert 0 < rel < 0.1  # bf16 compute of the same weights: close, not equal


def test_gguf_shape_mismatch_names_first_tensor(gguf_files, tiny_source, tmp_path):
    def narrower(name, t):
        return t[:, :128] if name == "blk.2.attn_q.weight" else t

    bad = tmp_path / "bad.gguf"
    write_gguf(tiny_source, bad, edit=narrower)
    cfg = RunConfig(model="builtin:tiny", variants=["gguf-bf16"], gguf=str(bad))
    # The file contradicts its own metadata, so it is refused on open, before check_matches.
    with pytest.raises(MoetraceError, match=r"tensor blk\.2\.attn_q\.weight is \(256, 128\), its metadata "
                                            r"makes it \(256, 256\)"):
        run_trace(tiny_source, cfg, None, tmp_path / "run")
    assert not (tmp_path / "run" / "gguf-bf16.zarr").exists()  # checked before any store is written

    missing = tmp_path / "missing.gguf"
    write_gguf(tiny_source, missing, edit=lambda n, t: None if n == "blk.3.ffn_down_exps.weight" else t)
    with pytest.raises(MoetraceError, match=r"lacks tensor blk\.3\.ffn_down_exps\.weight \(8, 256, 256\), which "
                                            r"qwen3_moe needs"):
        GGUFSource(missing)


def test_gguf_variant_needs_a_file():
    with pytest.raises(MoetraceError, match="give --gguf FILE"):
        RunConfig(model="builtin:tiny", variants=["gguf-bf16"])
    with pytest.raises(MoetraceError, match="no variant uses it"):
        RunConfig(model="builtin:tiny", variants=["orig-bf16"], gguf="x.gguf")


def test_unsupported_architecture_lists_supported(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "bert")  # an architecture no family serves
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # The message lists the registered families (redesigned with the family registry).
    with pytest.raises(MoetraceError, match=r"architecture 'bert' .* not supported; supported families: "
                                            r".*qwen3_moe \(model type qwen3_moe, GGUF qwen3moe\)"):
        open_source(str(tmp_path / "llama.gguf"))


def test_corrupted_and_truncated_files_are_named(gguf_files, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(MoetraceError, match=r"cannot read GGUF file '.*junk\.gguf': it does not start with the GGUF"):
        GGUFSource(junk)
    data = (gguf_files / "f32.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MoetraceError,
                       match=r"'.*cut\.gguf': it is truncated: tensor blk\.\d+\.\w+\.weight needs bytes"):
        GGUFSource(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(MoetraceError, match=r"cannot read GGUF file '.*head\.gguf'"):
        GGUFSource(head)
    with pytest.raises(MoetraceError, match="does not exist"):
        GGUFSource(tmp_path / "absent.gguf")
