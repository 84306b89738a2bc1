"""Shared analysis helpers: the reference's free mode, the mode error, one set of error metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import moetrace
from moetrace.errors import MoetraceError
from moetrace.tracer.analysis import common as C
from moetrace.tracer.analysis.compare import hidden_error
from moetrace.tracer.weights import audit as A

# matrix_metrics sums float32 row dot products in float64; hidden_error is float64 throughout.
# Their agreement on float32 data is limited by the float32 rows: about 1e-6 relative.
METRIC_AGREEMENT_RTOL = 1e-5


def test_reference_reads_the_free_mode_and_variant_checks_the_mode(tiny_run):
    _, stores = tiny_run
    ref, var = moetrace.open_trace(stores["orig-fp32"]), moetrace.open_trace(stores["orig-bf16"])
    r = C.reference(ref, "resid")
    assert "mode" not in r.dims
    np.testing.assert_array_equal(r.values, ref.resid.sel(mode="free").values)
    np.testing.assert_array_equal(C.variant(var, "resid", "teacher").values, var.resid.sel(mode="teacher").values)
    with pytest.raises(MoetraceError) as e:
        C.variant(ref, "resid", "teacher")
    msg = str(e.value)
    assert "\n" not in msg and "has no 'teacher' mode (it has free)" in msg
    assert str(stores["orig-fp32"]) in msg and msg.startswith("orig-fp32")  # the store, by variant and path
    assert "--mode free --mode teacher" in msg


def test_require_mode_names_the_first_missing_and_takes_a_hint():
    ds = xr.Dataset(coords={"mode": ["free"]}, attrs={"variant": "q8_0-bf16"})
    C.require_mode(ds, "free")
    with pytest.raises(MoetraceError, match=r"^q8_0-bf16 has no 'routing' mode \(it has free\); do X$"):
        C.require_mode(ds, "free", "routing", "teacher", hint="do X")
    with pytest.raises(MoetraceError, match="it has none"):
        C.require_mode(xr.Dataset(attrs={"variant": "v"}), "free")


def test_json_number_and_ratio():
    assert C.json_number(np.float32(0.5)) == 0.5 and isinstance(C.json_number(np.int64(3)), int)
    assert C.json_number(float("nan")) is None and C.json_number(-np.inf) is None
    assert C.json_number(np.bool_(True)) is True
    assert C.ratio(3.0, 1.5) == 2.0 and np.isnan(C.ratio(1.0, 0.0)) and np.isnan(C.ratio(np.nan, 1.0))


def test_audit_and_compare_share_metric_names_and_agree():
    """One definition: the audit's matrix metrics and the hidden-state metrics have the same names and,
    on the same data, the same values."""
    assert A.METRICS == C.METRIC_NAMES == ("cosine", "rel_error", "sqnr_db", "max_abs_error")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 16, 32)).astype(np.float32)  # (matrix, rows, cols)
    b = (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32)
    audit = A.matrix_metrics(torch.from_numpy(a), torch.from_numpy(b))
    flat = ("matrix", "x")
    hid = hidden_error(xr.DataArray(a.reshape(3, -1), dims=flat), xr.DataArray(b.reshape(3, -1), dims=flat), "x")
    assert list(hid.data_vars) == list(C.METRIC_NAMES)
    for name in C.METRIC_NAMES:
        np.testing.assert_allclose(audit[name], hid[name].values, rtol=METRIC_AGREEMENT_RTOL, err_msg=name)
