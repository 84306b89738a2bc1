"""Process-wide switches: every ``MOETRACE_*`` environment variable, read and checked in one place.

Each variable has a kind and a range; a value outside it is a :class:`MoetraceError` that names the
variable, the value and what it takes, rather than a silent default or a traceback deep in a
command. Reading is cheap (no heavy imports), so the command line can check early.

=======================  ========  ==========================================================
variable                 kind      meaning
=======================  ========  ==========================================================
``MOETRACE_CACHE``       folder    where built-in models and quantized weights are cached
``MOETRACE_QCACHE``      switch    0/off/false/no turns the quantized-weight cache off
``MOETRACE_QCACHE_MAX``  size      trim the quantized-weight cache to this size (e.g. 20G)
``MOETRACE_NATIVE``      switch    0 uses the torch kernels instead of the compiled ones
``MOETRACE_DIRECT_IO``   switch    0 writes stores through the page cache only
``MOETRACE_DEBUG``       switch    1 shows the traceback of an internal error
``MOETRACE_PROGRESS``    choice    auto (bars on a terminal), bars, lines (a line a step) or off
=======================  ========  ==========================================================
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from moetrace.errors import MoetraceError

_TRUE = ("1", "on", "true", "yes")
_FALSE = ("0", "off", "false", "no")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str = "a size") -> int:
    """``"20G"``, ``"512M"``, ``"1.5T"`` or a plain byte count -> bytes (binary units), at least 0.

    Args:
        text: the size as the user wrote it.
        what: how the message names it (an option or a variable).

    Raises:
        MoetraceError: not a number with an optional unit, negative, or not finite.
    """
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if t and t[-1] in _UNITS:
        t, scale = t[:-1], _UNITS[t[-1]]
    try:
        value = float(t)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or not t:
        raise MoetraceError(
            f"cannot read {text!r} as {what}; give a byte count of 0 or more, optionally with K, M, G or T (e.g. 20G)"
        )
    return int(value * scale)


def switch(name: str, default: bool) -> bool:
    """A boolean variable: 1/on/true/yes or 0/off/false/no (any case); unset means ``default``."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise MoetraceError(f"environment variable {name}={raw!r} is not a switch; give one of {', '.join(_TRUE + _FALSE)}")


def choice(name: str, choices: tuple[str, ...]) -> str:
    """A variable that takes one of ``choices`` (case-insensitive); unset means the first."""
    raw = os.environ.get(name, "")
    v = raw.strip().lower() or choices[0]
    if v not in choices:
        raise MoetraceError(f"environment variable {name}={raw!r} is not one of {', '.join(choices)}")
    return v


PROGRESS_STYLES = ("auto", "bars", "lines", "off")


def size(name: str) -> int | None:
    """A size variable (``MOETRACE_QCACHE_MAX=20G``), or None where unset."""
    raw = os.environ.get(name, "").strip()
    return parse_size(raw, f"environment variable {name}") if raw else None


def cache_root() -> Path:
    """``$MOETRACE_CACHE``, else ``~/.cache/moetrace``; refused where it exists and is not a folder."""
    raw = os.environ.get("MOETRACE_CACHE")
    root = Path(raw).expanduser() if raw and raw.strip() else Path.home() / ".cache" / "moetrace"
    if root.exists() and not root.is_dir():
        raise MoetraceError(f"MOETRACE_CACHE={str(root)!r} is a file, not a folder; point it at a folder")
    return root


SWITCHES = {"MOETRACE_QCACHE": True, "MOETRACE_NATIVE": True, "MOETRACE_DIRECT_IO": True, "MOETRACE_DEBUG": False,
            "MOETRACE_NO_AVX2": False}


def check_all() -> None:
    """Read every variable once, so a bad value is refused before a command starts any work."""
    for name, default in SWITCHES.items():
        switch(name, default)
    size("MOETRACE_QCACHE_MAX")
    choice("MOETRACE_PROGRESS", PROGRESS_STYLES)
    cache_root()
