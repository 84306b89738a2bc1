"""Trace stores: plain xarray reads them, incomplete ones never read as complete, one writer at a time."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr

import moetrace
from cli_runner import kill_run_after
from moetrace.errors import MoetraceError
from moetrace.tracer.store import LOCK_NAME


def test_plain_xarray_reads_store_with_schema(tiny_run, tiny_tokens):
    _, stores = tiny_run
    ds = xr.open_zarr(stores["orig-bf16"])
    assert ds.resid.dims == ("mode", "layer", "token", "hidden")
    assert ds.router_logits.dims == ("mode", "layer", "token", "expert")
    assert ds.topk_idx.dims == ("mode", "layer", "token", "k") and ds.topk_idx.dtype == np.int16
    assert ds.logits.dims == ("mode", "token", "vocab")
    assert list(ds["mode"].values) == ["free", "teacher", "routing"]
    assert np.array_equal(ds.token_id.values, tiny_tokens.ids)
    assert np.array_equal(ds.seq.values, tiny_tokens.seq) and np.array_equal(ds.pos.values, tiny_tokens.pos)
    assert "".join(ds.token_text.values[tiny_tokens.seq == 1]) == "A second, shorter prompt."
    for key in ("moetrace_version", "model", "model_hash", "variant", "modes", "sites", "seed", "torch_version",
                "transformers_version", "complete", "layers_done", "created"):
        assert key in ds.attrs, key
    assert ds.resid.encoding["chunks"] == (1, 1, tiny_tokens.n, ds.sizes["hidden"])  # one chunk per layer


def test_open_traces_stacks_variants(tiny_run):
    run_dir, _ = tiny_run
    ds = moetrace.open_traces(run_dir)
    assert sorted(ds["variant"].values) == ["orig-bf16", "orig-fp32"]
    ref = ds.sel(variant="orig-fp32")
    assert np.isnan(ref.resid.sel(mode="teacher").values).all()  # the reference has only the free mode
    assert np.isfinite(ref.resid.sel(mode="free").values).all()


def test_open_trace_rejects_non_store(tmp_path):
    with pytest.raises(MoetraceError, match="not a moetrace trace store"):
        moetrace.open_trace(tmp_path)


def test_killed_run_leaves_store_marked_incomplete(tmp_path):
    """SIGKILL mid-run: the store exists, reads as incomplete, and open_trace refuses it."""
    kill_run_after(["run", "--model", "builtin:tiny:layers=24", "--variant", "orig-bf16", "--out", str(tmp_path),
                    "--run", "killed", "--text", "a run that will be killed"], "layer 4/24 traced")
    store = tmp_path / "killed" / "orig-bf16.zarr"
    with pytest.raises(MoetraceError, match="incomplete"):
        moetrace.open_trace(store)
    ds = moetrace.open_trace(store, allow_incomplete=True)
    assert ds.attrs["complete"] is False
    done = ds.attrs["layers_done"]
    assert 1 <= done < 24
    # Every layer counted done is fully written; the last layer never was.
    assert np.isfinite(ds.resid.sel(mode="free").values[:done]).all()
    assert np.isnan(ds.resid.sel(mode="free", layer=23).values).all()


def test_second_writer_refused(tiny_run, tmp_path, tiny_source, tiny_tokens):
    from moetrace.tracer.executor import RunConfig, run_trace

    run_dir = tmp_path / "locked"
    store = run_dir / "orig-bf16.zarr"
    store.mkdir(parents=True)
    (store / LOCK_NAME).write_text(str(os.getpid()))  # a live process holds it
    with pytest.raises(MoetraceError, match="being written by another moetrace run"):
        run_trace(tiny_source, RunConfig(model="builtin:tiny", variants=["orig-bf16"]), tiny_tokens, run_dir)
