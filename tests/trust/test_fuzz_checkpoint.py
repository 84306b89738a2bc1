"""Property suite, checkpoint folders: config.json, model.safetensors, and a sharded copy with its index.

Each case damages one real file of the built-in model's checkpoint (see fuzz_files) and opens the
folder as ``moetrace run --model FOLDER`` does, reading every layer and the tensors outside them.
The outcome is a result or one one-line MoetraceError, never another exception, never a hang.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_files import Blob, check_outcome, flip, read_checkpoint, st_bytes, st_header

ST_DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "I64", "I32", "I16", "I8", "U8", "BOOL", "Q4", "", 3]
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 40), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True),
    st.text(max_size=6), st.lists(st.integers(-3, 9), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FLIPS = st.lists(st.tuples(st.integers(0, 2 ** 40), st.integers(1, 255)), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def work(trust_files, tmp_path_factory):
    """Copies of the two checkpoint folders; each case writes one file and puts the original back."""
    base = tmp_path_factory.mktemp("ckpt-work")
    return {kind: shutil.copytree(trust_files[kind], base / kind) for kind in ("ckpt", "sharded")}


@contextmanager
def replaced(path, data: bytes | None):
    """``path`` holds ``data`` (None: removed) inside the block, its original bytes after it."""
    original = path.read_bytes()
    try:
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
        yield
    finally:
        path.write_bytes(original)


# -- model.safetensors -----------------------------------------------------------------------------
def _header_edit(draw, data: bytes) -> bytes:
    header, body = st_header(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    how = draw(st.sampled_from(["dtype", "shape", "offsets", "delete", "rename", "entry", "int-same-size"]))
    info = header[name]
    if how == "dtype":
        info["dtype"] = draw(st.sampled_from(ST_DTYPES))
    elif how == "shape":
        info["shape"] = draw(st.lists(st.one_of(st.integers(-2, 600), st.integers(0, 2 ** 62)), max_size=4))
    elif how == "offsets":
        info["data_offsets"] = draw(st.lists(st.integers(-10, len(body) + 10), min_size=0, max_size=3))
    elif how == "delete":
        del header[name]
    elif how == "rename":
        header[draw(st.sampled_from(names + ["model.layers.9.mlp.gate.weight", "x"]))] = header.pop(name)
    elif how == "entry":
        header[name] = draw(JSON_VALUES)
    else:  # an integer dtype of the same width: the bytes still fit, the weight is not a weight
        info["dtype"] = {"BF16": "I16", "F16": "U16", "F32": "I32"}.get(info["dtype"], "I8")
    return st_bytes(header, body)


@st.composite
def safetensors_damage(draw, data: bytes):
    n = int.from_bytes(data[:8], "little")
    how = draw(st.sampled_from(["truncate", "flip", "flip-header", "header"]))
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        return flip(data, draw(FLIPS))
    if how == "flip-header":
        return flip(data, draw(st.lists(st.tuples(st.integers(0, 8 + n - 1), st.integers(1, 255)), min_size=1,
                                        max_size=3)))
    return _header_edit(draw, data)


@given(data=st.data())
def test_damaged_safetensors(work, data):
    path = work["ckpt"] / "model.safetensors"
    damaged = data.draw(safetensors_damage(Blob(path.read_bytes())))
    with replaced(path, damaged):
        check_outcome("model.safetensors", lambda: read_checkpoint(work["ckpt"]))


# -- config.json ------------------------------------------------------------------------------------
CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
               "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "max_position_embeddings",
               "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "model_type", "architectures", "dtype"]


@st.composite
def config_damage(draw, text: str):
    cfg = json.loads(text)
    how = draw(st.sampled_from(["value", "delete", "top-k", "truncate", "flip", "not-object"]))
    if how == "value":
        cfg[draw(st.sampled_from(CONFIG_KEYS))] = draw(JSON_VALUES)
    elif how == "delete":
        cfg.pop(draw(st.sampled_from(CONFIG_KEYS)), None)
    elif how == "top-k":  # more experts chosen than there are
        cfg["num_experts_per_tok"] = cfg["num_experts"] + draw(st.integers(1, 100))
    elif how == "truncate":
        return text.encode()[:draw(st.integers(0, len(text) - 1))]
    elif how == "flip":
        return flip(text.encode(), draw(st.lists(st.tuples(st.integers(0, len(text) - 1), st.integers(1, 255)),
                                                 min_size=1, max_size=3)))
    else:
        return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.none()))).encode()
    return json.dumps(cfg).encode()


@given(data=st.data())
def test_damaged_config(work, data):
    path = work["ckpt"] / "config.json"
    damaged = data.draw(config_damage(path.read_text()))
    with replaced(path, damaged):
        check_outcome("config.json", lambda: read_checkpoint(work["ckpt"]))


# -- a sharded checkpoint: the index and its shards ------------------------------------------------
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@st.composite
def sharded_damage(draw, folder):
    """(file name, new bytes or None for removed) of one damaged file of the sharded folder."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    names = sorted(wm)
    how = draw(st.sampled_from(["remap", "drop-entry", "add-entry", "weight-map", "index-bytes", "shard",
                                "shard-missing"]))
    if how == "remap":
        wm[draw(st.sampled_from(names))] = draw(st.one_of(st.sampled_from(SHARDS + ["absent.safetensors",
                                                                                   "../model.safetensors", ""]),
                                                          JSON_VALUES))
    elif how == "drop-entry":
        del wm[draw(st.sampled_from(names))]
    elif how == "add-entry":
        wm[draw(st.sampled_from(["model.layers.1.mlp.gate.weight.extra", "model.layers.5.mlp.gate.weight",
                                 "lm_head.weight2"]))] = draw(st.sampled_from(SHARDS))
    elif how == "weight-map":
        index["weight_map"] = draw(JSON_VALUES)
    elif how == "index-bytes":
        raw = index_path.read_bytes()
        return "model.safetensors.index.json", raw[:draw(st.integers(0, len(raw) - 1))]
    elif how == "shard":
        shard = draw(st.sampled_from(SHARDS))
        return shard, draw(safetensors_damage(Blob((folder / shard).read_bytes())))
    else:
        return draw(st.sampled_from(SHARDS)), None
    return "model.safetensors.index.json", json.dumps(index).encode()


@given(data=st.data())
def test_damaged_sharded_checkpoint(work, data):
    name, damaged = data.draw(sharded_damage(work["sharded"]))
    with replaced(work["sharded"] / name, damaged):
        check_outcome("sharded checkpoint", lambda: read_checkpoint(work["sharded"]))


def test_pristine_folders_read(work):
    """The undamaged files read (so a suite where everything errors would not pass unnoticed)."""
    for kind in ("ckpt", "sharded"):
        src = read_checkpoint(work[kind])
        assert src.num_layers == 2
