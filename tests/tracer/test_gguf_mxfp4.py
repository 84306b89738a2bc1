"""MXFP4 tensors in GGUF files: moetrace's writer (file type mxfp4_moe) and reader, against gguf-py."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import moetrace.kernels as K
from moetrace.tracer.sources.gguf import GGUFSource
from moetrace.tracer.weights import derive as W
from moetrace.tracer.weights import gguf_writer


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_source):
    src = tiny_source
    path = tmp_path_factory.mktemp("gguf-mxfp4") / "tiny-mxfp4_moe.gguf"
    r = gguf_writer.write_gguf(src, "mxfp4_moe", path, cache=False)
    return src, r, gguf.GGUFReader(str(path))


def test_types_and_file_type_are_llama_cpp_s(written):
    src, r, reader = written
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == W.file_type_types(src, "mxfp4_moe", context=None)
    assert {n for n, t in types.items() if t == "MXFP4"} == {n for n in types if n.endswith("_exps.weight")}
    assert types["output.weight"] == types["blk.0.attn_v.weight"] == "Q8_0"
    assert r.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)


def test_expert_bytes_are_the_kernels_and_gguf_py_reads_them(written):
    """Each expert's bytes equal moetrace.kernels.quantize of the reference; gguf-py's dequantization of the
    file equals moetrace's."""
    src, _, reader = written
    t = {x.name: x for x in reader.tensors}["blk.1.ffn_down_exps.weight"]
    w = W.gguf_tensors_of_layer(src.layer_state(1), 1, W.family_of(src))[t.name].float()  # (E, H, F)
    data = np.asarray(t.data).reshape(w.shape[0], w.shape[1], -1)
    for e in range(w.shape[0]):
        want = K.quantize(w[e], "MXFP4")
        assert np.array_equal(data[e], want.numpy()), f"expert {e}"
        theirs = gguf.quants.dequantize(data[e], gguf.GGMLQuantizationType.MXFP4)
        assert np.array_equal(theirs.view(np.uint32), K.dequantize(want, "MXFP4", w.shape[-1]).numpy().view(np.uint32))


def test_reader_gives_the_variants_weights(written):
    """moetrace's GGUF source (validated on open) dequantizes the MXFP4 experts to exactly the weights the
    mxfp4_moe variant derives from the reference."""
    src, r, _ = written
    g = GGUFSource(r.path)
    assert g.ggml_types()["blk.0.ffn_gate_exps.weight"] == "MXFP4"
    got = g.layer_state(0)
    ref = src.layer_state(0)
    for key, name in (("mlp.experts.down_proj", "blk.0.ffn_down_exps.weight"),):
        want = W.dequantized(ref[key], name, "MXFP4")
        assert torch.equal(got[key], want), key
    gate_up = W.gguf_tensors_of_layer(ref, 0, W.family_of(src))
    want = torch.cat([W.dequantized(gate_up[f"blk.0.ffn_{p}_exps.weight"], f"blk.0.ffn_{p}_exps.weight", "MXFP4")
                      for p in ("gate", "up")], dim=1)
    assert torch.equal(got["mlp.experts.gate_up_proj"], want)
