"""The quantized-weight cache and the error reporting of weight derivation (tracer/weights/qcache.py, tracer/weights/derive.py)."""

from __future__ import annotations

from types import SimpleNamespace

from pathlib import Path

import numpy as np
import pytest
import torch

import moetrace.kernels as K
from moetrace.errors import MoetraceError
from moetrace.kernels.errors import FormatError
from moetrace.tracer.weights import qcache as qcache
from moetrace.tracer.weights import derive as W
from moetrace.tracer.variants import Variant


@pytest.fixture
def ctx(tmp_path, tiny_source):
    return qcache.context_for(tiny_source, cache=qcache.QuantCache(tmp_path / "quant"))


def _quantized_names(types, layer):
    return [n for n, t in types.items() if n.startswith(f"blk.{layer}.") and t not in ("F32", "F16", "BF16")]


def test_second_derivation_reads_the_cache_and_never_quantizes(ctx, tiny_source, monkeypatch):
    v = Variant.parse("q4_k_m-bf16")
    types = W.tensor_types(tiny_source, v, context=ctx)
    assert types.context is ctx
    ref = tiny_source.layer_state(0)  # Q4_K and Q8_0 tensors: quick to quantize
    first = W.variant_layer_state(ref, 0, v, types)
    n_q = len(_quantized_names(types, 0))
    assert (ctx.cache.hits, ctx.cache.misses) == (0, n_q)

    def refuse(*a, **k):
        raise AssertionError("quantized again despite a warm cache")

    monkeypatch.setattr(K, "quantize", refuse)
    second = W.variant_layer_state(ref, 0, v, types)
    assert ctx.cache.hits == n_q
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_cached_bytes_are_the_kernels_bytes_expert_by_expert(ctx, tiny_source):
    w = tiny_source.layer_state(1)["mlp.experts.down_proj"][:2]  # (2, H, F)
    name = "blk.1.ffn_down_exps.weight"
    got = W.quantized_bytes(w, name, "Q6_K", ctx)
    want = np.stack([K.quantize(w[e].float(), "Q6_K").numpy() for e in range(w.shape[0])])
    assert np.array_equal(got, want)
    on_disk = np.load(ctx.cache.path(ctx.key(name, "Q6_K", qcache.tensor_hash(w))))
    assert np.array_equal(on_disk, want)


def test_keys_address_model_tensor_type_imatrix_and_kernels(tiny_source):
    a = qcache.QuantContext("m1")
    base = a.key("blk.0.attn_q.weight", "Q4_K")
    assert base == qcache.QuantContext("m1").key("blk.0.attn_q.weight", "q4_k")  # type names are case-free
    others = {
        qcache.QuantContext("m2").key("blk.0.attn_q.weight", "Q4_K"),
        a.key("blk.1.attn_q.weight", "Q4_K"),
        a.key("blk.0.attn_q.weight", "Q5_K"),
        qcache.QuantContext("m1", imatrix={"blk.0.attn_q.weight": np.ones(256, np.float32)}).key(
            "blk.0.attn_q.weight", "Q4_K"),
        a.key("blk.0.attn_q.weight", "Q4_K", content="abc"),
    }
    assert base not in others and len(others) == 5
    assert len(qcache.kernels_fingerprint()) == 16


def test_an_edited_tensor_of_the_same_model_is_not_served_from_the_cache(ctx, tiny_source):
    # Finetunes share config and safetensors headers, hence the model hash: the key holds the bytes' hash too.
    w = tiny_source.layer_state(0)["mlp.experts.gate_up_proj"][:, :256]  # (E, F, H) gate half, a view
    name = "blk.0.ffn_gate_exps.weight"
    before = W.quantized_bytes(w, name, "Q4_K", ctx)
    edited = w.clone()
    edited[4, 10, 20] = 0.5
    misses = ctx.cache.misses
    after = W.quantized_bytes(edited, name, "Q4_K", ctx)
    assert ctx.cache.misses == misses + 1
    changed = [e for e in range(w.shape[0]) if not np.array_equal(before[e], after[e])]
    assert changed == [4]
    assert qcache.tensor_hash(w) == qcache.tensor_hash(w.contiguous())  # a view hashes as its values


def test_damaged_entry_is_recomputed(ctx, tiny_source):
    w = tiny_source.layer_state(0)["self_attn.q_proj.weight"]
    name = "blk.0.attn_q.weight"
    good = W.quantized_bytes(w, name, "Q4_K", ctx)
    p = ctx.cache.path(ctx.key(name, "Q4_K", qcache.tensor_hash(w[None])))
    p.write_bytes(p.read_bytes()[:100])  # truncated by a crash or a full disk
    again = W.quantized_bytes(w, name, "Q4_K", ctx)
    assert np.array_equal(good, again)
    assert np.array_equal(np.load(p), good)


def test_per_expert_imatrix(ctx, tiny_source):
    w = tiny_source.layer_state(0)["mlp.experts.down_proj"][:3]  # (3, H, F)
    im = np.random.default_rng(0).uniform(0.1, 4.0, size=(3, w.shape[-1])).astype(np.float32)
    name = "blk.0.ffn_down_exps.weight"
    got = W.quantized_bytes(w, name, "Q4_K", ctx, imatrix=im)
    want = np.stack([K.quantize(w[e].float(), "Q4_K", imatrix=torch.from_numpy(im[e])).numpy() for e in range(3)])
    assert np.array_equal(got, want)
    assert not np.array_equal(got, W.quantized_bytes(w, name, "Q4_K", None))
    with pytest.raises(MoetraceError, match=r"imatrix entry of tensor blk\.0\.ffn_down_exps\.weight"):
        W.quantized_bytes(w, name, "Q4_K", None, imatrix=im[:, :10])


