"""End-to-end: real subprocess runs of `moetrace recipe`, `quantize` and `audit` on builtin:tiny."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
from cli_runner import moetrace as run_moetrace

PLANT = "1:3:down"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # A private cache: the quantized-weight cache starts cold and the test sees what the CLI stores.
    cache = tmp_path_factory.mktemp("cache")
    # A progress line per step (MOETRACE_PROGRESS=lines), though the output is a pipe.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "MOETRACE_CACHE": str(cache), "MOETRACE_PROGRESS": "lines"}, cache


def moetrace(env, *args, check=True):
    return run_moetrace(*args, check=check, env=env[0])


def test_recipe_json_agrees_with_the_library_and_the_table_has_totals(env):
    from moetrace.tracer.weights import derive as W

    j = json.loads(moetrace(env, "recipe", "--model", "builtin:tiny", "q4_k_m", "--json").stdout)
    lib = W.recipe_summary(W.config_source("builtin:tiny"), "q4_k_m")
    assert j["total_bytes"] == lib.total_bytes and j["bits_per_weight"] == pytest.approx(lib.bits_per_weight)
    assert {t["name"]: t["type"] for t in j["tensors"]} == {t.name: t.type_name for t in lib.tensors}
    assert j["tensors"][0]["n_bytes"] == lib.tensors[0].n_bytes
    # A 48-layer model at Qwen3-30B-A3B's widths is described without generating its weights.
    p = moetrace(env, "recipe", "--model", "builtin:qwen3-30b-a3b:layers=48", "q4_k_m")
    lines = p.stdout.strip().splitlines()
    assert lines[0] == "q4_k_m on builtin:qwen3-30b-a3b:layers=48"
    assert any(ln.startswith("blk.47.ffn_down_exps.weight") and " Q6_K " in ln for ln in lines)
    assert lines[-1].startswith("total: 579 tensors") and "bits per weight" in lines[-1]
    assert not list(env[1].glob("builtin/qwen3-30b-a3b*"))


def test_unknown_file_type_is_one_line_listing_the_valid_ones(env):
    p = moetrace(env, "quantize", "q4km", "-o", "x.gguf", check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown llama.cpp file type 'q4km'" in lines[0] and "q4_k_m" in lines[0], p.stderr


def test_quantize_writes_a_gguf_and_a_second_run_uses_the_cache(env, tmp_path):
    out = tmp_path / "tiny-q8_0.gguf"
    p = moetrace(env, "quantize", "--model", "builtin:tiny", "q8_0", "-o", str(out))
    assert "tensor 51/51 written" in p.stderr and ", 0 from the cache" in p.stdout
    reader = gguf.GGUFReader(out)
    assert len(reader.tensors) == 51
    assert reader.fields["general.architecture"].contents() == "qwen3moe"
    j = json.loads(moetrace(env, "quantize", "--model", "builtin:tiny", "q8_0", "-o", str(out), "--json").stdout)
    assert j["quantized"] == 0 and j["from_cache"] > 0
    assert j["tensors"] == 51 and j["file_bytes"] == out.stat().st_size
    again = gguf.GGUFReader(out)
    for a, b in zip(reader.tensors, again.tensors):
        assert a.name == b.name and np.array_equal(np.asarray(a.data), np.asarray(b.data))


def test_audit_finds_the_planted_matrix(env, tmp_path):
    from moetrace.tracer.sources import builtin as builtin

    plant = builtin.parse_builtin("builtin:tiny", plant=PLANT).plant
    store = tmp_path / "audit.zarr"
    p = moetrace(env, "audit", "--model", "builtin:tiny", "--plant", PLANT, "--variant", "q4_k_m",
                 "--out", str(store), "--json")
    j = json.loads(p.stdout)
    worst = j["worst"][0]
    assert (worst["layer"], worst["expert"], worst["proj"]) == (plant.layer, plant.expert, plant.proj), (
        f"worst {worst}, next {j['worst'][1]}")
    assert j["n_flagged"] == 1 and j["flagged"] == [worst], f"planted {worst['cosine']}, next {j['worst'][1]}"
    assert (store / "zarr.json").is_file() and j["store"] == str(store)
    assert "layer 4/4 audited" not in p.stderr  # --json keeps stderr quiet too


def test_audit_rejects_bad_input_in_one_line(env):
    p = moetrace(env, "audit", "--model", "builtin:tiny", "--variant", "q4_k_q", check=False)
    assert p.returncode == 2 and "valid file types" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_audit_of_a_gguf_file_finds_the_planted_matrix(env, tmp_path):
    """`quantize` a planted model, then `audit --variant gguf --gguf FILE`: the file's planted matrix ranks first."""
    from moetrace.tracer.sources import builtin as builtin

    plant = builtin.parse_builtin("builtin:tiny", plant=PLANT).plant
    f = tmp_path / "planted-q4_k_m.gguf"
    moetrace(env, "quantize", "--model", "builtin:tiny", "--plant", PLANT, "q4_k_m", "-o", str(f), "-q")
    p = moetrace(env, "audit", "--model", "builtin:tiny", "--plant", PLANT, "--variant", "gguf", "--gguf", str(f),
                 "--out", str(tmp_path / "a.zarr"), "--json")
    j = json.loads(p.stdout)
    worst = j["worst"][0]
    assert (worst["layer"], worst["expert"], worst["proj"]) == (plant.layer, plant.expert, plant.proj)
    assert j["n_flagged"] == 1
    bad = moetrace(env, "audit", "--model", "builtin:tiny", "--variant", "gguf", check=False)
    assert bad.returncode != 0 and "give --gguf FILE" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cache_command_reports_prunes_and_clears(env):
    moetrace(env, "quantize", "--model", "builtin:tiny", "q8_0", "-o", str(env[1] / "x.gguf"), "-q")
    j = json.loads(moetrace(env, "cache", "--json").stdout)
    assert j["root"] == str(env[1]) and j["quant_entries"] > 0 and j["builtin_bytes"] > 0
    pruned = json.loads(moetrace(env, "cache", "--prune", str(j["quant_bytes"] // 2), "--json").stdout)
    assert pruned["deleted_entries"] > 0 and pruned["quant_bytes"] <= j["quant_bytes"] // 2
    cleared = moetrace(env, "cache", "--clear")
    assert "quantized weights 0 entries" in cleared.stdout
    bad = moetrace(env, "cache", "--prune", "lots", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
