"""The single-writer lock of a store: one moetrace run writes a store at a time.

Local folder: the file ``.moetrace-writer.lock`` created with ``O_EXCL`` holds the writer's process
id; a lock whose process is gone (a killed run) is stale and taken over.

Object storage: the lock object is created with a conditional put (``If-None-Match: *``, fsspec's
``pipe_file(..., mode="create")``), which the server grants to exactly one writer; it holds the
writer's host and process id. A process on another machine cannot be checked for life, so a lock
left by a killed run stays until removed by hand (the message names the object). File systems
without conditional creation are refused for writing, rather than risking two writers.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from moetrace.errors import MoetraceError
from moetrace.tracer.store.location import as_location, filesystem, join
from moetrace.tracer.store.schema import LOCK_NAME


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(store, holder: str, lock) -> MoetraceError:
    return MoetraceError(
        f"{store} is being written by another moetrace run (process {holder}); "
        f"wait for it, or remove {lock} if that process is gone"
    )


def acquire(store, storage_options: dict | None = None) -> None:
    """Take the writer lock of ``store`` (creating the store's folder where needed).

    Raises:
        MoetraceError: another live writer holds it, or the file system cannot lock.
    """
    store = as_location(store)
    if isinstance(store, Path):
        return _acquire_local(store)
    fs, root = filesystem(store, storage_options)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    try:
        fs.pipe_file(f"{root}/{LOCK_NAME}", holder.encode(), mode="create")
    except FileExistsError:
        try:
            who = fs.cat_file(f"{root}/{LOCK_NAME}").decode(errors="replace").strip()
        except FileNotFoundError:
            who = "?"
        raise _busy(store, who, join(store, LOCK_NAME)) from None
    except (TypeError, NotImplementedError):
        raise MoetraceError(
            f"cannot write {store!r}: its file system cannot create an object only if it is absent, which the "
            f"single-writer lock needs; write to a local folder or to S3 (s3fs >= 2025.2)"
        ) from None


def _acquire_local(store: Path) -> None:
    store.mkdir(parents=True, exist_ok=True)
    lock = store / LOCK_NAME
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = lock.read_text().strip() if lock.exists() else "?"
        if pid.isdigit() and not _alive(int(pid)):
            lock.unlink(missing_ok=True)  # a killed run's lock: stale
            return _acquire_local(store)
        raise _busy(store, pid, lock) from None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)


def release(store, storage_options: dict | None = None) -> None:
    """Drop the writer lock of ``store``."""
    store = as_location(store)
    if isinstance(store, Path):
        (store / LOCK_NAME).unlink(missing_ok=True)
        return
    fs, root = filesystem(store, storage_options)
    try:
        fs.rm_file(f"{root}/{LOCK_NAME}")
    except FileNotFoundError:
        pass
