"""Compute paths: variants equal independent computations bit for bit, and plug-in paths run end to end.

The independent computations never go through moetrace's derivation or executor: weights are
quantized and dequantized with gguf-py's numpy Q8_0 (llama.cpp's own Python package), rounded
with torch, loaded into ``AutoModelForCausalLM.from_pretrained`` and run by transformers' forward.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import moetrace
from cli_runner import moetrace as run_cli
from moetrace.kernels import compute
from moetrace.tracer.execution.executor import RunConfig, run_trace

TOY_FILE = Path(__file__).with_name("toy_compute_paths.py")
VARIANTS = ["orig-bf16", "pure_q8_0-bf16", "pure_q8_0-bf16w-fp32", "orig-fp16w-fp32"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_source, tiny_tokens):
    cfg = RunConfig(model="builtin:tiny", variants=VARIANTS, modes=["free"])
    return run_trace(tiny_source, cfg, tiny_tokens, tmp_path_factory.mktemp("compute") / "run")


def _hf_model(folder, weights: str, dequant: torch.dtype, compute_dtype: torch.dtype):
    """transformers' model with ``weights`` (``orig`` or ``q8_0``: every matrix but the router through
    gguf-py's Q8_0), every weight rounded to ``dequant``, running in ``compute_dtype``."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach()
            if weights == "q8_0" and w.ndim >= 2 and not name.endswith("mlp.gate.weight"):
                q = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
                w = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())
            # Parameters only: model.to() would also cast the rotary inv_freq buffer, which
            # transformers keeps in float32 whatever the model's dtype.
            p.data = w.to(dequant).to(compute_dtype)
    return model


def _forward_logits(model, store_ds, hooks=()):
    """transformers' logits (token, vocab) as float32 for every sequence of ``store_ds``, in store order."""
    ids, seq = store_ds.token_id.values, store_ds.seq.values
    out = np.empty(store_ds.logits.shape[1:], dtype=np.float32)
    for s in np.unique(seq):
        with torch.no_grad():
            logits = model(torch.from_numpy(ids[seq == s].astype(np.int64)).unsqueeze(0)).logits[0]
        out[seq == s] = logits.float().numpy()
    return out


def _assert_bit_equal(got: np.ndarray, want: np.ndarray, what: str):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    diff = got.view(np.uint32) != want.view(np.uint32)
    assert not diff.any(), (f"{what}: {int(diff.sum())} of {diff.size} logits differ; "
                            f"max abs diff {np.abs(got - want).max()}")


@pytest.mark.parametrize("variant,weights,dequant,dtype", [
    ("orig-bf16", "orig", torch.bfloat16, torch.bfloat16),  # an old name: same meaning as before
    ("pure_q8_0-bf16", "q8_0", torch.bfloat16, torch.bfloat16),  # an old name, quantized
    ("pure_q8_0-bf16w-fp32", "q8_0", torch.bfloat16, torch.float32),  # dequantize to bf16, compute in fp32
    ("orig-fp16w-fp32", "orig", torch.float16, torch.float32),
])
def test_variant_equals_independent_transformers_forward(run, tiny_source, variant, weights, dequant, dtype):
    ds = moetrace.open_trace(run[variant])
    model = _hf_model(tiny_source.folder, weights, dequant, dtype)
    _assert_bit_equal(ds.logits.sel(mode="free").values, _forward_logits(model, ds), variant)


def test_separate_dequant_differs_from_both_neighbours(run):
    """bf16w-fp32 is neither the fp32 nor the bf16 arithmetic: the test above could not pass by aliasing."""
    mid = moetrace.open_trace(run["pure_q8_0-bf16w-fp32"]).logits.values
    low = moetrace.open_trace(run["pure_q8_0-bf16"]).logits.values
    ref = moetrace.open_trace(run["orig-fp32"]).logits.values
    assert not np.array_equal(mid, low) and not np.array_equal(mid, ref)


