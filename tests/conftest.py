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
