"""The family registry: lookup by transformers model type and by GGUF architecture name.

A family file is a Python file that defines ``FAMILY`` (a :class:`~moetrace.hooks.arch.family.Family`)
or ``FAMILIES`` (a list of them). Every module of the ``moetrace.hooks.arch`` package that
defines one is registered on first lookup, so adding a family to moetrace is adding one file.
Files outside the package are loaded with :func:`load_family_file`, or listed in the
``MOETRACE_FAMILIES`` environment variable (paths separated by ``os.pathsep``), which every
process (the CLI included) reads on its first lookup.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pkgutil
from pathlib import Path

from moetrace.errors import MoetraceError
from moetrace.hooks.arch.family import Family

ENV_VAR = "MOETRACE_FAMILIES"
# Modules of the package that hold machinery, not a family.
_NOT_FAMILIES = {"family", "registry", "gguf_meta"}

_families: dict[str, Family] = {}  # name -> family, in registration order
_loaded = False


def register(family: Family) -> Family:
    """Add ``family`` (replacing one of the same name).

    Raises:
        MoetraceError: another family already serves one of its model types or its GGUF architecture.
    """
    if not isinstance(family, Family):
        raise MoetraceError(f"register() takes a Family, got {type(family).__name__}")
    for other in _families.values():
        if other.name == family.name:
            continue
        clash = set(other.model_types) & set(family.model_types)
        # One GGUF architecture may serve two families only when its expert count tells them apart.
        split = {other.gguf_experts, family.gguf_experts} == {"moe", "dense"}
        if clash or (other.gguf_arch == family.gguf_arch and not split):
            what = f"model type {sorted(clash)[0]!r}" if clash else f"GGUF architecture {family.gguf_arch!r}"
            raise MoetraceError(
                f"family {family.name!r} cannot be registered: {what} is served by family {other.name!r}"
            )
    _families[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove the family called ``name`` (tests that register their own)."""
    _families.pop(name, None)


def _from_module(module) -> list[Family]:
    found = getattr(module, "FAMILIES", None)
    if found is None:
        found = [module.FAMILY] if hasattr(module, "FAMILY") else []
    return list(found)


def load_family_file(path) -> list[Family]:
    """Import a family file from outside the package and register what it defines.

    Raises:
        MoetraceError: the file is missing, fails to import, or defines no FAMILY/FAMILIES.
    """
    path = Path(path)
    if not path.is_file():
        raise MoetraceError(f"family file {str(path)!r} does not exist ({ENV_VAR} or load_family_file)")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"moetrace_family_{path.stem}_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise MoetraceError(f"family file {str(path)!r} failed to import: {type(e).__name__}: {e}") from None
    found = _from_module(module)
    if not found:
        raise MoetraceError(f"family file {str(path)!r} defines neither FAMILY nor FAMILIES")
    return [register(f) for f in found]


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    pkg = importlib.import_module("moetrace.hooks.arch")
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in _NOT_FAMILIES:
            for f in _from_module(importlib.import_module(f"moetrace.hooks.arch.{info.name}")):
                register(f)
    for p in filter(None, os.environ.get(ENV_VAR, "").split(os.pathsep)):
        load_family_file(p)


def families() -> list[Family]:
    """Every registered family, built-in ones first."""
    _ensure_loaded()
    return list(_families.values())


def _gguf_label(f: Family) -> str:
    return f.gguf_arch + {"any": "", "moe": " with experts", "dense": " without experts"}[f.gguf_experts]


def supported() -> str:
    """The supported families for a message: ``qwen3_moe (model type qwen3_moe, GGUF qwen3moe), ...``."""
    return ", ".join(f"{f.name} (model type {'/'.join(f.model_types)}, GGUF {_gguf_label(f)})" for f in families())


def by_model_type(model_type, where: str = "") -> Family:
    """The family serving transformers ``model_type``.

    Raises:
        MoetraceError: no family does; the message lists the supported ones.
    """
    for f in families():
        if model_type in f.model_types:
            return f
    of = f" of {where}" if where else ""
    raise MoetraceError(f"model type {model_type!r}{of} is not supported; supported families: {supported()}")


def by_gguf_arch(arch, where: str = "", n_experts: int | None = None) -> Family:
    """The family of GGUF architecture ``arch`` (``general.architecture``).

    Args:
        arch: the architecture name.
        where: the file, for messages.
        n_experts: the file's ``{arch}.expert_count`` (0 when absent; None: not known). It tells
            apart families that share an architecture (``llama`` with experts is Mixtral).

    Raises:
        MoetraceError: no family has it, or the architecture's families all need experts the
            file has not (or the reverse); the message lists the supported ones.
    """
    of = f" of {where}" if where else ""
    same = [f for f in families() if f.gguf_arch == arch]
    found = [f for f in same if f.serves_gguf(arch, n_experts)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise MoetraceError(f"GGUF architecture {arch!r}{of} is served by families {', '.join(f.name for f in found)}, "
                            f"told apart by {arch}.expert_count; give the file's expert count")
    if same:
        kind = "with experts" if n_experts else "without experts (a dense model)"
        raise MoetraceError(f"GGUF architecture {arch!r}{of} {kind} is not supported; moetrace serves {arch!r} as "
                            f"{', '.join(f'{f.name} ({_gguf_label(f)})' for f in same)}; supported families: "
                            f"{supported()}")
    raise MoetraceError(f"GGUF architecture {arch!r}{of} is not supported; supported families: {supported()}")


def family_of(config) -> Family:
    """The family of a transformers config (or anything with ``model_type``)."""
    return by_model_type(getattr(config, "model_type", None))


def by_name(name: str) -> Family:
    """The family called ``name``."""
    for f in families():
        if f.name == name:
            return f
    raise MoetraceError(f"unknown family {name!r}; registered: {', '.join(f.name for f in families())}")
