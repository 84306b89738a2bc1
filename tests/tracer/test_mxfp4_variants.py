"""MXFP4 in the variant grammar: ``mxfp4`` (expert matrices MXFP4, the rest as stored), ``mxfp4_moe``
(llama.cpp's MXFP4_MOE file type), ``pure_mxfp4`` and ``=mxfp4`` overrides, through the executor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moetrace
from moetrace.errors import MoetraceError
from moetrace.tracer.execution.executor import RunConfig, run_trace
from moetrace.tracer.variants import Variant, valid_weights
from moetrace.tracer.weights import derive as W


def test_grammar_offers_the_mxfp4_weights():
    assert {"mxfp4", "mxfp4_moe", "pure_mxfp4"} <= set(valid_weights())
    assert Variant.parse("MXFP4-bf16").name == "mxfp4-bf16"
    assert Variant.parse("q4_k_m+ffn_down_exps=mxfp4-llamacpp_cpu").overrides == (("ffn_down_exps", "MXFP4"),)
    with pytest.raises(MoetraceError, match="valid weights: .*mxfp4"):
        Variant.parse("mxfp8-bf16")


@pytest.mark.parametrize("weights", ["mxfp4", "mxfp4_moe", "pure_mxfp4"])
def test_types_on_the_tiny_model(tiny_source, weights):
    types = W.tensor_types(tiny_source, Variant.parse(f"{weights}-bf16"), context=None)
    experts = {n for n in types if n.endswith("_exps.weight")}
    assert experts and {types[n] for n in experts} == {"MXFP4"}
    others = {types[n] for n in types if n not in experts and not W.never_quantized(n, 2) and "norm" not in n}
    assert others == {"mxfp4": {"F32"}, "mxfp4_moe": {"Q8_0"}, "pure_mxfp4": {"MXFP4"}}[weights]


def test_mxfp4_llamacpp_cpu_runs_and_differs_from_dense_only_by_activation_quantization(tmp_path, tiny_source):
    """The engine path computes from the MXFP4 blocks (Q8_0 activations, integer dots); the fp32 path from
    the same weights dequantized. Both are finite and close; they differ where the activations are quantized."""
    from moetrace.tracer.sources.prompts import tokenize

    tokens = tokenize(["Experts in MXFP4."], tiny_source.tokenizer)
    cfg = RunConfig(model="builtin:tiny", variants=["mxfp4-llamacpp_cpu", "mxfp4-fp32"], modes=["free"])
    stores = run_trace(tiny_source, cfg, tokens, tmp_path / "run")
    a = moetrace.open_trace(stores["mxfp4-llamacpp_cpu"]).logits.sel(mode="free").values
    b = moetrace.open_trace(stores["mxfp4-fp32"]).logits.sel(mode="free").values
    assert a.shape == b.shape and np.isfinite(a).all()
    assert not np.array_equal(a, b)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 0.1, f"logits relL2 {rel:.3f} between MXFP4 with and without activation quantization"
    ref = moetrace.open_trace(stores["orig-fp32"]).logits.sel(mode="free").values
    assert not np.array_equal(b, ref)  # the experts really are MXFP4
    assert torch.isfinite(torch.from_numpy(ref)).all()
