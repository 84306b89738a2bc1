"""A damaged store is an error naming the store, variable and layer, never zeros or NaN read as data.

Damage: a chunk deleted, truncated, or one byte flipped; through the library (open_trace or the
first read) and through the real command line (diff, report, decompose, routing: one line, exit 2).
Also: stores of the earlier layouts (no checksums) are read, and refused for --resume.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import moetrace
from cli_runner import moetrace as run_cli
from moetrace.errors import MoetraceError

LAYER = 2  # the damaged layer
CHUNK = f"resid/c.0.{LAYER}.0.0"  # mode 0 (free), layer 2 of resid


def damage(store, how: str, chunk: str = CHUNK) -> None:
    f = store / chunk
    data = bytearray(f.read_bytes())
    if how == "delete":
        f.unlink()
    elif how == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[len(data) // 3] ^= 0x10  # one bit of one byte; the size stays right
        f.write_bytes(bytes(data))


@pytest.fixture
def damaged_run(tiny_run, tmp_path, request):
    run_dir, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    damage(copy / "orig-bf16.zarr", request.param)
    return copy, request.param


@pytest.mark.parametrize("damaged_run", ["delete", "truncate", "flip"], indirect=True)
def test_damage_is_an_error_naming_store_variable_layer(damaged_run):
    run_dir, how = damaged_run
    store = run_dir / "orig-bf16.zarr"
    want = rf"orig-bf16\.zarr.*is damaged: resid of layer {LAYER} \(free\)"
    with pytest.raises(MoetraceError, match=want) as e:
        ds = moetrace.open_trace(store)  # delete and truncate: seen in the listing, at open
        assert how == "flip", "a missing or short chunk must fail at open"
        ds.resid.sel(mode="free").values  # flip: the first read of the chunk fails its checksum
    assert "\n" not in str(e.value)
    with pytest.raises(MoetraceError, match=want):
        moetrace.open_traces(run_dir).resid.values
    # The undamaged store of the same run still reads.
    ok = moetrace.open_trace(run_dir / "orig-fp32.zarr").resid.sel(mode="free").values
    assert np.isfinite(ok).all()


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
@pytest.mark.parametrize("command", ["diff", "report", "decompose", "routing"])
def test_cli_commands_refuse_damaged_store_in_one_line(tiny_run, how, command, tmp_path):
    """A flipped byte fails on read, so the damaged variable is one the command reads (routing reads
    the routing sites, not resid)."""
    var = "topk_idx" if command == "routing" else "resid"
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    damage(run_dir / "orig-bf16.zarr", how, f"{var}/c.0.{LAYER}.0.0")
    ref, var_store = str(run_dir / "orig-fp32.zarr"), str(run_dir / "orig-bf16.zarr")
    args = {"diff": ["diff", ref, var_store], "decompose": ["decompose", ref, var_store],
            "routing": ["routing", ref, var_store],
            "report": ["report", str(run_dir), "--out", str(tmp_path / "report"), "--quiet"]}[command]
    p = run_cli(*args, check=False, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "orig-bf16.zarr" in lines[0] and f"{var} of layer {LAYER} (free)" in lines[0], lines[0]
    assert "relL2" not in p.stdout  # no table of numbers from the damaged store


def test_healthy_store_reads_through_checked_arrays_exactly(tiny_run):
    """The checked reads return exactly what zarr reads, in one Dask chunk per (mode, layer)."""
    import zarr

    _, stores = tiny_run
    ds = moetrace.open_trace(stores["orig-bf16"])
    raw = zarr.open_group(stores["orig-bf16"], mode="r")
    for name in ds.data_vars:
        assert np.array_equal(ds[name].values, raw[name][...], equal_nan=True), name
    assert ds.resid.chunks[1] == (1,) * ds.sizes["layer"]
    assert raw["resid"].metadata.codecs[-1].to_dict()["name"] == "crc32c"


@pytest.mark.parametrize("layout", ["per-chunk", "sharded"])
def test_earlier_layouts_read_and_refused_for_resume(tmp_path, tiny_tokens, layout):
    """Stores of earlier versions (raw chunks without checksum; one object per chunk, or one shard per
    array and mode) read as before, a missing chunk is still an error, and --resume refuses them."""
    import zarr
    from zarr.codecs import BytesCodec, ShardingCodec

    from moetrace.tracer.execution.resume import ResumedWriter

    T, L, H = tiny_tokens.n, 3, 8
    path = tmp_path / "old.zarr"
    g = zarr.open_group(path, mode="w", zarr_format=3,
                        attributes={"variant": "v", "model": "m", "modes": ["free"], "sites": ["resid"],
                                    "complete": False, "layers_done": 2})
    g.create_array("mode", shape=(1,), dtype=str, dimension_names=("mode",))[...] = np.array(["free"], dtype=object)
    g.create_array("layer", shape=(L,), dtype="int64", dimension_names=("layer",))[...] = np.arange(L)
    g.create_array("token", shape=(T,), dtype="int64", dimension_names=("token",))[...] = np.arange(T)
    kw = dict(serializer=ShardingCodec(chunk_shape=(1, 1, T, H), codecs=[BytesCodec()], index_codecs=[BytesCodec()],
                                       index_location="start"), chunks=(1, L, T, H)) if layout == "sharded" \
        else dict(chunks=(1, 1, T, H), serializer=BytesCodec())
    a = g.create_array("resid", shape=(1, L, T, H), dtype="float32", fill_value=np.nan, compressors=None,
                       dimension_names=("mode", "layer", "token", "hidden"),
                       chunk_key_encoding={"name": "default", "separator": "."}, **kw)
    want = np.arange(2 * T * H, dtype=np.float32).reshape(2, T, H)
    a[0, :2] = want
    ds = moetrace.open_trace(path, allow_incomplete=True)
    assert np.array_equal(ds.resid.values[0, :2], want) and np.isnan(ds.resid.values[0, 2]).all()
    with pytest.raises(MoetraceError, match="earlier moetrace version"):
        ResumedWriter(path)
    assert not (path / ".moetrace-writer.lock").exists()  # the refusal leaves no lock behind
    (path / "resid" / "c.0.0.0.0").unlink()
    with pytest.raises(MoetraceError, match=r"is damaged: resid of layer 0 \(free\) - chunk resid/c\.0\.0\.0\.0 is "
                                            r"missing"):
        moetrace.open_trace(path, allow_incomplete=True)
