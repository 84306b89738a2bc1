"""The lockstep executor reproduces transformers' forward and records every layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moetrace
from moetrace.hooks import arch
from moetrace.hooks.sites import capture


def test_reference_logits_equal_transformers_forward(tiny_source, tiny_tokens, tiny_run):
    """fp32 reference logits are bit-identical to Qwen3MoeForCausalLM's own forward, per sequence."""
    from transformers import AutoModelForCausalLM

    _, stores = tiny_run
    ref = moetrace.open_trace(stores["orig-fp32"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_source.folder), dtype=torch.float32).eval()
    logits = ref.logits.sel(mode="free").values
    for s, ids in enumerate(tiny_tokens.sequences()):
        with torch.no_grad():
            expect = model(torch.from_numpy(ids).unsqueeze(0)).logits[0].numpy()
        got = logits[tiny_tokens.seq == s]
        assert np.array_equal(got, expect), f"sequence {s}: max abs diff {np.abs(got - expect).max()}"


def test_reference_resid_equals_transformers_hidden_states(tiny_source, tiny_tokens, tiny_run):
    """Every recorded layer output equals transformers' output_hidden_states for that layer."""
    from transformers import AutoModelForCausalLM

    _, stores = tiny_run
    ref = moetrace.open_trace(stores["orig-fp32"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_source.folder), dtype=torch.float32).eval()
    ids = torch.from_numpy(tiny_tokens.sequences()[0]).unsqueeze(0)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer (last is normed)
    resid = ref.resid.sel(mode="free").values[:, tiny_tokens.seq == 0]
    n = resid.shape[0]
    for L in range(n - 1):  # transformers applies the final norm to its last entry
        assert np.array_equal(resid[L], hs[L + 1][0].numpy()), f"layer {L}"


def test_every_layer_and_mode_recorded(tiny_run):
    _, stores = tiny_run
    var = moetrace.open_trace(stores["orig-bf16"])
    assert var.attrs["complete"] and var.attrs["layers_done"] == var.sizes["layer"]
    for name in ("resid", "attn_out", "moe_out", "router_logits", "topk_weight"):
        assert np.isfinite(var[name].values).all(), name
    assert (var.topk_idx.values >= 0).all()
    assert np.isfinite(var.logits.values).all()


def test_routing_mode_uses_reference_choices(tiny_run):
    _, stores = tiny_run
    ref = moetrace.open_trace(stores["orig-fp32"])
    var = moetrace.open_trace(stores["orig-bf16"])
    assert np.array_equal(var.topk_idx.sel(mode="routing").values, ref.topk_idx.sel(mode="free").values)
    # Weights renormalized over the forced experts.
    np.testing.assert_allclose(var.topk_weight.sel(mode="routing").values.sum(-1), 1.0, rtol=1e-2)


def test_teacher_mode_first_layer_equals_free(tiny_run):
    """Layer 0 gets the same input in both modes (the embedding, cast to bf16)."""
    _, stores = tiny_run
    var = moetrace.open_trace(stores["orig-bf16"])
    assert np.array_equal(var.resid.sel(mode="teacher", layer=0).values, var.resid.sel(mode="free", layer=0).values)
    assert not np.array_equal(var.resid.sel(mode="teacher", layer=3).values,
                              var.resid.sel(mode="free", layer=3).values)


def _layer(tiny_source):
    from moetrace.tracer.execution.executor import _Model

    m = _Model(tiny_source)
    state = {k: v.float() for k, v in tiny_source.layer_state(0).items()}
    return m, m.layer(0, state, torch.float32)


def _hook_count(module):
    return sum(len(x._forward_hooks) for x in module.modules())


def test_capture_removes_hooks_and_does_not_change_output(tiny_source):
    m, layer = _layer(tiny_source)
    h = torch.randn(1, 7, tiny_source.config.hidden_size)
    masks, pe = m.context(h, torch.arange(7))
    mask = masks[m.layer_types[0]]
    with torch.no_grad():
        plain = layer(h, attention_mask=mask, position_embeddings=pe)
        with capture(layer, arch.by_model_type("qwen3_moe")) as rec:
            hooked = layer(h, attention_mask=mask, position_embeddings=pe)
    assert torch.equal(plain, hooked)
    assert set(rec) == {"resid", "attn_out", "moe_out", "router_logits", "topk_idx", "topk_weight"}
    assert rec["resid"].shape == (7, tiny_source.config.hidden_size)
    assert _hook_count(layer) == 0


def test_capture_removes_hooks_when_forward_raises(tiny_source):
    m, layer = _layer(tiny_source)
    bad = torch.randn(1, 5, tiny_source.config.hidden_size + 1)  # wrong width: the forward raises
    with pytest.raises(RuntimeError):
        with capture(layer, arch.by_model_type("qwen3_moe")):
            layer(bad, attention_mask=None, position_embeddings=m.context(bad[..., :-1], torch.arange(5))[1])
    assert _hook_count(layer) == 0



