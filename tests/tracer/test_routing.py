"""The routing diff against independent float64 numpy computations on a real trace, and on known flips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

import moetrace
from moetrace.errors import MoetraceError
from moetrace.tracer.analysis import routing as R


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def traces(tiny_run):
    _, stores = tiny_run
    return moetrace.open_trace(stores["orig-fp32"]), moetrace.open_trace(stores["orig-bf16"])


def test_routing_matches_numpy(traces):
    ref, var = traces
    rd = R.routing_diff(ref, var, "free")
    ri = ref.topk_idx.sel(mode="free").values.astype(np.int64)  # (layer, token, k)
    vi = var.topk_idx.sel(mode="free").values.astype(np.int64)
    rl = ref.router_logits.sel(mode="free").values.astype(np.float64)  # (layer, token, expert)
    vl = var.router_logits.sel(mode="free").values.astype(np.float64)
    L, T, k = ri.shape
    E = rl.shape[-1]
    overlap = np.array([[len(set(ri[l, t]) & set(vi[l, t])) / k for t in range(T)] for l in range(L)])
    any_flip = np.array([[set(ri[l, t]) != set(vi[l, t]) for t in range(T)] for l in range(L)])
    np.testing.assert_allclose(rd.topk_overlap.values, overlap.mean(-1), rtol=1e-12)
    np.testing.assert_allclose(rd.any_flip.values, any_flip.mean(-1), rtol=1e-12)
    np.testing.assert_allclose(rd.top1_flip.values, (ri[..., 0] != vi[..., 0]).mean(-1), rtol=1e-12)
    tv = 0.5 * np.abs(_softmax(rl) - _softmax(vl)).sum(-1)
    np.testing.assert_allclose(rd.mass_moved.values, tv.mean(-1), rtol=1e-9)
    load_ref = np.stack([[np.sum(ri[l] == e) for e in range(E)] for l in range(L)])
    load_var = np.stack([[np.sum(vi[l] == e) for e in range(E)] for l in range(L)])
    np.testing.assert_array_equal(rd.load_ref.values, load_ref)
    np.testing.assert_array_equal(rd.load_change.values, load_var - load_ref)
    assert (rd.load_change.sum("expert").values == 0).all()  # every token still goes to k experts
    first = np.array([next((l for l in range(L) if any_flip[l, t]), -1) for t in range(T)])
    np.testing.assert_array_equal(rd.first_flip_layer.values, first)
    np.testing.assert_array_equal(rd.layers_flipped.values, any_flip.sum(0))
    # Margins: the reference's k-th minus (k+1)-th largest logit, binned.
    srt = -np.sort(-rl, axis=-1)
    margin = (srt[..., k - 1] - srt[..., k]).ravel()
    edges = np.array(R.MARGIN_EDGES)
    counts = [((margin >= lo) & (margin < hi)).sum() for lo, hi in zip(edges[:-1], edges[1:])]
    flips = [(any_flip.ravel() & (margin >= lo) & (margin < hi)).sum() for lo, hi in zip(edges[:-1], edges[1:])]
    np.testing.assert_array_equal(rd.bin_count.values, counts)
    np.testing.assert_array_equal(rd.bin_flips.values, flips)
    assert rd.bin_count.values.sum() == L * T
    # Own vs upstream: free-mode flips that the teacher mode also has, and those it has not.
    ti = var.topk_idx.sel(mode="teacher").values.astype(np.int64)
    teach = np.array([[set(ri[l, t]) != set(ti[l, t]) for t in range(T)] for l in range(L)])
    np.testing.assert_allclose(rd.flip_own.values, (any_flip & teach).mean(-1), rtol=1e-12)
    np.testing.assert_allclose(rd.flip_upstream.values, (any_flip & ~teach).mean(-1), rtol=1e-12)
    np.testing.assert_allclose(rd.flip_own.values + rd.flip_upstream.values, rd.any_flip.values, rtol=1e-12)


def test_routing_mode_has_no_flips(traces):
    ref, var = traces
    rd = R.routing_diff(ref, var, "routing")
    assert (rd.any_flip.values == 0).all() and (rd.topk_overlap.values == 1).all()
    assert (rd.first_flip_layer.values == -1).all() and (rd.load_change.values == 0).all()
    assert "flip_upstream" not in rd  # the cause split is of free-mode flips only
    assert (rd.mass_moved.values > 0).all()  # the router's distribution still moved


def _synthetic_routing():
    """Two layers, three tokens, four experts top-2 with hand-made flips and margins."""
    rl = np.array([[[4.0, 3.0, 2.95, 0.0], [4.0, 3.0, 1.0, 0.0], [1.0, 3.0, 2.0, 0.0]],
                   [[4.0, 3.0, 1.0, 0.0], [4.0, 3.0, 2.5, 0.0], [0.0, 1.0, 5.0, 4.0]]])  # (layer, token, expert)
    ri = np.argsort(-rl, axis=-1)[..., :2]
    vi = ri.copy()
    vi[0, 0] = [0, 2]  # layer 0, token 0: set flip (margin 0.05)
    vi[1, 1] = [0, 2]  # layer 1, token 1: set flip (margin 0.5)
    vi[1, 2] = [3, 2]  # layer 1, token 2: top-1 flip only, same set
    coords = {"layer": [0, 1], "token": [0, 1, 2], "token_id": ("token", [5, 6, 7]), "seq": ("token", [0, 0, 0]),
              "pos": ("token", [0, 1, 2])}
    attrs = {"model": "synthetic", "model_hash": "h"}

    def ds(idx, name):
        return xr.Dataset({"topk_idx": (("mode", "layer", "token", "k"), idx[None].astype(np.int16)),
                           "router_logits": (("mode", "layer", "token", "expert"), rl[None])},
                          coords={**coords, "mode": ["free"]}, attrs={**attrs, "variant": name})

    return ds(ri, "ref"), ds(vi, "var")


def test_known_flips():
    ref, var = _synthetic_routing()
    rd = R.routing_diff(ref, var, margin_edges=(0, 0.1, 1, np.inf))
    np.testing.assert_allclose(rd.any_flip.values, [1 / 3, 1 / 3])
    np.testing.assert_allclose(rd.top1_flip.values, [0, 1 / 3])
    np.testing.assert_array_equal(rd.first_flip_layer.values, [0, 1, -1])
    np.testing.assert_array_equal(rd.layers_flipped.values, [1, 1, 0])
    np.testing.assert_array_equal(rd.bin_count.values, [1, 1, 4])  # margins 0.05 | 0.5 | 1, 2, 2, 3
    np.testing.assert_array_equal(rd.bin_flips.values, [1, 1, 0])
    assert rd.load_change.sel(layer=0).values.tolist() == [0, -1, 1, 0]
    movers = R.load_movers(rd)
    assert {(m["layer"], m["expert"]) for m in movers["gained"]} == {(0, 2), (1, 2)}
    assert rd.mass_moved.values.max() == 0  # same logits: the distributions did not move


def test_format_and_json(traces):
    ref, var = traces
    rd = R.routing_diff(ref, var)
    text = R.format_routing(rd, rd)
    assert "orig-bf16 vs orig-fp32 routing (free mode)" in text and "set-flip rate by the reference's" in text
    assert "flip xfloor" in text and "first flipped layer per token" in text
    data = json.loads(json.dumps(R.routing_to_dict(rd, rd), allow_nan=False))
    assert len(data["layers"]) == rd.sizes["layer"] and len(data["first_flip_layer"]) == rd.sizes["token"]
    assert data["margin_bins"][-1]["hi"] is None


def test_errors(traces):
    ref, var = traces
    with pytest.raises(MoetraceError, match="no 'teacher' mode"):
        R.routing_diff(ref, var.sel(mode=["free"]), "teacher")
    with pytest.raises(MoetraceError, match="lacks the 'router_logits' site"):
        R.routing_diff(ref, var.drop_vars("router_logits"))
    with pytest.raises(MoetraceError, match="increasing"):
        R.routing_diff(ref, var, margin_edges=(1.0, 0.5))
