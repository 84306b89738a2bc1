"""Checks on the places moetrace writes to, made before any work, so a bad path costs nothing.

Each failure is one :class:`MoetraceError` naming what was to be written, the path and the OS's
reason, instead of an ``IsADirectoryError`` or ``PermissionError`` after minutes of quantizing.
"""

from __future__ import annotations

import os
from pathlib import Path

from moetrace.errors import MoetraceError


def writable_folder(path: Path, what: str) -> Path:
    """Create ``path`` if needed and check a file can be written in it.

    Raises:
        MoetraceError: naming ``what`` (e.g. "the cache folder (MOETRACE_CACHE)") and the OS's reason.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".moetrace-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MoetraceError(f"cannot write to {what} {str(path)!r}: {e.strerror or e}") from None
    return path


def writable_file(path, what: str) -> Path:
    """Check that ``path`` can be created or replaced as a file (its folder is created if needed).

    Raises:
        MoetraceError: ``path`` is a folder, or its folder cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise MoetraceError(f"{what} {str(path)!r} is a folder; give a file name")
    writable_folder(path.parent if str(path.parent) else Path("."), f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise MoetraceError(f"cannot write {what} {str(path)!r}: it is read-only")
    return path