def test_reused_layer_module_takes_the_new_layers_attributes_and_values(tiny_source):
    """A decoder module handed back and reused for another layer carries that layer's index and values,
    cast to the module's dtype; a different dtype gets its own module."""
    from moetrace.tracer.execution.executor import _Model

    m = _Model(tiny_source)
    first = m.layer(0, tiny_source.layer_state(0), torch.float32)
    m.release(first)
    state = tiny_source.layer_state(1)  # stored bf16
    again = m.layer(1, state, torch.float32)
    assert again is first
    assert again.self_attn.layer_idx == 1
    got = again.state_dict()
    assert set(got) == set(state)
    for name, t in state.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], t.float()), name
    m.release(again)
    other = m.layer(1, state, torch.bfloat16)
    assert other is not first and next(other.parameters()).dtype == torch.bfloat16


def test_sliding_window_model_equals_transformers_forward(tmp_path):
    """A model with a sliding attention window shorter than the sequence: the executor builds the
    same mask as the model's forward, so the reference logits are transformers' own, bit for bit."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from moetrace.tracer.execution.executor import RunConfig, run_trace
    from moetrace.tracer.sources.checkpoint import open_source
    from moetrace.tracer.store.zarr_store import Tokens

    cfg = Qwen3MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=128, use_sliding_window=True, sliding_window=3, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    ids = np.array([3, 17, 5, 60, 2, 9, 41, 8, 33, 12], dtype=np.int64)
    tokens = Tokens(ids=ids, seq=np.zeros(10, np.int32), pos=np.arange(10, dtype=np.int32), text=[""] * 10)
    stores = run_trace(open_source(str(tmp_path / "m")), RunConfig(model="m", variants=[]), tokens, tmp_path / "run")
    got = moetrace.open_trace(stores["orig-fp32"]).logits.sel(mode="free").values
    with torch.no_grad():
        want = model(torch.from_numpy(ids).unsqueeze(0)).logits[0].numpy()
        full = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**{**cfg.to_dict(), "sliding_window": None,
                                                                   "use_sliding_window": False}))
        full.load_state_dict(model.state_dict())
        unwindowed = full.eval()(torch.from_numpy(ids).unsqueeze(0)).logits[0].numpy()
    assert not np.array_equal(want, unwindowed), "the window must matter for this test to mean anything"
    assert np.array_equal(got, want), f"max abs diff {np.abs(got - want).max()}"


def test_prefetching_weights_changes_nothing(tmp_path, tiny_source, tiny_tokens):
    """Deriving layer L+1's weights in the background while layer L runs gives the same stores, array for array."""
    import zarr

    from moetrace.tracer.execution.executor import RunConfig, run_trace

    cfg = RunConfig(model="builtin:tiny", variants=["q8_0-bf16"], modes=["free", "teacher"])
    a = run_trace(tiny_source, cfg, tiny_tokens, tmp_path / "a", prefetch=True)
    b = run_trace(tiny_source, cfg, tiny_tokens, tmp_path / "b", prefetch=False)
    for name in a:
        ga, gb = zarr.open_group(a[name], mode="r"), zarr.open_group(b[name], mode="r")
        for arr in ("resid", "moe_out", "router_logits", "topk_idx", "logits"):
            assert np.array_equal(ga[arr][...], gb[arr][...], equal_nan=True), f"{name}/{arr}"


def test_prefetch_decided_by_available_memory(monkeypatch, tiny_source):
    from moetrace.tracer.execution import executor as E
    from moetrace.tracer.variants import Variant

    vs = [Variant.parse("orig-fp32"), Variant.parse("q8_0-bf16")]
    loader = E._LayerLoader(tiny_source, None, {}, vs, 2, layer_numel=1000, prefetch=None)
    need = 2 * 1000 * (4 + 2)  # two layers, fp32 + bf16
    monkeypatch.setattr(E.os, "cpu_count", lambda: torch.get_num_threads() + 1)  # a spare core
    monkeypatch.setattr(E, "_available_memory", lambda: int(need / E._LayerLoader.MEMORY_SHARE))
    assert loader._decide()
    monkeypatch.setattr(E, "_available_memory", lambda: int(need / E._LayerLoader.MEMORY_SHARE) - 1)
    assert not loader._decide()
    monkeypatch.setattr(E, "_available_memory", lambda: None)
    assert not loader._decide()
    monkeypatch.setattr(E, "_available_memory", lambda: 1 << 50)
    monkeypatch.setattr(E.os, "cpu_count", lambda: torch.get_num_threads())  # compute takes every core
    assert not loader._decide()


def test_repeated_runs_reuse_the_skeleton_and_free_layer_tensors(tmp_path, tiny_source, tiny_tokens):
    """A second run of the same model reuses the module skeleton; after a run no layer tensors are held;
    both runs write identical stores."""
    import zarr

    from moetrace.tracer.execution.executor import RunConfig, _Model, run_trace

    cfg = RunConfig(model="builtin:tiny", variants=["orig-bf16"])
    a = run_trace(tiny_source, cfg, tiny_tokens, tmp_path / "a")
    model = _Model.for_source(tiny_source)
    held = [p for layers in model._free.values() for layer in layers for p in layer.parameters()]
    assert held and all(p.is_meta for p in held)
    b = run_trace(tiny_source, cfg, tiny_tokens, tmp_path / "b")
    assert _Model.for_source(tiny_source) is model
    for name in a:
        ga, gb = zarr.open_group(a[name], mode="r"), zarr.open_group(b[name], mode="r")
        for arr in ("resid", "logits"):
            assert np.array_equal(ga[arr][...], gb[arr][...]), f"{name}/{arr}"
