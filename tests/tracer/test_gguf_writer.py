"""GGUF files written by moetrace (tracer/weights/gguf_writer.py): gguf-py reads back the kernels' exact bytes."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

import moetrace.kernels as K
from moetrace.errors import MoetraceError
from moetrace.tracer.weights import gguf_writer as gguf_writer
from moetrace.tracer.weights import qcache as qcache
from moetrace.tracer.weights import derive as W


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_source):
    d = tmp_path_factory.mktemp("gguf")
    cache = qcache.QuantCache(d / "quant")
    r = gguf_writer.write_gguf(tiny_source, "q4_k_m", d / "tiny-q4_k_m.gguf", cache=cache)
    return r, cache, gguf.GGUFReader(r.path)


def _reference(source, name):
    L = W.layer_of(name)
    if L < 0:
        return W.global_tensor(source, name)
    return W.gguf_tensors_of_layer(source.layer_state(L), L, W.family_of(source))[name]


def test_names_shapes_and_types_are_llama_cpp_s(written, tiny_source):
    r, _, reader = written
    types = W.file_type_types(tiny_source, "q4_k_m", context=None)
    specs = W.gguf_specs(tiny_source)
    got = {t.name: t for t in reader.tensors}
    assert [t.name for t in reader.tensors] == W.tensor_order(specs)
    for name, spec in specs.items():
        t = got[name]
        assert t.tensor_type.name == types[name], name
        assert tuple(int(x) for x in reversed(t.shape.tolist())) == spec, name  # ne reversed = HF [out, in]
    assert got["blk.2.ffn_down_exps.weight"].tensor_type.name == "Q6_K"  # use_more_bits layer
    assert got["blk.1.ffn_down_exps.weight"].tensor_type.name == "Q4_K"
    assert r.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)


@pytest.mark.parametrize("name", ["output.weight", "token_embd.weight", "blk.0.attn_v.weight",
                                  "blk.0.attn_output.weight", "blk.1.ffn_gate_exps.weight",
                                  "blk.1.ffn_up_exps.weight", "blk.2.ffn_down_exps.weight"])
def test_bytes_equal_the_kernels_quantize_output(written, tiny_source, name):
    _, _, reader = written
    t = {x.name: x for x in reader.tensors}[name]
    w = _reference(tiny_source, name).float()
    mats = w.reshape(-1, w.shape[-2], w.shape[-1])  # (n_mat, rows, cols)
    data = np.asarray(t.data).reshape(mats.shape[0], mats.shape[1], -1)
    for e in sorted({0, mats.shape[0] - 1}):  # first and last expert (all of a 2-D tensor)
        want = K.quantize(mats[e], t.tensor_type.name)
        assert np.array_equal(data[e], want.numpy()), f"{name} expert {e}"
        # gguf-py's own dequantization of the file equals moetrace's.
        theirs = gguf.quants.dequantize(data[e], t.tensor_type)
        assert np.array_equal(theirs, K.dequantize(want, t.tensor_type.name, w.shape[-1]).numpy())


def test_float_tensors_are_the_reference(written, tiny_source):
    _, _, reader = written
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            ref = _reference(tiny_source, t.name).float().numpy()
            assert np.array_equal(np.asarray(t.data).reshape(ref.shape), ref), t.name


def test_metadata_is_qwen3moe(written, tiny_source):
    _, _, reader = written
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    c = tiny_source.config
    assert f["general.architecture"] == "qwen3moe"
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    expect = {
        "block_count": c.num_hidden_layers, "embedding_length": c.hidden_size, "context_length": 4096,
        "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
        "attention.key_length": c.head_dim, "attention.value_length": c.head_dim, "expert_count": c.num_experts,
        "expert_used_count": c.num_experts_per_tok, "expert_feed_forward_length": c.moe_intermediate_size,
        "feed_forward_length": c.intermediate_size, "vocab_size": c.vocab_size,
    }
    for k, v in expect.items():
        assert f[f"qwen3moe.{k}"] == v, k
    assert f["qwen3moe.rope.freq_base"] == pytest.approx(1e6)
    assert f["qwen3moe.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["tokenizer.ggml.model"] == "none"


def test_second_write_copies_cached_bytes(written, tiny_source, tmp_path, monkeypatch):
    r, cache, _ = written
    monkeypatch.setattr(K, "quantize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("quantized again")))
    r2 = gguf_writer.write_gguf(tiny_source, "q4_k_m", tmp_path / "again.gguf", cache=cache)
    assert (r2.quantized, r2.from_cache) == (0, r.quantized)
    assert (tmp_path / "again.gguf").read_bytes() == r.path.read_bytes()


def test_imatrix_is_used_per_expert_and_recorded(written, tiny_source, tmp_path):
    from moetrace.kernels.imatrix import write_imatrix_gguf

    r, cache, _ = written
    name = "blk.3.ffn_up_exps.weight"  # the one entry: every other tensor's bytes come from the cache
    sums = np.random.default_rng(1).uniform(0.5, 2.0, size=(8, 256))
    im_path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(im_path, {name: sums}, {name: np.full(8, 4.0)}, datasets=["synthetic"], chunk_count=3)
    r2 = gguf_writer.write_gguf(tiny_source, "q4_k_m", tmp_path / "im.gguf", imatrix_file=im_path, cache=cache)
    assert (r2.quantized, r2.from_cache) == (1, r.quantized - 1)
    reader = gguf.GGUFReader(r2.path)
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["quantize.imatrix.file"] == str(im_path)
    assert f["quantize.imatrix.entries_count"] == 1 and f["quantize.imatrix.chunks_count"] == 3
    t = {x.name: x for x in reader.tensors}[name]
    w = _reference(tiny_source, name).float()
    im = torch.from_numpy((sums / 4.0).astype(np.float32))
    want = np.stack([K.quantize(w[e], "Q4_K", imatrix=im[e]).numpy() for e in range(w.shape[0])])
    assert np.array_equal(np.asarray(t.data), want)
    assert not np.array_equal(want, np.stack([K.quantize(w[e], "Q4_K").numpy() for e in range(w.shape[0])]))


def test_nan_in_a_checkpoint_names_the_tensor_and_leaves_no_file(tiny_source, tmp_path):
    from safetensors.torch import load_file, save_file

    from moetrace.tracer.sources.checkpoint import open_source

    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny_source.folder / "config.json", folder / "config.json")
    tensors = load_file(str(tiny_source.folder / "model.safetensors"))
    tensors["model.layers.1.mlp.experts.gate_up_proj"][6, 300, 17] = float("inf")  # up half: row 300 - 256
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    src = open_source(str(folder))
    out = tmp_path / "bad.gguf"
    with pytest.raises(MoetraceError, match=r"tensor blk\.1\.ffn_up_exps\.weight .*expert 6, row 44, column 17"):
        gguf_writer.write_gguf(src, "pure_q8_0", out, cache=False)
    assert not out.exists() and not list(tmp_path.glob("bad.gguf.tmp*"))


def test_unknown_file_type_fails_before_writing(tiny_source, tmp_path):
    with pytest.raises(MoetraceError, match="valid file types: q2_k"):
        gguf_writer.write_gguf(tiny_source, "q4_k_x", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert json.dumps(gguf_writer.ftype_id("pure_q4_k")) == "15"
