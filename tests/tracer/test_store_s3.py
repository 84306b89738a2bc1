"""Traces in object storage: `moetrace run --out s3://...` against a real S3-compatible server on 127.0.0.1.

The server is moto's server mode (a separate HTTP server speaking the S3 protocol), started by
the test; moetrace reaches it through s3fs with the endpoint and credentials in the environment.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cli_runner import moetrace as run_cli
from moetrace.errors import MoetraceError

pytest.importorskip("s3fs", reason="the s3 extra (pip install moetrace[s3]) is part of the test extra")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is part of the test extra")

BUCKET = "traces"
RUN = ["run", "--model", "builtin:tiny", "--variant", "orig-bf16", "--mode", "free", "--mode", "teacher",
       "--text", "Object storage holds the trace.", "--run", "s3run", "-q"]


@pytest.fixture(scope="module")
def s3_env():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    try:
        yield env
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_run_to_s3_equals_run_to_disk(s3_env, tmp_path):
    import xarray as xr

    import moetrace

    run_cli(*RUN, "--out", f"s3://{BUCKET}/t", env={**os.environ, **s3_env})
    run_cli(*RUN, "--out", str(tmp_path))
    opts = {"client_kwargs": {"endpoint_url": s3_env["AWS_ENDPOINT_URL"]}}
    for name in ("orig-fp32", "orig-bf16"):
        url = f"s3://{BUCKET}/t/s3run/{name}.zarr"
        remote = xr.open_zarr(url, storage_options=opts)  # plain xarray, Dask arrays
        local = xr.open_zarr(tmp_path / "s3run" / f"{name}.zarr")
        assert remote.resid.chunks is not None  # lazily, through Dask
        assert set(remote.variables) == set(local.variables)
        for v in local.variables:
            assert np.array_equal(remote[v].values, local[v].values, equal_nan=True), (name, v)
        assert remote.attrs["complete"] is True
        checked = moetrace.open_trace(url)  # moetrace's own reader, endpoint from the environment
        assert np.array_equal(checked.logits.values, local.logits.values, equal_nan=True)
    # The analysis commands read the run from the URL.
    p = run_cli("diff", f"s3://{BUCKET}/t/s3run/orig-fp32.zarr", f"s3://{BUCKET}/t/s3run/orig-bf16.zarr",
                env={**os.environ, **s3_env})
    q = run_cli("diff", str(tmp_path / "s3run" / "orig-fp32.zarr"), str(tmp_path / "s3run" / "orig-bf16.zarr"))
    assert p.stdout == q.stdout


def test_s3_lock_refuses_second_writer_and_damage_is_seen(s3_env, tiny_tokens):
    import s3fs

    import moetrace
    from moetrace.tracer.store.zarr_store import TraceWriter

    url = f"s3://{BUCKET}/lock/v.zarr"
    sizes = {"layers": 2, "hidden": 8, "expert": 4, "k": 2, "vocab": 16}
    w = TraceWriter(url, sizes, tiny_tokens, ["free"], ["resid"], {"variant": "v", "model": "m"})
    with pytest.raises(MoetraceError, match="being written by another moetrace run"):
        TraceWriter(url, sizes, tiny_tokens, ["free"], ["resid"], {"variant": "v"})
    import torch

    for layer in range(2):
        w.write_layer("free", layer, {"resid": torch.full((tiny_tokens.n, 8), float(layer))})
        w.mark_layers_done(layer + 1)
    w.finish()
    fs = s3fs.S3FileSystem()
    assert not fs.exists(f"{BUCKET}/lock/v.zarr/.moetrace-writer.lock")
    assert np.array_equal(moetrace.open_trace(url).resid.values[0, :, 0, 0], [0.0, 1.0])
    fs.rm(f"{BUCKET}/lock/v.zarr/resid/c.0.1.0.0")
    with pytest.raises(MoetraceError, match=r"is damaged: resid of layer 1 \(free\) - chunk resid/c\.0\.1\.0\.0 is "
                                            r"missing"):
        moetrace.open_trace(url)