def test_nan_is_reported_with_the_tensor_name_and_expert(tiny_source):
    w = tiny_source.layer_state(0)["mlp.experts.down_proj"].float().clone()
    w[5, 7, 11] = float("nan")
    with pytest.raises(FormatError, match=r"tensor blk\.0\.ffn_down_exps\.weight .*expert 5, row 7, column 11"):
        W.quantized_bytes(w, "blk.0.ffn_down_exps.weight", "Q4_K")
    w2 = torch.zeros(4, 256)
    w2[2, 3] = float("inf")
    with pytest.raises(FormatError, match=r"tensor blk\.3\.attn_q\.weight .*row 2, column 3"):
        W.apply_type(w2, "Q8_0", name="blk.3.attn_q.weight")


def _fake_source(hidden):
    cfg = SimpleNamespace(model_type="qwen3_moe", hidden_size=hidden, moe_intermediate_size=64, num_experts=4,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=100, num_hidden_layers=2,
                          tie_word_embeddings=False)
    return SimpleNamespace(config=cfg, model_hash="fake", model_id="fake")


def test_row_length_no_type_can_take_names_the_tensor():
    src = _fake_source(hidden=40)  # rows of 40: no 32-block type divides them
    with pytest.raises(MoetraceError, match=r"tensor .output\.weight.: rows of 40"):
        W.file_type_types(src, "q8_0")
    with pytest.raises(MoetraceError, match=r"tensor token_embd\.weight has rows of 40"):
        W.file_type_types(src, "pure_q4_k")
    with pytest.raises(FormatError, match=r"tensor blk\.0\.attn_q\.weight: .*40"):
        W.quantized_bytes(torch.zeros(8, 40), "blk.0.attn_q.weight", "Q4_K")


def test_unknown_file_type_lists_valid_ones(tiny_source):
    with pytest.raises(MoetraceError, match=r"unknown llama\.cpp file type 'q4km'; valid file types: .*q4_k_m"):
        W.file_type_types(tiny_source, "q4km")


def test_default_context_uses_the_cache_root(monkeypatch, tmp_path, tiny_source):
    monkeypatch.setenv("MOETRACE_CACHE", str(tmp_path))
    types = W.tensor_types(tiny_source, Variant.parse("q8_0-fp32"))
    assert types.context.cache.root == tmp_path / "quant"
    assert W.tensor_types(tiny_source, Variant.parse("orig-fp32")).context is None
    monkeypatch.setenv("MOETRACE_QCACHE", "0")
    assert W.tensor_types(tiny_source, Variant.parse("q8_0-fp32")).context.cache is None


def test_kernel_fingerprint_covers_python_c_sources_and_the_compiled_module(tmp_path):
    """Editing any quantizer, in Python or C, or rebuilding the compiled module, changes every cache key."""
    import shutil

    import moetrace.kernels as pkg

    src = Path(pkg.__path__[0])
    copy = tmp_path / "kernels"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = qcache._fingerprint("v", [copy])
    assert base == qcache._fingerprint("v", [copy])
    seen = {base}
    for rel in ("base.py", "csrc/quant_kquant_qkx.c", "csrc/common.h"):
        f = copy / rel
        old = f.read_bytes()
        f.write_bytes(old + b"\n")
        seen.add(qcache._fingerprint("v", [copy]))
        f.write_bytes(old)
    so = next(copy.glob("_ckernels*"), None)
    assert so is not None, "the compiled kernels are not built"
    so.write_bytes(so.read_bytes() + b"\0")
    seen.add(qcache._fingerprint("v", [copy]))
    assert len(seen) == 5


def _fill(cache, n: int, size: int) -> list:
    """n entries of ``size`` bytes with increasing last-use times; returns their keys, oldest first."""
    import os

    keys = []
    for i in range(n):
        key = f"{i:02x}" + "0" * 62
        cache.put(key, np.full((1, 1, size), i, np.uint8))
        os.utime(cache.path(key), (1_000_000 + i, 1_000_000 + i))
        keys.append(key)
    return keys


def test_prune_deletes_least_recently_used_first_and_a_hit_counts_as_use(tmp_path):
    cache = qcache.QuantCache(tmp_path)
    keys = _fill(cache, 5, 1000)
    per = cache.path(keys[0]).stat().st_size
    assert cache.get(keys[0], (1, 1, 1000)) is not None  # used now: the newest
    deleted, freed = cache.prune(3 * per)
    assert (deleted, freed) == (2, 2 * per)
    left = {p.stem for p, _, _ in cache.entries()}
    assert left == {keys[0], keys[3], keys[4]}
    assert cache.prune(0) == (3, 3 * per) and cache.entries() == []


def test_size_limit_from_the_environment_trims_when_a_context_opens_the_cache(tmp_path, monkeypatch, tiny_source):
    monkeypatch.setenv("MOETRACE_CACHE", str(tmp_path))
    cache = qcache.QuantCache()
    keys = _fill(cache, 4, 1000)
    per = cache.path(keys[0]).stat().st_size
    monkeypatch.setenv("MOETRACE_QCACHE_MAX", str(2 * per))
    ctx = qcache.context_for(tiny_source)
    assert ctx.cache is not None
    assert {p.stem for p, _, _ in ctx.cache.entries()} == set(keys[2:])
    assert qcache.parse_size("1.5K") == 1536 and qcache.parse_size("20G") == 20 << 30 and qcache.parse_size("7") == 7
    with pytest.raises(MoetraceError, match="as a size"):
        qcache.parse_size("lots")
