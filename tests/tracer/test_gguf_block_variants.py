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


# Qwen3-MoE's layout is covered by test_the_blocks_are_the_files_own (a file with an override).
@pytest.mark.parametrize("model", ["builtin:tiny-mixtral:layers=2", "builtin:tiny-gpt-oss:layers=2"])
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


def test_blame_of_a_gguf_variant_ranks_the_files_tensors(tmp_path):
    """Blame of a GGUF file's variant restores parts of the file's own tensors: for a file written with an
    override it ranks every part with the same KL as blame of the derived variant with that override
    (a fused tensor restored in part keeps the file's other part). --budget, --audit and block paths are
    refused in one line."""
    import json

    model, override = "builtin:tiny:layers=2", "blk.1.ffn_down_exps=q2_k"
    gguf = tmp_path / "m.gguf"
    moetrace("quantize", "q4_k_m", "--model", model, "-o", str(gguf), "--tensor-type", override, "-q")
    derived = f"q4_k_m+{override}-bf16"
    moetrace("run", "--model", model, "--gguf", str(gguf), "--variant", "gguf-bf16", "--variant", derived,
             "--variant", "gguf-llamacpp_cpu", "--max-tokens", TOKENS, "--out", str(tmp_path), "--run", "r", "-q")
    run = tmp_path / "r"
    got = json.loads(moetrace("blame", str(run), "gguf-bf16", "--json").stdout)
    want = json.loads(moetrace("blame", str(run), derived, "--json").stdout)
    assert got["kl"] == want["kl"]
    for level in ("layer", "kind", "expert"):
        assert got[level], level
        assert [(r["part"], r["kl_recovered"]) for r in got[level]] == \
               [(r["part"], r["kl_recovered"]) for r in want[level]], level
    assert any(r["part"].endswith("ffn_up_exps") for r in got["kind"])  # one part of the fused gate_up
    for args, words in ((["gguf-bf16", "--budget", "1MB"], "--budget and --audit"),
                        (["gguf-llamacpp_cpu"], "dense compute path only")):
        p = moetrace("blame", str(run), *args, check=False)
        assert p.returncode != 0 and words in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_restoring_one_part_of_a_fused_tensor_keeps_the_files_other_part(tmp_path):
    """A GGUF file's tensors need not be what moetrace would derive from the model (here: quantized from a
    planted copy of it, same names and shapes). Restoring blk.1.ffn_up_exps alone must leave the fused
    gate_up's gate rows exactly as the file holds them, not re-quantized from the model."""
    import torch

    from moetrace.tracer.analysis.blame_run import gguf_of_run, open_run
    from moetrace.tracer.execution.restore import Restorer

    model = "builtin:tiny:layers=2"
    gguf = tmp_path / "m.gguf"
    moetrace("quantize", "q4_k_m", "--model", model, "--plant", "1:0:gate", "-o", str(gguf), "-q")
    moetrace("run", "--model", model, "--gguf", str(gguf), "--variant", "gguf-bf16", "--max-tokens", "16",
             "--out", str(tmp_path), "--run", "r", "-q")
    source, ref_ds, var_ds, cfg = open_run(tmp_path / "r", "gguf-bf16")
    file = gguf_of_run(cfg, source, "gguf-bf16")
    R = Restorer(source, ref_ds, var_ds, file)
    key, half = "mlp.experts.gate_up_proj", source.config.moe_intermediate_size
    state = R.state(1, {"blk.1.ffn_up_exps.weight": "F32"})
    held = file.layer_state(1)[key].to(torch.float32)
    ref = source.layer_state(1)[key].to(torch.float32)
    assert torch.equal(state[key][:, :half].to(torch.float32), held[:, :half])  # gate: the file's
    assert torch.equal(state[key][:, half:].to(torch.float32), ref[:, half:])  # up: the reference's
    # and re-quantizing the model's gate as the file's type would not have given the file's gate
    from moetrace.tracer.weights.derive import dequantized

    name = "blk.1.ffn_gate_exps.weight"
    assert not torch.equal(dequantized(ref[:, :half].contiguous(), name, file.ggml_types()[name]), held[:, :half])
