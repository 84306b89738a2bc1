"""Output figures on chosen positions: llama-perplexity's second half of each chunk, checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

import moetrace
from moetrace.errors import MoetraceError
from moetrace.tracer.analysis import positions


def test_second_half_is_llama_perplexity_positions():
    pos = np.arange(20)
    # llama-perplexity, n_ctx 8: first = 4, logits at 4..6 scored in each chunk (7 has no next token in it)
    expect = [4, 5, 6, 12, 13, 14]
    assert np.flatnonzero(positions.mask(pos, "second-half:8")).tolist() == expect
    assert positions.mask(pos, "all").all() and positions.mask(pos, None).all()


@pytest.mark.parametrize("spec", ["half:8", "second-half:", "second-half:7", "second-half:2", "second-half:x"])
def test_bad_specs_are_one_line_errors(spec):
    with pytest.raises(MoetraceError, match="valid: all, second-half:N"):
        positions.parse(spec)


def test_no_scored_token_is_an_error():
    with pytest.raises(MoetraceError, match="select no token"):
        positions.mask(np.arange(10), "second-half:512")


def _np_kl_top1(rl, vl):
    def lsm(x):
        x = x.astype(np.float64)
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

    lp, lq = lsm(rl), lsm(vl)
    return (np.exp(lp) * (lp - lq)).sum(-1), rl.argmax(-1) == vl.argmax(-1)


def test_scored_figures_equal_numpy_on_those_positions(tiny_run):
    from moetrace.tracer.analysis import compare, output

    _, stores = tiny_run
    ref, var = moetrace.open_trace(stores["orig-fp32"]), moetrace.open_trace(stores["orig-bf16"])
    pos = ref["pos"].values
    keep = (pos % 16 >= 8) & (pos % 16 <= 14)
    assert 0 < keep.sum() < keep.size
    kl, agree = _np_kl_top1(ref.logits.sel(mode="free").values[keep], var.logits.sel(mode="free").values[keep])
    d = compare.diff(ref, var, score_positions="second-half:16")
    assert int(d["scored_tokens"]) == keep.sum()
    np.testing.assert_allclose(float(d["kl_mean"]), kl.mean(), rtol=1e-12)
    assert float(d["top1_agreement"]) == agree.mean()
    om = output.output_metrics(ref, var, n_resamples=20, score_positions="second-half:16")
    assert int(om["tokens"]) == keep.sum()
    np.testing.assert_allclose(float(om["kl_mean"]), kl.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(om["kl_max"]), kl.max(), rtol=1e-12)
    assert float(om["top1_agreement"]) == agree.mean()
    full = compare.diff(ref, var)
    assert int(full["scored_tokens"]) == pos.size and float(full["kl_mean"]) != float(d["kl_mean"])
