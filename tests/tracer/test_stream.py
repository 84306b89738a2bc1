"""Weights dequantized chunk by chunk straight into the module (tracer/weights/stream.py) are the same bits as
the whole-tensor derivation, and a per-expert checkpoint's fused experts leave no mapped pages behind."""

from __future__ import annotations

import copy

import pytest
import torch

from moetrace.tracer.variants import Variant
from moetrace.tracer.weights import derive as W
from moetrace.tracer.weights.stream import Dequantizing

# bf16 dequantization computing in fp32 (the path rounds to bf16, then casts); fp16 (K types and Q8_0 mixed);
# bf16 with a per-tensor override that makes the fused gate_up's two parts of different types (Q4_K and BF16).
VARIANTS = ["q4_k_m-bf16w-fp32", "q3_k_m-fp16", "q4_k_m+ffn_up_exps=bf16-bf16"]


@pytest.fixture(scope="module")
def skeleton_layer(tiny_source):
    from moetrace.tracer.execution.executor import _Model

    return _Model(tiny_source).skeleton.model.layers[1]


def _loaded(skeleton_layer, path, state):
    layer = copy.deepcopy(skeleton_layer)
    layer._moetrace_tensors = None
    path.prepare(layer)
    path.load(layer, state)
    return layer.state_dict()


@pytest.mark.parametrize("name", VARIANTS)
def test_streamed_weights_load_the_same_bits_as_whole_tensors(tiny_source, skeleton_layer, name):
    v = Variant.parse(name)
    types = W.tensor_types(tiny_source, v, context=None)
    ref = tiny_source.layer_state(1)
    whole = W.variant_layer_state(ref, 1, v, types, cast=False)
    streamed = W.variant_layer_state(ref, 1, v, types, cast=False, defer=True)
    deferred = [k for k, w in streamed.items() if isinstance(w, Dequantizing)]
    assert "mlp.experts.gate_up_proj" in deferred and "self_attn.q_proj.weight" in deferred
    skel = skeleton_layer
    assert v.path.fills_deferred()
    want, got = _loaded(skel, v.path, whole), _loaded(skel, v.path, streamed)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype == v.path.dtype, k
        assert torch.equal(got[k], want[k]), k
    # Reused module tensors (the executor's pool) are filled the same way.
    layer = copy.deepcopy(skel)
    layer._moetrace_tensors = None
    v.path.prepare(layer)
    v.path.load(layer, whole)
    with torch.no_grad():
        for t in layer._moetrace_tensors.values():
            t.zero_()
    v.path.load(layer, streamed)
    assert all(torch.equal(layer.state_dict()[k], want[k]) for k in want)


