"""A planted built-in model is an overlay of its cached base model, and reads as the fully generated planted model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrace.tracer.sources import builtin as builtin
from moetrace.tracer.sources.builtin import parse_builtin
from moetrace.tracer.sources.checkpoint import CheckpointSource, open_source

TEXT = "Experts route tokens; a planted expert breaks under Q4_K."


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETRACE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _full(model, folder):
    """The planted model written whole, as materialize wrote it before overlays."""
    folder.mkdir()
    builtin._write_checkpoint(model, folder)
    return CheckpointSource(folder)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy()  # BF16 as raw bits: numpy has no bfloat16


@pytest.mark.parametrize("spec,plant,n_changed", [
    ("builtin:tiny", "2:3:down", 2),  # fused keys: the layer's gate_up and down tensors
    ("builtin:tiny-mixtral", "1:5:gate", 3),  # per-expert keys: the planted expert's w1, w2, w3
])
def test_overlay_tensors_equal_the_fully_generated_planted_model(cache, tmp_path, spec, plant, n_changed):
    model = parse_builtin(spec, plant)
    src = open_source(spec, plant=plant)
    base = builtin.materialize(parse_builtin(spec))
    assert (src.folder / "model.safetensors").is_symlink()
    assert (src.folder / "model.safetensors").resolve() == (base / "model.safetensors").resolve()
    overlay = src.folder / builtin.OVERLAY_FILE
    assert overlay.stat().st_size < (base / "model.safetensors").stat().st_size / 4
    assert sorted(set(src._index.values())) == sorted([builtin.OVERLAY_FILE, "model.safetensors"])
    assert sum(v == builtin.OVERLAY_FILE for v in src._index.values()) == n_changed
    full = _full(model, tmp_path / "full")
    assert sorted(src._index) == sorted(full._index)
    differ = [k for k in full._index if not np.array_equal(_bits(src.tensor(k)), _bits(full.tensor(k)))]
    assert differ == []
    unplanted = open_source(spec)
    changed = [k for k in full._index if not np.array_equal(_bits(unplanted.tensor(k)), _bits(full.tensor(k)))]
    assert changed and all(src._index[k] == builtin.OVERLAY_FILE for k in changed)  # the overlay holds every change


def test_overlay_with_its_base_deleted_is_regenerated(cache):
    import shutil

    src = open_source("builtin:tiny", plant="1:0:up")
    shutil.rmtree(builtin.materialize(parse_builtin("builtin:tiny")))
    again = open_source("builtin:tiny", plant="1:0:up")
    assert again.folder == src.folder and (again.folder / "model.safetensors").is_file()
    assert again.tensor("model.layers.1.mlp.experts.down_proj").shape == (8, 256, 256)


def test_run_on_the_overlay_records_the_store_of_the_full_planted_model(cache, tmp_path):
    import moetrace
    from moetrace.tracer.execution.executor import RunConfig, run_trace
    from moetrace.tracer.sources.prompts import tokenize

    model = parse_builtin("builtin:tiny", "2:3:down")
    sources = {"overlay": open_source("builtin:tiny", plant="2:3:down"), "full": _full(model, tmp_path / "full")}
    traces = {}
    for name, src in sources.items():
        tokens = tokenize([TEXT], src.tokenizer)
        cfg = RunConfig(model="builtin:tiny", variants=["q4_k_m-bf16"], modes=["free"], plant="2:3:down")
        stores = run_trace(src, cfg, tokens, tmp_path / f"run-{name}")
        traces[name] = {v: moetrace.open_trace(stores[v]) for v in ("orig-fp32", "q4_k_m-bf16")}
    for v in ("orig-fp32", "q4_k_m-bf16"):
        a, b = traces["overlay"][v], traces["full"][v]
        assert np.array_equal(a.resid.values, b.resid.values), v
        assert np.array_equal(a.logits.values, b.logits.values), v
