"""End-to-end: real subprocess runs of the `moetrace` command."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


from cli_runner import moetrace  # noqa: E402


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    p = moetrace("run", "--model", "builtin:tiny", "--variant", "orig-bf16", "--variant", "orig-fp16",
                 "--text", "Hello experts.", "--out", str(out), "--run", "r1",
                 env={**os.environ, "MOETRACE_PROGRESS": "lines"})  # a progress line per layer, though not a TTY
    return out / "r1", p


def test_run_prints_table_and_progress(cli_run):
    run_dir, p = cli_run
    assert "orig-bf16 vs orig-fp32 (free mode) on builtin:tiny" in p.stdout
    assert re.search(r"^\s+3\s+\d\.\d\de-\d\d", p.stdout, re.M)  # a row for the last layer
    assert "output: KL(ref || variant) mean" in p.stdout
    assert "layer 4/4 traced" in p.stderr
    assert sorted(x.name for x in run_dir.glob("*.zarr")) == ["orig-bf16.zarr", "orig-fp16.zarr", "orig-fp32.zarr"]


def test_second_run_reuses_reference(cli_run):
    run_dir, _ = cli_run
    before = (run_dir / "orig-fp32.zarr" / "zarr.json").stat().st_mtime_ns
    p = moetrace("run", "--model", "builtin:tiny", "--variant", "orig-bf16", "--text", "Hello experts.",
                 "--out", str(run_dir.parent), "--run", "r1")
    assert "already recorded" in p.stderr
    assert (run_dir / "orig-fp32.zarr" / "zarr.json").stat().st_mtime_ns == before


def test_diff_json_matches_library(cli_run):
    import moetrace as mt
    from moetrace.tracer.analysis import compare as compare

    run_dir, _ = cli_run
    p = moetrace("diff", str(run_dir / "orig-fp32.zarr"), str(run_dir / "orig-bf16.zarr"), "--json")
    data = json.loads(p.stdout)
    lib = compare.diff(mt.open_trace(run_dir / "orig-fp32.zarr"), mt.open_trace(run_dir / "orig-bf16.zarr"))
    assert [row["layer"] for row in data["layers"]] == [0, 1, 2, 3]
    assert np.allclose([row["resid_rel_l2_mean"] for row in data["layers"]], lib.resid_rel_l2_mean.values)
    assert data["output"]["kl_mean"] == pytest.approx(float(lib.kl_mean))


def test_run_json_and_prompts_file(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "first prompt"}\n\n{"text": "second"}\n')
    p = moetrace("run", "--model", "builtin:tiny", "--variant", "orig-bf16", "--prompts", str(prompts),
                 "--out", str(tmp_path), "--run", "j", "--json")
    data = json.loads(p.stdout)
    assert set(data["diffs"]) == {"orig-bf16"}
    import moetrace as mt

    ds = mt.open_trace(data["stores"]["orig-bf16"])
    assert ds.sizes["token"] == len("first prompt") + len("second")
    assert list(np.unique(ds.seq.values)) == [0, 1]


def test_variants_and_models_list():
    p = moetrace("variants")
    assert "WEIGHTS-COMPUTE" in p.stdout and "orig-bf16" in p.stdout
    names = json.loads(moetrace("variants", "--json").stdout)["variants"]
    assert "orig-fp32" in names and all(n.count("-") >= 1 for n in names)
    p = moetrace("models")
    assert "builtin:mini (default, builtin:)" in p.stdout and "builtin:qwen3-30b-a3b" in p.stdout


def test_help_is_fast_and_explains():
    p = moetrace("--help")
    assert "moetrace run --variant" in p.stdout
    for cmd in ("run", "diff", "variants", "models"):
        assert moetrace(cmd, "--help").stdout.strip()


@pytest.mark.parametrize("args,msg", [
    (["run", "--variant", "q4km-bf16"], "unknown variant weights 'q4km'"),
    (["run", "--variant", "orig-fp8"], "unknown compute 'fp8'"),
    (["run", "--model", "builtin:nope", "--variant", "orig-bf16"], "unknown built-in model"),
    (["run", "--model", "/no/such/folder", "--variant", "orig-bf16"], "does not exist"),
    (["run", "--model", "builtin:tiny", "--variant", "orig-bf16", "--text", "   "], "empty"),
    (["run", "--model", "builtin:tiny", "--variant", "orig-bf16", "--plant", "9:0:down"], "outside"),
    (["run", "--model", "builtin:tiny", "--variant", "orig-bf16", "--prompts", "/no/file"], "does not exist"),
    (["diff", "/no/a.zarr", "/no/b.zarr"], "does not exist"),
])
def test_bad_input_is_one_line_error(args, msg):
    p = moetrace(*args, check=False)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("moetrace: error:")]
    assert len(errors) == 1 and msg in errors[0], p.stderr
    assert "Traceback" not in p.stderr


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    p = moetrace("run", "--model", "builtin:tiny", "--variant", "orig-bf16", "--text", "x y",
                 "--out", str(blocker), check=False)
    assert p.returncode == 2 and "cannot write to output folder" in p.stderr and "Traceback" not in p.stderr


def test_diff_of_different_models_refused(cli_run, tmp_path):
    run_dir, _ = cli_run
    moetrace("run", "--model", "builtin:tiny:seed=7", "--variant", "orig-bf16", "--text", "Hello experts.",
             "--out", str(tmp_path), "--run", "other")
    p = moetrace("diff", str(run_dir / "orig-fp32.zarr"), str(tmp_path / "other" / "orig-bf16.zarr"), check=False)
    assert p.returncode == 2 and "different models" in p.stderr


def test_demo_text_routes_to_demo_plant(tmp_path):
    """The Makefile's demo plants a fault; the demo text must send tokens to that expert."""
    from moetrace.tracer.execution.executor import RunConfig, run_trace
    from moetrace.tracer.sources.prompts import DEMO_TEXT, tokenize
    from moetrace.tracer.sources.checkpoint import open_source

    demo_args = re.search(r"^DEMO_ARGS \?=(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    plant = re.search(r"--plant (\S+)", demo_args).group(1)
    layer, expert, _ = plant.split(":")
    src = open_source("builtin:", plant=plant)
    stores = run_trace(src, RunConfig(model="builtin:", variants=[], sites=["topk_idx"]),
                       tokenize([DEMO_TEXT], src.tokenizer), tmp_path)
    import moetrace as mt

    idx = mt.open_trace(stores["orig-fp32"]).topk_idx.sel(mode="free", moe_layer=int(layer)).values
    assert (idx == int(expert)).any(-1).sum() >= 10


def test_a_run_of_the_logits_alone_summarizes_the_output(tmp_path):
    p = moetrace("run", "--model", "builtin:tiny", "--variant", "orig-bf16", "--sites", "logits", "--text",
                 "Hello experts.", "--out", str(tmp_path), "--run", "logits-only", "-q")
    assert "(no layer sites recorded)" in p.stdout and "output: KL(ref || variant) mean" in p.stdout


def test_routing_mode_alone_works_end_to_end(tmp_path):
    """`--mode routing` alone: run summarizes that mode, report gives its headline figures in it,
    and decompose (which needs free and teacher) says so in one line."""
    moetrace("run", "--model", "builtin:tiny", "--variant", "q8_0-bf16", "--mode", "routing", "--text",
             "Hello experts.", "--out", str(tmp_path), "--run", "r", "-q")
    rep = moetrace("report", str(tmp_path / "r"), "-q", "--resamples", "50")
    assert "q8_0-bf16 (routing mode)" in rep.stdout
    dec = moetrace("decompose", str(tmp_path / "r" / "orig-fp32.zarr"), str(tmp_path / "r" / "q8_0-bf16.zarr"),
                   check=False)
    assert dec.returncode == 2 and len(dec.stderr.strip().splitlines()) == 1 and "'free' mode" in dec.stderr