def test_plugin_path_runs_end_to_end_through_the_cli(tmp_path, tiny_source):
    """A path from a file outside the package (MOETRACE_COMPUTE_PATHS) traced by `moetrace run`
    equals transformers' forward with the same weights rounding and fp16-rounded linear inputs."""
    env = {**os.environ, compute.ENV_PATHS: str(TOY_FILE)}
    p = run_cli("variants", "--json", env=env)
    assert "toy_fp16in" in p.stdout
    run_cli("run", "--model", "builtin:tiny", "--variant", "orig-toy_fp16in", "--out", str(tmp_path), "--run", "toy",
            "--text", "A plug-in path, end to end.", env=env)
    ds = moetrace.open_trace(tmp_path / "toy" / "orig-toy_fp16in.zarr")
    model = _hf_model(tiny_source.folder, "orig", torch.float16, torch.float32)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda mod, args: (args[0].half().float(), *args[1:]))
    _assert_bit_equal(ds.logits.sel(mode="free").values, _forward_logits(model, ds), "orig-toy_fp16in")
    plain = _forward_logits(_hf_model(tiny_source.folder, "orig", torch.float16, torch.float32), ds)
    assert not np.array_equal(plain, ds.logits.sel(mode="free").values)  # the twist changed something


def test_block_bytes_path_gets_blocks_and_matches_the_dense_path(tmp_path, tiny_source, tiny_tokens):
    """A path asking for the experts' GGUF block bytes receives them (every layer, Q8_0) and,
    dequantizing them itself, reproduces the dense fp32 path bit for bit."""
    compute.load_file(TOY_FILE)
    blocks = compute.PATHS["toy_blocks"]
    blocks.seen.clear()
    cfg = RunConfig(model="builtin:tiny", variants=["pure_q8_0-fp32", "pure_q8_0-toy_blocks"], modes=["free", "teacher"])
    stores = run_trace(tiny_source, cfg, tiny_tokens, tmp_path / "run")
    n = tiny_source.num_layers
    assert sorted(set(blocks.seen)) == [("mlp.experts.down_proj", "Q8_0"), ("mlp.experts.gate_up_proj", "Q8_0")]
    assert len(blocks.seen) == 3 * n  # gate, up and down of every layer
    a, b = moetrace.open_trace(stores["pure_q8_0-fp32"]), moetrace.open_trace(stores["pure_q8_0-toy_blocks"])
    for name in ("resid", "logits"):
        assert np.array_equal(a[name].values, b[name].values), name


def test_registry_lists_paths_and_refuses_unknown_ones():
    from moetrace.errors import MoetraceError
    from moetrace.tracer.variants import Variant

    assert compute.names()[:3] == ["fp32", "bf16", "fp16"]
    assert compute.get("fp32", "bf16").dequant == "bf16" and compute.get("bf16").dequant == "bf16"
    with pytest.raises(MoetraceError, match="unknown compute path 'int3'; valid compute: fp32, bf16, fp16"):
        compute.get("int3")
    with pytest.raises(MoetraceError, match="unknown dequantization 'bf8w'.*valid DEQw: fp32w, bf16w, fp16w"):
        Variant.parse("q4_k_m-bf8w-fp32")
    assert Variant.parse("q4_k_m-bf16w-bf16") == Variant.parse("q4_k_m-bf16")
    assert Variant.parse("q4_k_m-bf16w-bf16").name == "q4_k_m-bf16"
    v = Variant.parse("Q4_K_M-BF16W-FP32")
    assert (v.weights, v.compute, v.dequant, v.name, v.dtype) == ("q4_k_m", "fp32", "bf16", "q4_k_m-bf16w-fp32",
                                                                   torch.float32)
    assert Variant.from_dict(v.to_dict()) == v and Variant.from_dict({"weights": "orig", "compute": "fp16"}).dequant == "fp16"


def test_roles_from_gguf_names():
    cases = {"blk.0.attn_q.weight": "attention", "blk.0.attn_norm.weight": "norm", "blk.0.attn_q_norm.weight": "norm",
             "blk.0.ffn_gate_inp.weight": "router", "blk.0.ffn_up_exps.weight": "experts",
             "blk.0.ffn_down_shexp.weight": "shared_expert", "blk.0.ffn_up.weight": "dense_mlp",
             "token_embd.weight": "embedding", "output.weight": "lm_head", "output_norm.weight": "norm"}
    assert {n: compute.role_of(n) for n in cases} == cases
