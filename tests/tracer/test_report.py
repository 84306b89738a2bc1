"""Output metrics, bootstrap intervals, the noise floor, the ds.moetrace accessor, lazy analysis and the report."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import xarray as xr

import moetrace
from moetrace.tracer.analysis import summary as analysis
from moetrace.tracer.analysis import output as output
from moetrace.tracer.analysis import stats as stats


@pytest.fixture(scope="module")
def traces(tiny_run):
    _, stores = tiny_run
    return moetrace.open_trace(stores["orig-fp32"]), moetrace.open_trace(stores["orig-bf16"])


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_output_matches_numpy(traces):
    ref, var = traces
    om = output.output_metrics(ref, var, "free", n_resamples=200)
    lp = _log_softmax(ref.logits.sel(mode="free").values)  # (token, vocab)
    lq = _log_softmax(var.logits.sel(mode="free").values)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    assert float(om.kl_mean) == pytest.approx(kl.mean(), rel=1e-10)
    assert float(om.kl_median) == pytest.approx(np.median(kl), rel=1e-10)
    assert float(om.kl_p99) == pytest.approx(np.quantile(kl, 0.99), rel=1e-10)
    assert float(om.kl_max) == pytest.approx(kl.max(), rel=1e-10)
    assert float(om.top1_agreement) == (lp.argmax(-1) == lq.argmax(-1)).mean()
    # Next token: the token at the same seq and pos + 1, looked up independently.
    seq, pos, ids = ref.seq.values, ref.pos.values, ref.token_id.values
    where = {(s, p): i for i, (s, p) in enumerate(zip(seq, pos))}
    dp, dnll = [], []
    for i, (s, p) in enumerate(zip(seq, pos)):
        j = where.get((s, p + 1))
        if j is not None:
            dp.append(np.exp(lq[i, ids[j]]) - np.exp(lp[i, ids[j]]))
            dnll.append(lp[i, ids[j]] - lq[i, ids[j]])
    assert int(om.tokens_with_next) == len(dp) == ref.sizes["token"] - len(np.unique(seq))
    assert float(om.dp_next_mean) == pytest.approx(np.mean(dp), rel=1e-9, abs=1e-15)
    assert float(om.abs_dp_next_mean) == pytest.approx(np.mean(np.abs(dp)), rel=1e-9)
    assert float(om.dnll_next_mean) == pytest.approx(np.mean(dnll), rel=1e-9, abs=1e-15)
    for name in output.CI_FIGURES:
        lo, hi = om[f"{name}_ci"].values
        assert lo <= float(om[name]) <= hi, name
    assert json.dumps(output.output_to_dict(om), allow_nan=False)


def test_next_token_index_follows_seq_and_pos():
    ds = xr.Dataset(coords={"token": np.arange(6), "seq": ("token", [1, 0, 0, 1, 0, 1]),
                            "pos": ("token", [0, 0, 1, 1, 2, 2])})
    assert output.next_token_index(ds).tolist() == [3, 2, 4, 5, -1, -1]


def test_bootstrap_contains_point_and_shrinks():
    rng = np.random.default_rng(1)
    data = rng.exponential(size=10_000)
    widths = []
    for n in (100, 1_000, 10_000):
        point, lo, hi = stats.with_ci(data[:n], "mean", n_resamples=500, seed=3)
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # about 1/sqrt(n): x3.2 per decade
    # Seeded: the same seed gives the same interval, another seed another one.
    assert stats.bootstrap_ci(data[:100], seed=3) == stats.bootstrap_ci(data[:100], seed=3)
    assert stats.bootstrap_ci(data[:100], seed=3) != stats.bootstrap_ci(data[:100], seed=4)
    # NaNs (tokens without a value) are dropped, not propagated.
    assert np.isfinite(stats.bootstrap_ci(np.r_[data[:50], np.nan], "median")).all()


def test_bootstrap_on_real_kl_shrinks_with_tokens(traces):
    ref, var = traces
    kl = output.output_tokens(ref, var)["kl"].values
    half = stats.with_ci(kl[: kl.size // 4], n_resamples=1000)
    full = stats.with_ci(kl, n_resamples=1000)
    assert half[1] <= half[0] <= half[2] and full[1] <= full[0] <= full[2]
    assert full[2] - full[1] < half[2] - half[1]


def test_noise_floor_multiples(tiny_run):
    run_dir, _ = tiny_run
    run = analysis.analyze_run(run_dir, n_resamples=100)
    assert run.reference == "orig-fp32" and run.floor is run.variants["orig-bf16"]
    # the floor against itself: 1x, or "exact" where its figure is 0 (0 of 0 is no multiple)
    assert all(v == "exact" if run.floor.figures[k] == 0 else v == pytest.approx(1.0)
               for k, v in run.floor.x_floor.items())
    fake = analysis.VariantAnalysis("worse", run.floor.diff, None, None, None, None,
                                    figures={k: 3 * v for k, v in run.floor.figures.items()})
    analysis.set_floor({"worse": fake}, run.floor)
    assert fake.x_floor["kl_mean"] == pytest.approx(3.0) and fake.x_floor["final_rel_l2"] == pytest.approx(3.0)
    assert "max_local_layer" not in fake.x_floor  # not an error figure
    text = analysis.format_headlines(run)
    assert "as multiples of the noise floor" in text and "orig-bf16" in text
    assert json.dumps(analysis.headlines_to_dict(run), allow_nan=False)


def test_accessor_gives_the_same_numbers(traces, tiny_run):
    from moetrace.tracer.analysis.decompose import decompose
    from moetrace.tracer.analysis.routing import routing_diff

    ref, var = traces
    xr.testing.assert_identical(var.moetrace.decompose(ref), decompose(ref, var))
    xr.testing.assert_identical(var.moetrace.routing(ref, "teacher"), routing_diff(ref, var, "teacher"))
    assert float(var.moetrace.output(ref, n_resamples=50).kl_mean) == float(
        output.output_metrics(ref, var, n_resamples=50).kl_mean)
    # A whole run (open_traces) splits back into stores with only the modes each recorded.
    split = moetrace.open_traces(tiny_run[0]).moetrace.variants()
    assert list(split["orig-fp32"].mode.values) == ["free"]
    assert sorted(split["orig-bf16"].mode.values) == ["free", "routing", "teacher"]
    np.testing.assert_allclose(split["orig-bf16"].moetrace.decompose(split["orig-fp32"]).local.values,
                               decompose(ref, var).local.values, rtol=1e-12)
    np.testing.assert_array_equal(split["orig-bf16"].moetrace.routing(split["orig-fp32"]).load_change.values,
                                  routing_diff(ref, var).load_change.values)


def test_lazy_analysis_with_dask(tiny_run):
    pytest.importorskip("dask.array", reason="lazy analysis needs dask: pip install 'moetrace[dask]'")
    from moetrace.tracer.analysis.decompose import decompose, decompose_tokens
    from moetrace.tracer.analysis.routing import routing_diff, routing_tokens

    _, stores = tiny_run
    ref = xr.open_zarr(stores["orig-fp32"], chunks={})  # plain xarray, Dask-backed
    var = xr.open_zarr(stores["orig-bf16"], chunks={})
    assert var.resid.chunks is not None
    tok = var.moetrace.decompose_tokens(ref)
    assert tok["local"].chunks is not None  # still lazy: nothing read yet
    assert routing_tokens(ref, var)["mass_moved"].chunks is not None
    eager_ref, eager_var = ref.load(), var.load()
    assert eager_var.resid.chunks is None
    xr.testing.assert_allclose(tok.compute(), decompose_tokens(eager_ref, eager_var), rtol=1e-12)
    xr.testing.assert_allclose(decompose(ref, var), decompose(eager_ref, eager_var), rtol=1e-12)
    lazy_rd, eager_rd = routing_diff(ref, var), routing_diff(eager_ref, eager_var)
    xr.testing.assert_allclose(lazy_rd, eager_rd, rtol=1e-12)
    assert float(output.output_metrics(ref, var, n_resamples=50).kl_mean) == pytest.approx(
        float(output.output_metrics(eager_ref, eager_var, n_resamples=50).kl_mean), rel=1e-12)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def test_report_writes_valid_pngs_and_html(tiny_run, tmp_path):
    import matplotlib.image

    from moetrace.tracer.render.report import write_report

    run_dir, _ = tiny_run
    rep = write_report(run_dir, tmp_path / "rep", n_resamples=100)
    names = sorted(f.name for f in rep.files)
    assert names == sorted(["divergence.png", "kl_histogram.png", "routing_flips.png", "decomposition_orig-bf16.png",
                            "expert_load_orig-bf16.png", "index.html"])
    for f in rep.files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            h, w = matplotlib.image.imread(f).shape[:2]
            assert h > 300 and w > 500, f.name
    page = _Page()
    page.feed(rep.index.read_text(encoding="utf-8"))
    page.close()
    assert not page.stack, f"unclosed tags {page.stack}"
    assert page.tags.count("table") >= 5
    assert sorted(set(page.images)) == sorted(n for n in names if n.endswith(".png"))
    assert "Headline figures" in rep.index.read_text()
