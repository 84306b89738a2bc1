"""Property suite, token-id files (JSONL and .npy) and prompt files, read as ``--tokens`` / ``--prompts``."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_files import check_outcome, flip, read_prompt_file, read_tokens

JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.integers(), st.floats(),
                              st.text(max_size=4)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
                        ["ids", "text", "x"]), inner, max_size=2)), max_leaves=8)


@pytest.fixture(scope="module")
def tok_work(trust_files, tmp_path_factory):
    base = tmp_path_factory.mktemp("tok-work")
    return {k: shutil.copyfile(trust_files[k], base / trust_files[k].name) for k in ("ids", "npy", "prompts")}


@st.composite
def damage(draw, data: bytes, lines: bool):
    how = draw(st.sampled_from(["truncate", "flip", "lines", "bytes"] if lines else ["truncate", "flip", "bytes"]))
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        return flip(data, draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1,
                                        max_size=4)))
    if how == "lines":
        return "\n".join(json.dumps(v) for v in draw(st.lists(JSON, min_size=0, max_size=3))).encode()
    return draw(st.binary(max_size=64))


@given(data=st.data())
def test_damaged_token_and_prompt_files(tok_work, data):
    kind = data.draw(st.sampled_from(["ids", "npy", "prompts"]))
    path = tok_work[kind]
    original = path.read_bytes()
    path.write_bytes(data.draw(damage(original, kind != "npy")))
    try:
        read = read_prompt_file if kind == "prompts" else read_tokens
        check_outcome("tokens/prompts", lambda: read(path))
    finally:
        path.write_bytes(original)


def test_pristine_token_files_read(tok_work):
    assert read_tokens(tok_work["ids"]).n == 6 and read_tokens(tok_work["npy"]).n == 6
    assert read_prompt_file(tok_work["prompts"]).n > 10
