"""The weight audit (tracer/weights/audit.py): metrics against float64 numpy, the planted fault, the Zarr table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moetrace.kernels as K
from moetrace.errors import MoetraceError
from moetrace.tracer.weights import audit as A
from moetrace.tracer.sources import builtin as builtin
from moetrace.tracer.weights import qcache as qcache
from moetrace.tracer.weights import derive as W
from moetrace.tracer.sources.checkpoint import open_source

PLANT = "1:3:down"


def _numpy_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The four metrics of one matrix, written independently in float64 numpy."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    d = b - a
    na, nb, nd = np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(d)
    cos = float(a @ b / (na * nb)) if na * nb > 0 else (1.0 if nd == 0 else 0.0)
    return {"cosine": cos, "rel_error": float(nd / na), "sqnr_db": float(20 * np.log10(na / nd)) if nd else math.inf,
            "max_abs_error": float(np.abs(d).max())}


def _close(got: float, want: float, metric: str) -> bool:
    """Agreement to float32-accumulation accuracy; 1 - cosine compared relatively (it is what matters near 1)."""
    if metric == "cosine":
        return (1 - got) == pytest.approx(1 - want, rel=1e-6, abs=2e-8)
    if metric == "sqnr_db":
        return got == pytest.approx(want, abs=1e-5)
    return got == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_matrix_metrics_match_float64_numpy():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_t(5, size=(6, 48, 80)).astype(np.float32)).to(torch.bfloat16)
    b = a.float() + torch.from_numpy(rng.normal(0, 0.05, size=(6, 48, 80)).astype(np.float32))
    b[2] = 0.0  # a matrix dequantized to all zeros (fp16 block scales underflowed): cosine 0, not NaN
    b[4] = a[4].float()  # an exact copy: cosine 1, SQNR +inf
    b[5] *= 3.0
    got = A.matrix_metrics(a, b)
    for e in range(6):
        want = _numpy_metrics(a[e].float().numpy(), b[e].numpy())
        for m in A.METRICS:
            assert _close(got[m][e], want[m], m), (e, m, got[m][e], want[m])
    assert got["cosine"][2] == 0.0 and got["cosine"][4] == 1.0 and got["sqnr_db"][4] == math.inf
    single = A.matrix_metrics(a[0], b[0])
    assert single["cosine"].shape == (1,) and single["cosine"][0] == got["cosine"][0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    src = open_source("builtin:tiny", plant=PLANT)
    cache = qcache.QuantCache(tmp_path_factory.mktemp("quant"))
    return src, cache, A.audit(src, "q4_k_m", cache=cache)


def test_planted_matrix_ranks_first_and_is_the_only_one_flagged(planted):
    src, _, ds = planted
    plant = builtin.parse_builtin("builtin:tiny", plant=PLANT).plant
    rows = A.ranked(ds)
    worst, runner_up = rows[0], rows[1]
    assert (worst["layer"], worst["expert"], worst["proj"]) == (plant.layer, plant.expert, plant.proj), (
        f"planted cosine {float(ds.cosine.sel(layer=plant.layer, expert=plant.expert, proj=plant.proj)):.5f}, "
        f"worst {worst}")
    assert [r for r in rows if r["flagged"]] == [worst], (
        f"planted {worst['cosine']:.5f}, next worst {runner_up['tensor']}[{runner_up['expert']}] "
        f"{runner_up['cosine']:.5f}")
    assert ds.attrs["n_flagged"] == 1
    assert int(ds.flagged.sum()) + int(ds.tensor_flagged.sum()) == 1


def test_table_has_every_matrix_and_matches_independent_metrics(planted):
    src, _, ds = planted
    c = src.config
    assert dict(ds.cosine.sizes) == {"layer": c.num_hidden_layers, "expert": c.num_experts, "proj": 3}
    assert not np.isnan(ds.cosine.values).any()
    per_layer = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp"}
    assert set(ds.tensor.values) == {"token_embd.weight", "output.weight"} | {
        f"blk.{L}.{s}.weight" for L in range(c.num_hidden_layers) for s in per_layer}
    types = W.file_type_types(src, "q4_k_m", context=None)
    # Layer 2's down projection (Q6_K) and layer 0's attention output, recomputed from the kernels.
    down = src.layer_state(2)["mlp.experts.down_proj"]
    t = types["blk.2.ffn_down_exps.weight"]
    assert str(ds.type.sel(layer=2, proj="down").values) == t == "Q6_K"
    for e in (0, 5):
        ref = down[e].float()
        deq = K.dequantize(K.quantize(ref, t), t, ref.shape[1])
        want = _numpy_metrics(ref.numpy(), deq.numpy())
        for m in A.METRICS:
            assert _close(float(ds[m].sel(layer=2, expert=e, proj="down")), want[m], m), (e, m)
    o = src.layer_state(0)["self_attn.o_proj.weight"].float()
    t = types["blk.0.attn_output.weight"]
    want = _numpy_metrics(o.numpy(), K.dequantize(K.quantize(o, t), t, o.shape[1]).numpy())
    got = ds.sel(tensor="blk.0.attn_output.weight")
    for m in A.METRICS:
        assert _close(float(got[f"tensor_{m}"]), want[m], m), m
    assert float(ds.sel(tensor="blk.0.ffn_gate_inp.weight").tensor_cosine) == 1.0  # the router stays F32


def test_zarr_round_trip_and_json(planted, tmp_path):
    import json

    import xarray as xr

    _, _, ds = planted
    path = A.save_audit(ds, tmp_path / "audit.zarr")
    back = xr.open_zarr(path, consolidated=False)
    for v in A.METRICS:
        np.testing.assert_array_equal(back[v].values, ds[v].values)
        np.testing.assert_array_equal(back[f"tensor_{v}"].values, ds[f"tensor_{v}"].values)
    assert list(back.proj.values) == ["gate", "up", "down"]
    assert back.attrs["weights"] == "q4_k_m" and back.attrs["n_flagged"] == 1
    A.open_audit(path)
    s = json.loads(json.dumps(A.summary_json(ds, path, top=3), allow_nan=False))  # strict JSON: no inf or NaN
    assert len(s["worst"]) == 3 and len(s["flagged"]) == 1 and s["n_expert_matrices"] == 4 * 8 * 3
    text = A.format_audit(ds, path, top=3)
    assert "FLAGGED" in text.splitlines()[2] and "1 below cosine 0.98" in text


def test_warm_cache_audit_is_identical_and_compute_dtype_rounds(planted, monkeypatch):
    src, cache, ds = planted
    monkeypatch.setattr(K, "quantize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("quantized again")))
    again = A.audit(src, "q4_k_m", cache=cache)
    np.testing.assert_array_equal(again.cosine.values, ds.cosine.values)
    bf16 = A.audit(src, "q4_k_m-bf16", cache=cache)
    assert bf16.attrs["compute"] == "bf16"
    assert not np.array_equal(bf16.rel_error.values, ds.rel_error.values)


def test_bad_variants_list_the_valid_ones(planted):
    src, cache, _ = planted
    with pytest.raises(MoetraceError, match="valid file types: q2_k"):
        A.audit(src, "q4_k_q", cache=cache)
    with pytest.raises(MoetraceError, match="nothing to audit"):
        A.audit(src, "orig-bf16", cache=cache)
    with pytest.raises(MoetraceError, match="threshold"):
        A.audit(src, "q8_0", threshold=1.5, cache=cache)


def test_gguf_file_audit_equals_audit_of_its_file_type(planted, tmp_path):
    """Auditing a GGUF file's own tensors (--variant gguf --gguf FILE) gives the same table as auditing the
    file type it was quantized as: the file holds exactly the bytes the audit quantizes to."""
    from moetrace.tracer.weights.gguf_writer import write_gguf

    src, cache, by_type = planted
    path = tmp_path / "q.gguf"
    write_gguf(src, "q4_k_m", path, cache=cache)
    by_file = A.audit(src, "gguf", gguf=path)
    assert by_file.attrs["gguf"] == str(path) and by_file.attrs["weights"] == "gguf"
    assert list(by_file.tensor.values) == list(by_type.tensor.values)
    for m in A.METRICS:
        assert np.array_equal(by_file[m].values, by_type[m].values, equal_nan=True), m
        assert np.array_equal(by_file[f"tensor_{m}"].values, by_type[f"tensor_{m}"].values, equal_nan=True), m
    assert np.array_equal(by_file.flagged.values, by_type.flagged.values)
    assert "as stored in" in A.format_audit(by_file)


def test_gguf_audit_needs_the_file_and_refuses_mismatches(planted, tmp_path):
    src = planted[0]
    with pytest.raises(MoetraceError, match="give --gguf FILE"):
        A.audit(src, "gguf")
    with pytest.raises(MoetraceError, match="use --variant gguf"):
        A.audit(src, "q4_k_m", gguf=tmp_path / "x.gguf")
    with pytest.raises(MoetraceError, match="missing.gguf"):
        A.audit(src, "gguf", gguf=tmp_path / "missing.gguf")
