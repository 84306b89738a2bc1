"""The local / propagated / gain decomposition against float64 numpy, its bounds, and the planted fault."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import moetrace
from moetrace.errors import MoetraceError
from moetrace.tracer.analysis import decompose as D

PLANT = "2:1:down"


def _rel(x, r):
    return np.linalg.norm(x - r, axis=-1) / np.linalg.norm(r, axis=-1)  # (layer, token)


def test_decompose_matches_numpy(tiny_run):
    _, stores = tiny_run
    ref, var = moetrace.open_trace(stores["orig-fp32"]), moetrace.open_trace(stores["orig-bf16"])
    dec = D.decompose(ref, var)
    r = ref.resid.sel(mode="free").values.astype(np.float64)  # (layer, token, hidden)
    f = var.resid.sel(mode="free").values.astype(np.float64)
    t = var.resid.sel(mode="teacher").values.astype(np.float64)
    g = var.resid.sel(mode="routing").values.astype(np.float64)
    local, prop = _rel(t, r).mean(-1), _rel(f, r).mean(-1)
    inherited = (np.linalg.norm(f - t, axis=-1) / np.linalg.norm(r, axis=-1)).mean(-1)
    np.testing.assert_allclose(dec.local.values, local, rtol=1e-10)
    np.testing.assert_allclose(dec.propagated.values, prop, rtol=1e-10)
    np.testing.assert_allclose(dec.inherited.values, inherited, rtol=1e-10)
    np.testing.assert_allclose(dec.routing_forced.values, _rel(g, r).mean(-1), rtol=1e-10)
    np.testing.assert_allclose(dec.local_p99.values, np.quantile(_rel(t, r), 0.99, axis=-1), rtol=1e-10)
    assert np.isnan(dec.gain.values[0])
    np.testing.assert_allclose(dec.gain.values[1:], inherited[1:] / prop[:-1], rtol=1e-10)
    np.testing.assert_allclose(dec.growth.values, np.diff(prop, prepend=0.0), rtol=1e-10)
    np.testing.assert_allclose(dec.amplified.values[1:], np.maximum(inherited[1:] - prop[:-1], 0.0), rtol=1e-10)
    assert np.all(dec.amplified.values[1:] >= 0)
    # BF16 compute injects a little at every layer; nothing is trivially zero.
    assert (dec.local.values > 1e-4).all() and (dec.local.values < 0.05).all()
    # The propagated error equals the diff command's curve.
    from moetrace.tracer.analysis.compare import diff

    np.testing.assert_allclose(dec.propagated.values, diff(ref, var).resid_rel_l2_mean.values, rtol=1e-12)


def test_triangle_bounds_hold(tiny_run):
    """|inherited - local| <= propagated <= local + gain * propagated of the layer before."""
    _, stores = tiny_run
    dec = D.decompose(moetrace.open_trace(stores["orig-fp32"]), moetrace.open_trace(stores["orig-bf16"]))
    loc, prop, inh, gain = (dec[v].values for v in ("local", "propagated", "inherited", "gain"))
    assert (np.abs(inh - loc) <= prop + 1e-12).all()
    assert (prop <= loc + inh + 1e-12).all()
    assert (prop[1:] <= loc[1:] + gain[1:] * prop[:-1] + 1e-12).all()


def _synthetic(rel_local, rel_inherited, seed=0, T=64, H=32):
    """A reference and a variant whose per-layer local and inherited errors are orthogonal vectors of
    the given relative sizes, so propagated = sqrt(local^2 + inherited^2) per token."""
    rng = np.random.default_rng(seed)
    L = len(rel_local)
    r = rng.normal(size=(L, T, H))
    r /= np.linalg.norm(r, axis=-1, keepdims=True)  # unit norm: relative = absolute
    a, b = np.zeros_like(r), np.zeros_like(r)
    a[..., 0], b[..., 1] = 1.0, 1.0  # two fixed orthogonal directions
    r[..., :2] = 0.0
    r /= np.linalg.norm(r, axis=-1, keepdims=True)
    t = r + np.asarray(rel_local)[:, None, None] * a
    f = t + np.asarray(rel_inherited)[:, None, None] * b
    coords = {"layer": np.arange(L), "token": np.arange(T), "token_id": ("token", np.arange(T)),
              "seq": ("token", np.zeros(T, int)), "pos": ("token", np.arange(T))}
    attrs = {"model": "synthetic", "model_hash": "abc"}
    ref = xr.Dataset({"resid": (("mode", "layer", "token", "hidden"), r[None])},
                     coords={**coords, "mode": ["free"]}, attrs={**attrs, "variant": "ref"})
    var = xr.Dataset({"resid": (("mode", "layer", "token", "hidden"), np.stack([f, t]))},
                     coords={**coords, "mode": ["free", "teacher"]}, attrs={**attrs, "variant": "var"})
    return ref, var


def test_growth_summary_names_injected_and_amplified_layers():
    # Layer 1 receives 0.1 and passes on 0.3 with almost no local error: amplified.
    # Layer 2 injects 0.5 itself and passes its input on unchanged: injected.
    # Layer 3 injects nothing and damps what it receives (gain 0.9): the error shrinks there.
    local = [0.0, 0.001, 0.5, 0.0]
    inherited = [0.1, 0.3, np.hypot(0.3, 0.001), 0.9 * np.hypot(0.5, np.hypot(0.3, 0.001))]
    ref, var = _synthetic(local, inherited)
    dec = D.decompose(ref, var)
    np.testing.assert_allclose(dec.local.values, local, atol=1e-12)
    np.testing.assert_allclose(dec.propagated.values, np.hypot(local, inherited), rtol=1e-12)
    np.testing.assert_allclose(dec.gain.values[1], 0.3 / 0.1, rtol=1e-9)
    np.testing.assert_allclose(dec.gain.values[2], 1.0, rtol=1e-9)  # passes its input on unchanged
    np.testing.assert_allclose(dec.gain.values[3], 0.9, rtol=1e-9)
    rows = {r["layer"]: r for r in D.growth_summary(dec, top=4)}
    assert rows[1]["cause"] == "amplified" and rows[2]["cause"] == "injected"
    assert 3 not in rows  # the error shrinks at the last layer
    assert rows[0]["cause"] == "embeddings"  # its error came in with the embeddings
    assert D.max_local_layer(dec) == (2, pytest.approx(0.5))
    text = D.format_decomposition(dec)
    assert "highest local error: layer 2" in text and "amplified there" in text


def test_identical_variant_has_no_error(tiny_run):
    _, stores = tiny_run
    ref = moetrace.open_trace(stores["orig-fp32"])
    same = xr.concat([ref, ref], dim="mode", data_vars="all").assign_coords(mode=["free", "teacher"])
    dec = D.decompose(ref, same)
    assert (dec.local.values == 0).all() and (dec.propagated.values == 0).all()


def test_missing_teacher_mode_is_a_clear_error(tiny_run):
    _, stores = tiny_run
    ref, var = moetrace.open_trace(stores["orig-fp32"]), moetrace.open_trace(stores["orig-bf16"])
    with pytest.raises(MoetraceError, match="no 'teacher' mode.*--mode teacher"):
        D.decompose(ref, var.sel(mode=["free"]))


def test_json_has_no_nan(tiny_run):
    import json

    _, stores = tiny_run
    dec = D.decompose(moetrace.open_trace(stores["orig-fp32"]), moetrace.open_trace(stores["orig-bf16"]))
    text = json.dumps(D.decomposition_to_dict(dec, dec), allow_nan=False)
    assert '"gain": null' in text and '"local_x_floor": 1.0' in text


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tiny_tokens):
    """builtin:tiny with a fault planted in layer 2, traced with q4_k_m-bf16 in free and teacher mode."""
    from moetrace.tracer.execution.executor import RunConfig, run_trace
    from moetrace.tracer.sources.checkpoint import open_source

    source = open_source("builtin:tiny", plant=PLANT)
    run_dir = tmp_path_factory.mktemp("planted") / "tiny"
    cfg = RunConfig(model="builtin:tiny", variants=["orig-bf16", "q4_k_m-bf16"], modes=["free", "teacher"],
                    plant=PLANT, sites=["resid", "router_logits", "topk_idx", "topk_weight", "logits"])
    run_trace(source, cfg, tiny_tokens, run_dir)
    return run_dir


def test_planted_layer_has_the_highest_local_error(planted_run):
    """The issue's acceptance: q4_k_m-bf16 quantizes the planted matrix; its layer injects the most."""
    ref = moetrace.open_trace(planted_run / "orig-fp32.zarr")
    dec = D.decompose(ref, moetrace.open_trace(planted_run / "q4_k_m-bf16.zarr"))
    local = dec.local.values
    assert D.max_local_layer(dec)[0] == int(PLANT.split(":")[0]), f"local error per layer: {local}"
    # The floor (BF16 compute alone) shows no such peak: the fault is in the quantized weights.
    floor = D.decompose(ref, moetrace.open_trace(planted_run / "orig-bf16.zarr"))
    assert local[2] / floor.local.values[2] > 2 * np.median(local / floor.local.values)


def test_report_shows_the_planted_layer(planted_run, tmp_path):
    from moetrace.tracer.render.report import write_report

    rep = write_report(planted_run, tmp_path / "report", n_resamples=200)
    page = rep.index.read_text()
    assert "highest local error: layer 2" in page
    assert "planted fault 2:1:down" in page
    assert (tmp_path / "report" / "decomposition_q4_k_m-bf16.png").stat().st_size > 10_000
    assert rep.run.variants["q4_k_m-bf16"].figures["max_local_layer"] == 2
