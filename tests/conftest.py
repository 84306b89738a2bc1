"""Shared fixtures: the golden vectors of ggml beside the checkout, and small built-in models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOETRACE_SHARED", ROOT.parent / "shared"))
GGML_VECTORS = SHARED / "ggml-vectors"


@pytest.fixture(scope="session")
def ggml_vectors() -> Path:
    """The folder of ggml's golden outputs; tests that need it skip, with the reason, where it is absent."""
    if not GGML_VECTORS.is_dir():
        pytest.skip(f"ggml golden vectors not found at {GGML_VECTORS} (an outside checkout without ../shared)")
    return GGML_VECTORS


TINY = "builtin:tiny"
SHORT_TEXT = "Experts route tokens; quantization error grows layer by layer."


@pytest.fixture(scope="session")
def tiny_source():
    from moetrace.tracer.sources.checkpoint import open_source

    return open_source(TINY)


@pytest.fixture(scope="session")
def tiny_tokens(tiny_source):
    from moetrace.tracer.sources.prompts import tokenize

    return tokenize([SHORT_TEXT, "A second, shorter prompt."], tiny_source.tokenizer)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_source, tiny_tokens):
    """One traced run of builtin:tiny: reference orig-fp32 and orig-bf16 in all three modes."""
    from moetrace.tracer.execution.executor import RunConfig, run_trace

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = RunConfig(model=TINY, variants=["orig-bf16"], modes=["free", "teacher", "routing"])
    stores = run_trace(tiny_source, cfg, tiny_tokens, run_dir)
    return run_dir, stores
