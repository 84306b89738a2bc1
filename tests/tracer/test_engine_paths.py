"""The engine compute paths end to end: one real ``moetrace run`` of all of them, ``--device``, the GPU benchmark.

Kernel-level checks against float64 models are in tests/kernels/test_engine_cuda.py and
test_engine_marlin.py; here the paths run through the CLI on builtin:tiny and the traces show
what each engine's arithmetic does.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moetrace
from cli_runner import moetrace as run_cli
from moetrace.errors import MoetraceError

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_trace.py"
VARIANTS = ["q4_k_m-llamacpp_cuda_mmq", "q4_k_m-llamacpp_cuda_f16", "q4_k_m-fp32",
            "q8_0-ktransformers_prefill", "q8_0-ktransformers_decode", "q8_0-bf16",
            "q2_k-llamacpp_cuda_mmq", "q2_k-fp32"]
# Engine arithmetic against plain float32 compute with the same weights: activation quantization
# (q8_1) or F16 accumulation moves logits by a few percent on builtin:tiny, never tens of percent.
ENGINE_REL_L2 = 0.1


def _kl(ref: np.ndarray, var: np.ndarray) -> np.ndarray:
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(var).double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).numpy()


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("engines")
    prompts = d / "prompts.txt"
    # a 6-token sequence (MMVQ: at most 8 tokens) and a longer one (MMQ)
    prompts.write_text("Short one\nThe engines multiply the same weights in their own ways, token by token.\n")
    args = ["run", "--model", "builtin:tiny", "--prompts", str(prompts), "--out", str(d), "--run", "eng", "-q"]
    run_cli(*args, *[a for v in VARIANTS for a in ("--variant", v)])
    return {v: moetrace.open_trace(d / "eng" / f"{v}.zarr").logits.sel(mode="free").values
            for v in VARIANTS + ["orig-fp32"]}


def test_every_engine_path_runs_and_stays_finite(traces):
    for v, logits in traces.items():
        assert np.isfinite(logits).all(), v


@pytest.mark.parametrize("variant", ["q4_k_m-llamacpp_cuda_mmq", "q4_k_m-llamacpp_cuda_f16"])
def test_llamacpp_cuda_paths_differ_from_fp32_by_their_arithmetic_only(traces, variant):
    a, b = traces[variant], traces["q4_k_m-fp32"]
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert 0 < rel < ENGINE_REL_L2, f"{variant}: logits relL2 {rel:.3g} against q4_k_m-fp32"
    assert not np.array_equal(traces["q4_k_m-llamacpp_cuda_mmq"], traces["q4_k_m-llamacpp_cuda_f16"])


def test_llamacpp_cuda_mmq_runs_a_file_type_that_mixes_in_q2_k_and_q3_k(traces):
    """q2_k on builtin:tiny (8 experts: llama.cpp's Mixtral-like rules) mixes Q2_K (attn_q, gate and up
    experts), Q3_K (down experts), Q5_K, Q6_K and Q8_0: every tensor goes through the MMQ/MMVQ emulation
    (no refusal) and lands as close to float32 compute on the same weights as q4_k_m."""
    a, b = traces["q2_k-llamacpp_cuda_mmq"], traces["q2_k-fp32"]
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert 0 < rel < ENGINE_REL_L2, f"logits relL2 {rel:.3g} against q2_k-fp32"


def test_ktransformers_prefill_is_bf16_arithmetic(traces):
    """KLinearTorch and KExpertsTorch are dequantize-to-bf16-then-matmul: transformers' own bf16 forward, bit for bit."""
    assert np.array_equal(traces["q8_0-ktransformers_prefill"], traces["q8_0-bf16"])


def test_ktransformers_decode_requantizes_a_q8_0_file(traces):
    """A Q8_0 file decoded by KTransformers: attention, router and head re-quantized to 4 bits raise the
    output KL far above the Q8_0 file's own (measured about 40x on builtin:tiny; asserted 5x)."""
    ref = traces["orig-fp32"]
    kl_decode = _kl(ref, traces["q8_0-ktransformers_decode"]).mean()
    kl_q8 = _kl(ref, traces["q8_0-bf16"]).mean()
    assert kl_decode > 5 * kl_q8, f"KL {kl_decode:.3g} (decode) vs {kl_q8:.3g} (q8_0-bf16)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the refusal is for machines without")
def test_device_cuda_is_refused_in_one_line_without_cuda():
    from moetrace.tracer import api

    with pytest.raises(MoetraceError) as e:
        api.run(model="builtin:tiny", variants=["orig-bf16"], device="cuda", out_dir="/nonexistent-never-written")
    assert "--device cuda" in str(e.value) and "valid here: cpu" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MoetraceError, match="unknown device 'gpu'; valid devices: cpu, cuda, cuda:N"):
        api.run(model="builtin:tiny", variants=["orig-bf16"], device="gpu")


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_trace", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_help_and_cpu_dry_run(tmp_path, monkeypatch):
    p = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "qwen3-30b-a3b:layers=8" in p.stdout and "--dry-run" in p.stdout
    monkeypatch.chdir(tmp_path)  # its scratch folder goes here
    results = _bench().main(["--dry-run"])
    assert set(results) == {"orig-bf16", "q4_k_m-bf16"}
    assert all(r["median_s"] > 0 for r in results.values())
    assert not any(tmp_path.iterdir())  # scratch removed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_traces_match_cpu_traces(tmp_path, tiny_source, tiny_tokens):
    """Every path on the GPU computes what it computes on the CPU, up to float32 reordering in GEMMs and
    reductions (cuBLAS against oneDNN): logits within 1e-3 relative L2, bf16 paths within 2e-2."""
    from moetrace.tracer.execution.executor import RunConfig, run_trace

    variants = ["orig-bf16", "q4_k_m-llamacpp_cuda_mmq", "q4_k_m-llamacpp_cuda_f16", "q8_0-ktransformers_decode"]
    out = {}
    for dev in ("cpu", "cuda"):
        stores = run_trace(tiny_source, RunConfig(model="builtin:tiny", variants=variants, device=dev), tiny_tokens,
                           tmp_path / dev)
        out[dev] = {v: moetrace.open_trace(stores[v]).logits.values for v in variants + ["orig-fp32"]}
    for v in out["cpu"]:
        a, b = out["cuda"][v], out["cpu"][v]
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel < (2e-2 if "bf16" in v or "ktransformers" in v else 1e-3), f"{v}: {rel:.3g}"
