"""The lockstep executor reproduces transformers' forward and records every layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moetrace
from moetrace.hooks.qwen3_moe import Qwen3MoeAdapter
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
    from moetrace.tracer.executor import _Model

    m = _Model(tiny_source)
    state = {k: v.float() for k, v in tiny_source.layer_state(0).items()}
    return m, m.layer(0, state)


def _hook_count(module):
    return sum(len(x._forward_hooks) for x in module.modules())


def test_capture_removes_hooks_and_does_not_change_output(tiny_source):
    m, layer = _layer(tiny_source)
    h = torch.randn(1, 7, tiny_source.config.hidden_size)
    mask, pe = m.context(h, torch.arange(7))
    with torch.no_grad():
        plain = layer(h, attention_mask=mask, position_embeddings=pe)
        with capture(layer, Qwen3MoeAdapter()) as rec:
            hooked = layer(h, attention_mask=mask, position_embeddings=pe)
    assert torch.equal(plain, hooked)
    assert set(rec) == {"resid", "attn_out", "moe_out", "router_logits", "topk_idx", "topk_weight"}
    assert rec["resid"].shape == (7, tiny_source.config.hidden_size)
    assert _hook_count(layer) == 0


def test_capture_removes_hooks_when_forward_raises(tiny_source):
    m, layer = _layer(tiny_source)
    bad = torch.randn(1, 5, tiny_source.config.hidden_size + 1)  # wrong width: the forward raises
    with pytest.raises(RuntimeError):
        with capture(layer, Qwen3MoeAdapter()):
            layer(bad, attention_mask=None, position_embeddings=m.context(bad[..., :-1], torch.arange(5))[1])
    assert _hook_count(layer) == 0
