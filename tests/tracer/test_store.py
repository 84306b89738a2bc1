"""Trace stores: plain xarray reads them, incomplete ones never read as complete, one writer at a time."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import xarray as xr

import moetrace
from cli_runner import kill_run_after
from moetrace.errors import MoetraceError
from moetrace.tracer.store.zarr_store import LOCK_NAME


def test_plain_xarray_reads_store_with_schema(tiny_run, tiny_tokens):
    _, stores = tiny_run
    ds = xr.open_zarr(stores["orig-bf16"])
    assert ds.resid.dims == ("mode", "layer", "token", "hidden")
    # router variables lie along moe_layer, whose coordinate is the MoE layers (all of builtin:tiny's)
    assert ds.router_logits.dims == ("mode", "moe_layer", "token", "expert")
    assert ds.topk_idx.dims == ("mode", "moe_layer", "token", "k") and ds.topk_idx.dtype == np.int16
    assert np.array_equal(ds.moe_layer.values, ds.layer.values) and "dense_layer" not in ds.coords
    assert "mlp_out" not in ds and "shared_out" not in ds
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
    from moetrace.tracer.execution.executor import RunConfig, run_trace

    run_dir = tmp_path / "locked"
    store = run_dir / "orig-bf16.zarr"
    store.mkdir(parents=True)
    (store / LOCK_NAME).write_text(str(os.getpid()))  # a live process holds it
    with pytest.raises(MoetraceError, match="being written by another moetrace run"):
        run_trace(tiny_source, RunConfig(model="builtin:tiny", variants=["orig-bf16"]), tiny_tokens, run_dir)


def test_logits_chunked_by_token_read_back_exactly(tmp_path, tiny_tokens, monkeypatch):
    """Logits are split into token chunks (the last one partial); zarr and xarray read back the values written."""
    import torch
    import zarr

    from moetrace.tracer.store import schema
    from moetrace.tracer.store import zarr_store as S

    from moetrace.tracer.store import schema

    monkeypatch.setattr(schema, "LOGIT_CHUNK_BYTES", 4 * 300 * 7)  # 7 tokens per chunk at vocab 300
    T = tiny_tokens.n
    assert T % 7, "the test needs a partial edge chunk"
    sizes = {"layers": 2, "hidden": 8, "expert": 4, "k": 2, "vocab": 300}
    w = S.TraceWriter(tmp_path / "v.zarr", sizes, tiny_tokens, ["free", "teacher"], ["resid", "logits"],
                      {"variant": "v", "model": "m"})
    logits = {m: torch.randn(T, 300, generator=torch.Generator().manual_seed(i)) for i, m in enumerate(w.modes)}
    for L in range(2):
        for m in w.modes:
            w.write_layer(m, L, {"resid": torch.full((T, 8), float(L))})
        w.mark_layers_done(L + 1)
    for m in w.modes:
        w.write_logits(m, logits[m])
    w.finish()
    arr = zarr.open_array(tmp_path / "v.zarr" / "logits", mode="r")
    assert arr.chunks == (1, 7, 300)
    ds = moetrace.open_trace(tmp_path / "v.zarr")
    for i, m in enumerate(w.modes):
        assert np.array_equal(arr[i], logits[m].numpy())
        assert np.array_equal(ds.logits.sel(mode=m).values, logits[m].numpy())
    assert ds.attrs["complete"] and ds.attrs["layers_done"] == 2
    assert np.array_equal(ds.resid.sel(mode="teacher", layer=1).values, np.ones((T, 8), np.float32))


def test_lock_held_from_creation_to_finish(tmp_path, tiny_tokens):
    """Creating the store (which replaces an earlier one) keeps the writer's lock: a second writer is
    refused for as long as the first one writes, and can write once it has finished."""
    from moetrace.tracer.store.zarr_store import TraceWriter

    sizes = {"layers": 1, "hidden": 8, "expert": 4, "k": 2, "vocab": 300}
    path = tmp_path / "v.zarr"
    w = TraceWriter(path, sizes, tiny_tokens, ["free"], ["resid"], {"variant": "v"})
    w.flush()  # the store is created
    assert (path / LOCK_NAME).is_file()
    assert (path / "zarr.json").is_file()
    with pytest.raises(MoetraceError, match="being written by another moetrace run"):
        TraceWriter(path, sizes, tiny_tokens, ["free"], ["resid"], {"variant": "v"})
    w.finish()
    assert not (path / LOCK_NAME).exists()
    TraceWriter(path, sizes, tiny_tokens, ["free"], ["resid"], {"variant": "v"}).release()


def test_store_layout_reads_like_xarrays_own(tmp_path, tiny_tokens):
    """The writer creates the group and its coordinates through zarr; xarray must read them back exactly
    as the same coordinates written by xarray's own to_zarr, and the consolidated metadata must be
    what zarr's consolidate_metadata makes of the same store (nothing written since)."""
    import json

    import zarr

    from moetrace.tracer.store.zarr_store import TraceWriter

    text = np.array(["é", "a b", "\n", "", "漢"] * (tiny_tokens.n // 5 + 1))[: tiny_tokens.n]  # multi-byte UTF-8
    tokens = type(tiny_tokens)(ids=tiny_tokens.ids, seq=tiny_tokens.seq, pos=tiny_tokens.pos, text=text)
    sizes = {"layers": 3, "hidden": 8, "expert": 4, "k": 2, "vocab": 300}
    w = TraceWriter(tmp_path / "v.zarr", sizes, tokens, ["free", "teacher"], ["resid"], {"variant": "v", "model": "m"})
    w.finish()
    ours = xr.open_zarr(tmp_path / "v.zarr")
    theirs_ds = xr.Dataset(coords={
        "mode": np.array(["free", "teacher"], dtype=object), "layer": np.arange(3), "token": np.arange(tokens.n),
        "token_id": ("token", tokens.ids.astype(np.int64)), "seq": ("token", tokens.seq.astype(np.int32)),
        "pos": ("token", tokens.pos.astype(np.int32)), "token_text": ("token", np.asarray(text, dtype=object)),
    })
    with warnings.catch_warnings():  # zarr: consolidated metadata is not in the v3 spec (yet)
        warnings.simplefilter("ignore")
        theirs_ds.to_zarr(tmp_path / "x.zarr", zarr_format=3)
    theirs = xr.open_zarr(tmp_path / "x.zarr")
    assert set(ours.coords) == set(theirs.coords)
    for name in theirs.coords:
        assert ours[name].dims == theirs[name].dims, name
        assert ours[name].dtype == theirs[name].dtype, name
        assert np.array_equal(ours[name].values, theirs[name].values), name
    assert list(ours.data_vars) == ["resid"] and ours.resid.dims == ("mode", "layer", "token", "hidden")
    mine = json.loads((tmp_path / "v.zarr" / "zarr.json").read_text())["consolidated_metadata"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(tmp_path / "v.zarr")
    zarrs = json.loads((tmp_path / "v.zarr" / "zarr.json").read_text())["consolidated_metadata"]
    assert mine == zarrs


def test_progress_marker_exact_while_attribute_lags(tmp_path, tiny_tokens, monkeypatch):
    """After every layer the progress marker says exactly how many layers landed, while the layers_done
    attribute is refreshed only every ATTRS_INTERVAL_S; readers take the larger. Finishing leaves one
    metadata write (complete, the final count, consolidated) and no marker behind."""
    import json

    import torch

    from moetrace.tracer.store import schema
    from moetrace.tracer.store import zarr_store as S
    from moetrace.tracer.execution.resume import store_state

    monkeypatch.setattr(schema, "ATTRS_INTERVAL_S", 3600.0)  # the attribute never refreshes within this test
    sizes = {"layers": 3, "hidden": 8, "expert": 4, "k": 2, "vocab": 16}
    path = tmp_path / "v.zarr"
    w = S.TraceWriter(path, sizes, tiny_tokens, ["free"], ["resid"], {"variant": "v", "model": "m"})
    markers = lambda: sorted(p.name for p in path.iterdir() if p.name.startswith(S.PROGRESS_PREFIX))  # noqa: E731
    for L in range(2):
        w.write_layer("free", L, {"resid": torch.full((tiny_tokens.n, 8), float(L))})
        w.mark_layers_done(L + 1)
        w.flush()
        assert markers() == [f"{S.PROGRESS_PREFIX}{L + 1}"]  # exact, and the one before is gone
        assert json.loads((path / "zarr.json").read_text())["attributes"]["layers_done"] == 0  # lags
        assert S.layers_done(path) == L + 1 and store_state(path)["layers_done"] == L + 1
        assert moetrace.open_trace(path, allow_incomplete=True).attrs["layers_done"] == L + 1
    with pytest.raises(MoetraceError, match=r"incomplete \(2 of 3 layers"):
        moetrace.open_trace(path)
    w.write_layer("free", 2, {"resid": torch.full((tiny_tokens.n, 8), 2.0)})
    w.mark_layers_done(3)
    w.finish()
    assert markers() == []
    group = json.loads((path / "zarr.json").read_text())
    assert group["attributes"]["complete"] is True and group["attributes"]["layers_done"] == 3
    assert "resid" in group["consolidated_metadata"]["metadata"]
    ds = moetrace.open_trace(path)
    assert np.array_equal(ds.resid.sel(mode="free").values[:, 0, 0], [0.0, 1.0, 2.0])


def test_progress_attribute_refreshed_when_interval_passed(tmp_path, tiny_tokens, monkeypatch):
    import json

    import torch

    from moetrace.tracer.store import schema
    from moetrace.tracer.store import zarr_store as S

    monkeypatch.setattr(schema, "ATTRS_INTERVAL_S", 0.0)  # every layer
    sizes = {"layers": 2, "hidden": 8, "expert": 4, "k": 2, "vocab": 16}
    w = S.TraceWriter(tmp_path / "v.zarr", sizes, tiny_tokens, ["free"], ["resid"], {"variant": "v", "model": "m"})
    w.write_layer("free", 0, {"resid": torch.zeros(tiny_tokens.n, 8)})
    w.mark_layers_done(1)
    w.flush()
    assert json.loads((tmp_path / "v.zarr" / "zarr.json").read_text())["attributes"]["layers_done"] == 1
    w.release()


@pytest.mark.parametrize("torn", ["empty", "half"])
def test_torn_chunk_after_last_done_layer_reads_as_unwritten(tmp_path, tiny_tokens, torn):
    """A run killed while writing layer 2's chunks (an empty or half-written chunk file) leaves layers 0-1
    readable; layer 2 reads as NaN, not as damage, and so do torn logits. The same tear in a layer counted
    done is damage."""
    import torch

    from moetrace.tracer.store import zarr_store as S

    T = tiny_tokens.n
    sizes = {"layers": 4, "hidden": 8, "expert": 4, "k": 2, "vocab": 16}
    path = tmp_path / "v.zarr"
    w = S.TraceWriter(path, sizes, tiny_tokens, ["free", "teacher"], ["resid", "logits"],
                      {"variant": "v", "model": "m"})
    for L in range(3):
        for m in w.modes:
            w.write_layer(m, L, {"resid": torch.full((T, 8), float(L + 1))})
        if L < 2:
            w.mark_layers_done(L + 1)
    w.write_logits("free", torch.ones(T, 16))  # as if the kill came while the logits were written
    w.flush()
    logits_chunk = next(p for p in (path / "logits").iterdir() if p.name.startswith("c"))
    logits_chunk.write_bytes(logits_chunk.read_bytes()[:7])
    w.release()
    chunk = path / "resid" / "c.1.2.0.0"  # teacher, layer 2
    assert chunk.is_file()
    data = chunk.read_bytes()
    chunk.write_bytes(b"" if torn == "empty" else data[: len(data) // 2])
    ds = moetrace.open_trace(path, allow_incomplete=True)
    assert ds.attrs["layers_done"] == 2
    resid = ds.resid.values
    for L in range(2):
        assert np.array_equal(resid[:, L], np.full((2, T, 8), L + 1.0, np.float32))
    assert np.isnan(resid[:, 2:]).all()  # layer 2 (torn in teacher, whole in free) is not yet done
    assert np.array_equal(ds.resid.sel(mode="free", layer=1).values, np.full((T, 8), 2.0, np.float32))
    assert np.isnan(ds.logits.values).all()  # written after the last layer: an incomplete store has none
    # A tear in a layer the store counts as done is damage, named.
    done_chunk = path / "resid" / "c.1.1.0.0"
    done_chunk.write_bytes(done_chunk.read_bytes()[:-1] + b"\x00")
    with pytest.raises(MoetraceError, match=r"damaged: resid of layer 1 \(teacher\)"):
        moetrace.open_trace(path, allow_incomplete=True).resid.values