def test_dense_equals_dequantized_across_chunks(tiny_source, monkeypatch):
    """Chunks smaller than a matrix and spanning matrices put every row in its place."""
    w = tiny_source.layer_state(0)["mlp.experts.down_proj"]  # (E, H, F)
    want = W.dequantized(w, "blk.0.ffn_down_exps.weight", "Q4_K")
    monkeypatch.setattr(W, "CHUNK_ELEMENTS", 3 * w.shape[-1] // 2 * 7)  # 10 rows: not a divisor of H
    d = Dequantizing(((w, "blk.0.ffn_down_exps.weight", "Q4_K"),), None, tuple(w.shape))
    assert torch.equal(d.dense(), want)
    gate_up = tiny_source.layer_state(0)["mlp.experts.gate_up_proj"]  # (E, 2F, H): its parts are not contiguous
    parts = tiny_source.family.to_gguf("mlp.experts.gate_up_proj", gate_up)
    names = ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight")
    whole = torch.cat([W.dequantized(p, n, t) for p, n, t in zip(parts, names, ("Q4_K", "BF16"))], dim=1)
    fused = Dequantizing(tuple(zip(parts, names, ("Q4_K", "BF16"))), None, tuple(gate_up.shape))
    assert torch.equal(fused.dense(), whole)


def test_paths_that_load_their_own_way_get_dense_weights(tiny_source):
    from moetrace.kernels import compute

    assert not compute.get("llamacpp_cpu").fills_deferred()


def test_fusing_per_expert_keys_drops_their_mapped_pages():
    """Inside a run's memory maps, a per-expert checkpoint's expert pages leave the resident set as they are fused:
    the fused copy holds the values, so a layer is not resident twice (copy and file pages) until it ends."""
    import os
    import sys

    from moetrace.tracer.sources.checkpoint import open_source

    if sys.platform != "linux":
        pytest.skip("reads /proc/self/smaps")
    from test_release import mapped_rss

    src = open_source("builtin:tiny-mixtral")
    assert src.family.fusion is not None
    shards = {src._index[k] for k in src._index}
    prefix = src.family.layer_prefix(2)
    expert_keys = [k for k in src._index if k.startswith(prefix) and src.family.fusion.match(k[len(prefix):])]
    expert_bytes = sum(src.tensor(k).nbytes for k in expert_keys)
    assert expert_keys and expert_bytes > 2**20
    slack = 4 * 65536 + 8 * os.sysconf("SC_PAGE_SIZE")  # fault-around pages at the layer's edges
    with src.mapped():
        before = sum(mapped_rss(src.folder / s) for s in shards)
        state = src.layer_state(2)
        held = sum(mapped_rss(src.folder / s) for s in shards) - before
        non_expert = sum(t.nbytes for k, t in state.items() if k not in src.family.fusion.fused)
        assert held <= non_expert + slack, f"{held} bytes mapped after fusing; non-expert tensors {non_expert}"
        # The fused values are the file's.
        e = src.family.n_experts(src.config) - 1
        name = next(k for k in expert_keys if src.family.fusion.match(k[len(prefix):]) == ("w2", e))
        assert torch.equal(state["mlp.experts.down_proj"][e], src.tensor(name))


# GPT-OSS holds its experts transposed, (E, in, out), with gate/up interleaved along the last axis; its
# published checkpoint stores them as MXFP4 blocks. Q4_K experts, and Q4_K gate with BF16 up (parts of
# different types, both written through strided views of the module's tensor).
GPT_OSS_VARIANTS = ["q4_k_m-bf16", "q4_k_m+ffn_up_exps=bf16-bf16"]


@pytest.fixture(scope="module")
def gpt_oss_source():
    from moetrace.tracer.sources.checkpoint import open_source

    return open_source("builtin:tiny-gpt-oss")


@pytest.mark.parametrize("name", GPT_OSS_VARIANTS)
def test_transposed_interleaved_experts_stream_the_same_bits(gpt_oss_source, name):
    from moetrace.tracer.execution.executor import _Model

    src = gpt_oss_source
    fam = src.family
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(fam.transposed)
    v = Variant.parse(name)
    types = W.tensor_types(src, v, context=None)
    ref = src.layer_state(1)
    whole = W.variant_layer_state(ref, 1, v, types, cast=False)
    streamed = W.variant_layer_state(ref, 1, v, types, cast=False, defer=True)
    deferred = {k for k, w in streamed.items() if isinstance(w, Dequantizing)}
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= deferred
    skel = _Model(src).skeleton.model.layers[1]
    want, got = _loaded(skel, v.path, whole), _loaded(skel, v.path, streamed)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    # the experts' values went through the quantizer: not the reference's
    assert not torch.equal(got["mlp.experts.down_proj"], ref["mlp.experts.down_proj"].to(got["mlp.experts.down_proj"].dtype))


def test_packed_experts_decode_expert_by_expert_as_whole(gpt_oss_source):
    """The reference read from MXFP4 blocks expert by expert into transformers' layout is the whole-tensor decode."""
    from safetensors import safe_open

    from moetrace.tracer.sources.packed import packed_names, read_packed

    src = gpt_oss_source
    state = src.layer_state(2)
    for key, fmt in src.family.packed.items():
        names = [src.family.layer_prefix(2) + n for n in packed_names(key, fmt)]
        parts = []
        for n in names:
            with safe_open(str(src.folder / src._index[n]), framework="pt") as h:
                parts.append(h.get_tensor(n))
        want = src.family.from_gguf(key, [read_packed(fmt, parts, key, torch.bfloat16)])
        assert state[key].dtype == torch.bfloat16 and state[key].is_contiguous()
        assert torch.equal(state[key], want), key
    # Blocks and scales that do not pair up are still one error naming both whole shapes.
    from moetrace.errors import MoetraceError

    blocks, scales = torch.zeros(4, 8, 2, 16, dtype=torch.uint8), torch.full((3, 8, 2), 127, dtype=torch.uint8)
    with pytest.raises(MoetraceError, match=r"blocks \(4, 8, 2, 16\) and scales \(3, 8, 2\) do not pair up"):
        src._unpack_one("mlp.experts.down_proj", "mxfp4", [blocks, scales], "x")
