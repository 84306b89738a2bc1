"""Compute paths: the arithmetic of a variant, one file per path in this package.

Every module here is imported when the registry is first used, and each :class:`ComputePath`
subclass that sets ``name`` registers itself, so a new path is one new file and nothing else.
Paths outside the package load from the Python files listed in ``MOETRACE_COMPUTE_PATHS``
(separated by ``os.pathsep``), or with :func:`load_file`.

    from moetrace.kernels import compute
    compute.get("bf16")            # BF16(dequant='bf16')
    compute.get("fp32", "bf16")    # weights rounded to bf16, arithmetic in fp32
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from pathlib import Path

from moetrace.errors import MoetraceError
from moetrace.kernels.compute.base import (DTYPE_NAMES, ROLES, BlockWeight, ComputePath, WeightForm,  # noqa: F401
                                           role_of, torch_dtype)

ENV_PATHS = "MOETRACE_COMPUTE_PATHS"
PATHS: dict[str, type[ComputePath]] = {}
_loaded = False


def register(cls: type[ComputePath]) -> type[ComputePath]:
    """Register a path class under its ``name``; a second class with the same name is an error."""
    other = PATHS.get(cls.name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise MoetraceError(f"compute path {cls.name!r} is defined twice: {other.__module__} and {cls.__module__}")
    PATHS[cls.name] = cls
    return cls


def _on_subclass(cls, **kwargs):
    if "name" in vars(cls):
        register(cls)


ComputePath.__init_subclass__ = classmethod(_on_subclass)


def load_file(path) -> None:
    """Import a Python file that defines compute paths (they register as the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise MoetraceError(f"compute path file {str(path)!r} (from {ENV_PATHS} or load_file) does not exist")
    spec = importlib.util.spec_from_file_location(f"moetrace_compute_ext_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    for f in filter(None, os.environ.get(ENV_PATHS, "").split(os.pathsep)):
        load_file(f)


def names() -> list[str]:
    """Every registered path name, built-in ones first in a fixed order."""
    _load()
    first = [n for n in ("fp32", "bf16", "fp16") if n in PATHS]
    return first + sorted(n for n in PATHS if n not in first)


def get(name: str, dequant: str | None = None) -> ComputePath:
    """The path ``name``, dequantizing weights to ``dequant`` (None: the path's default).

    Raises:
        MoetraceError: an unknown name (the message lists the valid ones) or a dequant dtype
            the path does not take.
    """
    _load()
    if name not in PATHS:
        raise MoetraceError(f"unknown compute path {name!r}; valid compute: {', '.join(names())}")
    return PATHS[name](dequant)


def __getattr__(name):
    if name == "DTYPES":  # dtype name -> torch dtype; torch is imported on first use
        from moetrace.kernels.compute import base

        return base.DTYPES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
