"""The streaming built-in generator and writer give the very values of the frozen GENERATOR_VERSION 4 one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moetrace.tracer.sources import builtin as builtin
from moetrace.tracer.sources.builtin import Plant, parse_builtin

import builtin_v4_reference as v4

# One layer of a narrow custom shape whose widths are none of tiny's (and T_CHUNK, WRITE_CHUNK do not divide them).
NARROW = dataclasses.replace(builtin.PRESETS["tiny"], layers=1, hidden=512, experts=12, top_k=2, expert_width=768,
                             heads=8, kv_heads=2, head_dim=64, seed=3)


def _assert_same(new: dict, old: dict):
    assert list(new) == list(old)
    for k in old:
        assert new[k].dtype == old[k].dtype and new[k].shape == old[k].shape, k
        diff = np.count_nonzero(new[k] != old[k])
        assert diff == 0, f"{k}: {diff} of {old[k].size} values differ"


@pytest.mark.parametrize("shape", [builtin.PRESETS["tiny"], NARROW], ids=["tiny", "narrow-1-layer"])
@pytest.mark.parametrize("plant", [None, Plant(0, 1, "down"), Plant(0, 5, "gate")], ids=["none", "down", "gate"])
def test_generated_tensors_equal_the_v4_generator(shape, plant):
    _assert_same(dict(builtin.generate_tensors(shape, plant)), dict(v4.generate_tensors(shape, plant)))


@pytest.mark.parametrize("preset", ["tiny", "tiny-mixtral", "tiny-olmoe"])
def test_checkpoint_tensors_equal_the_v4_generator(preset):
    shape = builtin.PRESETS[preset]
    _assert_same(dict(builtin.checkpoint_tensors(shape)), dict(v4.checkpoint_tensors(shape)))


@pytest.mark.parametrize("spec,plant", [("builtin:tiny", "2:3:up"), ("builtin:tiny-mixtral", None)])
def test_written_file_equals_the_v4_writer(tmp_path, spec, plant):
    model = parse_builtin(spec, plant)
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    steps = []
    builtin._write_checkpoint(model, tmp_path / "new", lambda done, total, name: steps.append((done, total)))
    v4._write_checkpoint(model, tmp_path / "old")
    new, old = load_file(str(tmp_path / "new/model.safetensors")), load_file(str(tmp_path / "old/model.safetensors"))
    assert sorted(new) == sorted(old)
    for k in old:  # BF16 as raw bits: numpy has no bfloat16
        a, b = (t.view(torch.int16).numpy() for t in (new[k], old[k]))
        assert a.shape == b.shape and np.array_equal(a, b), k
    assert steps[-1] == (len(old), len(old)) and len(steps) == len(old)
    for f in ("config.json", "moetrace-builtin.json"):
        assert (tmp_path / "new" / f).read_text() == (tmp_path / "old" / f).read_text()


def test_plan_names_and_dims_match_the_tensors():
    shape = builtin.PRESETS["tiny-olmoe"]
    for name, dims, make in builtin.checkpoint_plan(shape):
        assert make().shape == dims, name
