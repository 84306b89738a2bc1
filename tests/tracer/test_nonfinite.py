"""An overflow (Inf/NaN) in a variant is a recorded finding, and every analysis still runs on the trace."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import moetrace
from moetrace.tracer.execution.nonfinite import first_nonfinite

SCALED_LAYER = 1


@pytest.fixture(scope="module")
def overflow_run(tmp_path_factory, tiny_source, tiny_tokens):
    """builtin:tiny with layer 1's expert down projections times 3e4: fine in fp32, beyond fp16's 65504."""
    from safetensors.torch import load_file, save_file

    from moetrace.tracer.execution.executor import RunConfig, run_trace
    from moetrace.tracer.sources.checkpoint import open_source

    folder = tmp_path_factory.mktemp("overflow") / "model"
    folder.mkdir()
    shutil.copy(tiny_source.folder / "config.json", folder / "config.json")
    tensors = load_file(str(tiny_source.folder / "model.safetensors"))
    name = f"model.layers.{SCALED_LAYER}.mlp.experts.down_proj"
    tensors[name] = tensors[name] * 3e4
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    src = open_source(str(folder))
    cfg = RunConfig(model=str(folder), variants=["orig-fp16"], modes=["free", "teacher", "routing"])
    stores = run_trace(src, cfg, tiny_tokens, folder.parent / "run")
    return {k: moetrace.open_trace(p) for k, p in stores.items()}


def test_first_nonfinite_is_the_first_site_in_compute_order():
    rec = {"resid": torch.tensor([[1.0, float("inf")], [0.0, 0.0]]),
           "moe_out": torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]),
           "topk_idx": torch.tensor([[0, 1], [1, 0]])}
    assert first_nonfinite(rec) == ("moe_out", 1, "nan")
    assert first_nonfinite({"resid": torch.zeros(3, 2)}) is None


def test_overflow_is_recorded_where_it_began(overflow_run):
    ref, var = overflow_run["orig-fp32"], overflow_run["orig-fp16"]
    assert "nonfinite" not in ref.attrs
    found = var.attrs["nonfinite"]
    assert set(found) == {"free", "teacher", "routing"}
    for mode, f in found.items():
        assert f["layer"] == SCALED_LAYER and f["site"] == "moe_out", (mode, f)
        moe = var.moe_out.sel(mode=mode).values  # (layer, token, hidden)
        assert np.isfinite(moe[:SCALED_LAYER]).all()
        bad_tokens = np.flatnonzero(~np.isfinite(moe[SCALED_LAYER]).all(-1))
        assert f["token"] == bad_tokens[0]
        assert np.isfinite(var.attn_out.sel(mode=mode).values[SCALED_LAYER]).all()  # attention came first, finite


def test_analyses_run_and_say_where(overflow_run):
    from moetrace.tracer.analysis import compare, decompose, output, routing

    ref, var = overflow_run["orig-fp32"], overflow_run["orig-fp16"]
    d = compare.diff(ref, var)
    text = compare.format_diff(d)
    assert f"first holds inf at layer {SCALED_LAYER}, site moe_out" in text
    # The overflowed layers read NaN, never a figure averaged over the tokens that stayed finite.
    assert np.isfinite(d["resid_rel_l2_mean"].values[:SCALED_LAYER]).all()
    assert np.isnan(d["resid_rel_l2_mean"].values[SCALED_LAYER + 1:]).all()
    assert float(d["top1_agreement"]) < 0.5
    dec = decompose.decompose(ref, var)
    assert any("non-finite" in line for line in decompose.summary_lines(dec))
    assert "non-finite" in routing.format_routing(routing.routing_diff(ref, var))
    om = output.output_metrics(ref, var, n_resamples=20)
    assert np.isnan(float(om["kl_mean"]))


def test_a_finite_record_whose_sum_overflows_has_no_finding():
    """The check sums each site first: a sum that overflows fp16 (65504) while every value is finite
    must not be reported; a single Inf or NaN among finite values must."""
    big = torch.full((64, 8), 60000.0, dtype=torch.float16)  # finite; its sum is not
    assert not torch.isfinite(big.sum())
    assert first_nonfinite({"resid": big}) is None
    for bad, kind in ((float("inf"), "inf"), (float("-inf"), "inf"), (float("nan"), "nan")):
        x = torch.zeros(64, 8)
        x[17, 3] = bad
        assert first_nonfinite({"resid": x}) == ("resid", 17, kind)
    both = torch.zeros(64, 8)
    both[5, 0], both[9, 1] = float("inf"), float("-inf")  # they cancel to NaN in the sum: still found
    assert first_nonfinite({"resid": both}) == ("resid", 5, "inf")
