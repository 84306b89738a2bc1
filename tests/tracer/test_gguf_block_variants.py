"""A GGUF file's variant under a block-computing path (``gguf-llamacpp_cpu``) takes the file's own block bytes.

A file written by ``moetrace quantize`` holds the blocks a derived variant computes with (ggml-exact
quantizers), so a traced run of ``gguf-llamacpp_cpu`` must equal ``q4_k_m-llamacpp_cpu`` bit for bit, in
every family layout the file can have: Qwen3-MoE's fused experts, Mixtral's q/k rows that llama.cpp's
converter regroups (read back into transformers' order), GPT-OSS's transposed and interleaved experts.
And the blocks must be the file's: a file with one tensor overridden to another type traces as the
variant with that override, not as the plain recipe.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.cli_runner import moetrace

TOKENS = "24"


def _equal(run_dir, a: str, b: str) -> list[str]:
    """The data variables of two stores of a run that differ (NaN equal to NaN)."""
    from moetrace.tracer.store.reader import open_trace

    A, B = open_trace(run_dir / f"{a}.zarr"), open_trace(run_dir / f"{b}.zarr")
    assert set(A.data_vars) == set(B.data_vars)
    return [v for v in A.data_vars if not np.array_equal(A[v].values, B[v].values, equal_nan=True)]


@pytest.mark.parametrize("model", ["builtin:tiny:layers=2", "builtin:tiny-mixtral:layers=2",
                                   "builtin:tiny-gpt-oss:layers=2"])
def test_gguf_file_under_a_block_path_equals_the_derived_variant(tmp_path, model):
    gguf = tmp_path / "m.gguf"
    moetrace("quantize", "q4_k_m", "--model", model, "-o", str(gguf), "-q")
    moetrace("run", "--model", model, "--gguf", str(gguf), "--variant", "gguf-llamacpp_cpu",
             "--variant", "q4_k_m-llamacpp_cpu", "--max-tokens", TOKENS, "--out", str(tmp_path), "--run", "r", "-q")
    assert _equal(tmp_path / "r", "gguf-llamacpp_cpu", "q4_k_m-llamacpp_cpu") == []


def test_the_blocks_are_the_files_own(tmp_path):
    model, override = "builtin:tiny:layers=2", "blk.1.ffn_down_exps=q8_0"
    gguf = tmp_path / "m.gguf"
    moetrace("quantize", "q4_k_m", "--model", model, "-o", str(gguf), "--tensor-type", override, "-q")
    moetrace("run", "--model", model, "--gguf", str(gguf), "--variant", "gguf-llamacpp_cpu",
             "--variant", f"q4_k_m+{override}-llamacpp_cpu", "--variant", "q4_k_m-llamacpp_cpu",
             "--max-tokens", TOKENS, "--out", str(tmp_path), "--run", "r", "-q")
    assert _equal(tmp_path / "r", "gguf-llamacpp_cpu", f"q4_k_m+{override}-llamacpp_cpu") == []
    # the override reaches layer 1's MoE output: the plain recipe differs there
    assert "moe_out" in _equal(tmp_path / "r", "gguf-llamacpp_cpu", "q4_k_m-llamacpp_cpu")
