"""Several GGUF files in one run: ``--gguf NAME=FILE`` (repeatable) and the ``gguf_NAME-COMPUTE`` variants."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from moetrace.errors import MoetraceError
from moetrace.tracer import api
from moetrace.tracer.execution.executor import RunConfig
from moetrace.tracer.store.zarr_store import open_trace
from moetrace.tracer.variants import Variant

MODEL = "builtin:tiny:layers=2"


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    from moetrace.tracer.sources.checkpoint import open_source
    from moetrace.tracer.weights.gguf_writer import write_gguf

    base = tmp_path_factory.mktemp("several")
    src = open_source(MODEL)
    write_gguf(src, "q8_0", base / "a.gguf", cache=False)
    write_gguf(src, "q2_k", base / "b.gguf", cache=False)
    return base / "a.gguf", base / "b.gguf"


def test_named_variants_parse():
    v = Variant.parse("gguf_a-bf16")
    assert (v.weights, v.gguf_name, v.name) == ("gguf_a", "a", "gguf_a-bf16")
    assert Variant.parse("gguf-bf16").gguf_name == "" and Variant.parse("q8_0-bf16").gguf_name is None
    assert Variant.parse("gguf_q4km_2-bf16w-fp32").gguf_name == "q4km_2"
    with pytest.raises(MoetraceError, match="unknown variant weights 'gguf_'"):
        Variant.parse("gguf_-bf16")


def test_two_named_files_and_a_plain_one_in_one_run(two_files, tmp_path):
    a, b = two_files
    r = api.run(model=MODEL, variants=["gguf_a-fp32", "gguf_b-fp32", "gguf-fp32"], text="Experts route tokens.",
                gguf=[f"a={a}", f"b={b}", str(a)], out_dir=tmp_path, run_name="r", sites=["resid", "logits"])
    got = {v: open_trace(p) for v, p in r.stores.items()}
    # The same file as a named and as the plain variant: the same trace, bit for bit.
    assert np.array_equal(got["gguf_a-fp32"].resid.values, got["gguf-fp32"].resid.values)
    # Another file (Q2_K against Q8_0): another trace, further from the reference.
    ref = got["orig-fp32"].logits.values
    err = {v: np.linalg.norm(got[v].logits.values - ref) for v in ("gguf_a-fp32", "gguf_b-fp32")}
    assert 0 < err["gguf_a-fp32"] < err["gguf_b-fp32"]


@pytest.mark.parametrize("variants,ggufs,fragment", [
    (["gguf_a-bf16"], {}, "give --gguf a=FILE"),
    (["orig-bf16"], {"a": "x.gguf"}, "--gguf a=x.gguf is given but no variant uses it"),
])
def test_named_file_and_variant_must_pair(variants, ggufs, fragment):
    with pytest.raises(MoetraceError, match=fragment):
        RunConfig(model=MODEL, variants=variants, ggufs=ggufs)


def test_gguf_option_values(two_files, tmp_path):
    a, b = two_files
    assert api.parse_gguf_options([f"a={a}", str(b)]) == (str(b.resolve()), {"a": str(a.resolve())})
    with pytest.raises(MoetraceError, match="two unnamed files"):
        api.parse_gguf_options([str(a), str(b)])
    with pytest.raises(MoetraceError, match="names 'a' twice"):
        api.parse_gguf_options([f"a={a}", f"a={b}"])
    with pytest.raises(MoetraceError, match="does not exist"):
        api.parse_gguf_options([f"a={tmp_path / 'none.gguf'}"])


def test_cli_repeated_gguf(two_files, tmp_path):
    from moetrace.cli.main import main

    a, b = two_files
    res = CliRunner().invoke(main, ["run", "--model", MODEL, "--variant", "gguf_a-bf16", "--variant", "gguf_b-bf16",
                                    "--gguf", f"a={a}", "--gguf", f"b={b}", "--text", "Hi there", "-q", "--json",
                                    "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert {"gguf_a-bf16", "gguf_b-bf16"} <= set(__import__("json").loads(res.stdout)["stores"])
    listing = CliRunner().invoke(main, ["variants"]).stdout
    assert "gguf_NAME" in listing and "--gguf NAME=FILE" in listing
