"""The file boundary (tracer/sources/validate.py): real safetensors files written by the safetensors
package, then damaged; each damage is one MoetraceError naming the file and what is wrong."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from moetrace.errors import MoetraceError
from moetrace.tracer.sources import validate


@pytest.fixture
def st_file(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, 8, dtype=torch.bfloat16), "b": torch.zeros(3, dtype=torch.float32)}, str(p))
    return p


def _rewrite_header(p, edit):
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_a_sound_file_passes(st_file):
    header, start = validate.safetensors_header(st_file)
    assert set(header) == {"a", "b"} and start > 8


@pytest.mark.parametrize("damage,fragment", [
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "truncated or not safetensors"),
    (lambda p: p.write_bytes(p.read_bytes()[:-4]), "is truncated"),
    (lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + p.read_bytes()[8:]), "header length"),
    (lambda p: p.write_bytes(p.read_bytes()[:8] + b"\xff" + p.read_bytes()[9:]), "corrupted header"),
])
def test_cut_or_garbled_files_are_refused(st_file, damage, fragment):
    damage(st_file)
    with pytest.raises(MoetraceError, match=fragment):
        validate.safetensors_header(st_file)


def test_a_changed_dtype_that_changes_the_size_is_refused(st_file):
    _rewrite_header(st_file, lambda h: h["a"].update(dtype="F32"))
    with pytest.raises(MoetraceError, match="needs 128 bytes but its data_offsets"):
        validate.safetensors_header(st_file)


def test_overlapping_tensors_are_refused(st_file):
    def overlap(h):
        a, b = h["a"]["data_offsets"], h["b"]["data_offsets"]
        first, second = ("a", "b") if a[0] < b[0] else ("b", "a")
        s = h[first]["data_offsets"][0] + 2
        h[second]["data_offsets"] = [s, s + h[second]["data_offsets"][1] - h[second]["data_offsets"][0]]

    _rewrite_header(st_file, overlap)
    with pytest.raises(MoetraceError, match="overlaps"):
        validate.safetensors_header(st_file)


def test_an_integer_weight_is_refused(tmp_path):
    with pytest.raises(MoetraceError, match="weights must be one of"):
        validate.check_weight_dtype(tmp_path / "w.safetensors", "w", "I32")


@pytest.mark.parametrize("raw,fragment", [
    ({"hidden_size": "64"}, "hidden_size is '64'"),
    ({"num_hidden_layers": 0}, "num_hidden_layers is 0"),
    ({"num_hidden_layers": True}, "num_hidden_layers is True"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps is -1.0"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "not a multiple of num_key_value_heads"),
    ({"hidden_size": 100, "num_attention_heads": 8}, "no head_dim is given"),
])
def test_config_fields_are_checked(tmp_path, raw, fragment):
    with pytest.raises(MoetraceError, match=fragment):
        validate.check_config(raw, tmp_path / "config.json")


@pytest.mark.parametrize("text,fragment", [("{", "is not valid JSON"), ("[1]", "JSON list, not an object"),
                                            (b"\xff{}", "is not UTF-8")])
def test_json_files(tmp_path, text, fragment):
    p = tmp_path / "config.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(MoetraceError, match=fragment):
        validate.read_json(p, "config")


def test_shapes_against_the_config():
    state = {"w": torch.zeros(2, 3)}
    validate.check_shapes(state, {"w": (2, 3)}, "layer 0")
    with pytest.raises(MoetraceError, match=r"tensor 'w' is \(2, 3\), the config makes it \(3, 2\)"):
        validate.check_shapes(state, {"w": (3, 2)}, "layer 0")
    with pytest.raises(MoetraceError, match="lacks 'v'"):
        validate.check_shapes(state, {"w": (2, 3), "v": (1,)}, "layer 0")
