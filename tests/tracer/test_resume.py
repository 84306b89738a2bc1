"""A stopped run continues with --resume and ends exactly as an uninterrupted one; failed writes say so."""

from __future__ import annotations


import numpy as np
import pytest
import zarr

import moetrace
from cli_runner import kill_run_after
from moetrace.errors import MoetraceError
from moetrace.tracer import api
from moetrace.tracer.execution.executor import RunConfig, run_trace
from moetrace.tracer.execution.resume import store_state
from moetrace.tracer.store.schema import TABLE_VARS

MODEL = "builtin:tiny:layers=12"
TEXT = "Resume me: experts route tokens, and the error grows."
RUN_ARGS = dict(model=MODEL, variants=["orig-bf16", "pure_q8_0-fp16"], modes=["free", "teacher", "routing"],
                text=TEXT)


def assert_same_store(a, b):
    """Every array, coordinate and attribute (but the creation time) of two stores is identical."""
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        x, y = ga[name][...], gb[name][...]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype.kind == "f" and name not in TABLE_VARS:  # the per-expert table is NaN outside teacher mode
            assert np.isfinite(x).all(), f"{a.name}: {name} has unwritten (NaN) entries"
        assert np.array_equal(x, y, equal_nan=name in TABLE_VARS), f"{a.name}: {name} differs"
    ta, tb = dict(ga.attrs), dict(gb.attrs)
    ta.pop("created"), tb.pop("created")
    assert ta == tb


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["run", "--model", MODEL, "--out", str(tmp_path), "--run", "killed", "--text", TEXT] \
        + sum((["--variant", v] for v in RUN_ARGS["variants"]), []) + sum((["--mode", m] for m in RUN_ARGS["modes"]), [])
    kill_run_after(args, "layer 3/12 traced")
    run_dir = tmp_path / "killed"
    done = [store_state(p)["layers_done"] for p in sorted(run_dir.glob("*.zarr"))]
    assert len(done) == 3 and all(0 < n < 12 for n in done), done
    with pytest.raises(MoetraceError, match="incomplete"):
        moetrace.open_trace(run_dir / "orig-bf16.zarr")

    from click.testing import CliRunner

    from moetrace.cli.main import main

    result = CliRunner().invoke(main, args + ["--resume"])  # the same command, in this process
    assert result.exit_code == 0, result.output
    assert f"continuing at layer {min(done)} of 12" in result.stderr
    full = api.run(**RUN_ARGS, out_dir=str(tmp_path), run_name="full")
    for name in ("orig-fp32", "orig-bf16", "pure_q8_0-fp16"):
        assert moetrace.open_trace(run_dir / f"{name}.zarr").attrs["complete"]
        assert_same_store(run_dir / f"{name}.zarr", full.stores[name])


def test_resume_refuses_other_options_and_empty_folders(tmp_path, tiny_source, tiny_tokens):
    cfg = RunConfig(model="builtin:tiny", variants=["orig-bf16"], sites=["resid", "logits"])
    run_trace(tiny_source, cfg, tiny_tokens, tmp_path / "r")
    other = RunConfig(model="builtin:tiny", variants=["orig-bf16"], sites=["resid", "logits"], modes=["teacher"])
    with pytest.raises(MoetraceError, match=r"cannot resume .*orig-fp32\.zarr.*modes=\['free'\], this run asks for "
                                            r"modes=\['teacher'\]"):
        run_trace(tiny_source, other, tiny_tokens, tmp_path / "r", resume=True)
    with pytest.raises(MoetraceError, match="nothing to resume"):
        api.run(model="builtin:tiny", variants=["orig-bf16"], out_dir=str(tmp_path), run_name="none", resume=True)


def test_failed_write_leaves_store_incomplete_and_says_so(tmp_path, tiny_source, tiny_tokens, tiny_run):
    """A write that fails at layer 2: the error says the stores are incomplete; --resume then finishes them exactly.

    The failure is a real one from the operating system, whatever the writer's mechanism: once
    every store has recorded layers 0 and 1 done, a file-size limit (RLIMIT_FSIZE, with SIGXFSZ
    ignored so the write returns EFBIG, as a full disk makes a write raise) stops every chunk file
    of a hidden-size site, one (mode, layer) slab each.
    """
    import resource
    import signal
    import time

    from moetrace.tracer.store import zarr_store as S

    run_dir = tmp_path / "full"
    T, H = tiny_tokens.n, tiny_source.config.hidden_size
    limit = T * H * 4  # below a resid chunk (its bytes and a 4-byte checksum)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def block_layer_2(event, **info):
        if event == "layer_start" and info["layer"] == 2:
            # The writer threads land layer 1 and then its mark while layer 2 computes: wait for them.
            deadline = time.time() + 60
            while any(S.layers_done(p) < 2 for p in run_dir.glob("*.zarr")):
                assert time.time() < deadline, "layer 1 never landed"
                time.sleep(0.01)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))

    cfg = RunConfig(model="builtin:tiny", variants=["orig-bf16"], modes=["free", "teacher", "routing"])
    try:
        with pytest.raises(MoetraceError, match=r"orig-(fp32|bf16)\.zarr failed \(.+; noticed at layer [23]\).*left "
                                                r"marked incomplete.*--resume"):
            run_trace(tiny_source, cfg, tiny_tokens, run_dir, progress=block_layer_2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)  # space freed
        signal.signal(signal.SIGXFSZ, old_handler)
    for p in run_dir.glob("*.zarr"):
        assert store_state(p)["layers_done"] == 2  # layer 2 is not covered
        assert store_state(p)["complete"] is False
        assert not (p / ".moetrace-writer.lock").exists()
    with pytest.raises(MoetraceError, match="incomplete"):
        moetrace.open_trace(run_dir / "orig-bf16.zarr")

    stores = run_trace(tiny_source, cfg, tiny_tokens, run_dir, resume=True)
    _, want = tiny_run  # the same configuration, never interrupted
    for name in ("orig-fp32", "orig-bf16"):
        assert_same_store(stores[name], want[name])
