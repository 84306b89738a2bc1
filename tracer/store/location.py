"""Where a store lives: a local path, or a URL any fsspec file system takes (``s3://bucket/traces``).

A location is kept as the value users gave: a :class:`pathlib.Path` for a local folder (so local
runs behave exactly as before), a ``str`` for a URL. These helpers give the zarr store, the fsspec
file system and the small object operations (progress markers, listings) for either.

Object storage credentials and endpoint come from the environment, as the file system's own
client reads them (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
...); library callers may pass fsspec ``storage_options`` instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from moetrace.errors import MoetraceError


def is_url(loc) -> bool:
    """True for ``scheme://...`` (other than ``file://``)."""
    return isinstance(loc, str) and "://" in loc and not loc.startswith("file://")


def as_location(loc):
    """A Path for a local folder (``file://`` stripped), the URL string otherwise."""
    if isinstance(loc, Path):
        return loc
    loc = str(loc)
    if is_url(loc):
        return loc.rstrip("/")
    return Path(loc[len("file://"):] if loc.startswith("file://") else loc)


def join(base, name: str):
    """``base / name`` for a path or a URL."""
    base = as_location(base)
    return base / name if isinstance(base, Path) else f"{base}/{name}"


def name_of(loc) -> str:
    """The last component (``orig-bf16.zarr``)."""
    loc = as_location(loc)
    return loc.name if isinstance(loc, Path) else loc.rsplit("/", 1)[-1]


def filesystem(loc, storage_options: dict | None = None):
    """(fsspec file system, path inside it) of ``loc``.

    Raises:
        MoetraceError: the URL's scheme needs a package that is not installed.
    """
    import fsspec

    loc = as_location(loc)
    if isinstance(loc, Path):
        return fsspec.filesystem("file"), str(loc.absolute())
    try:
        fs, path = fsspec.core.url_to_fs(loc, **(storage_options or {}))
    except ImportError as e:
        raise MoetraceError(f"cannot use {loc!r}: {e}; for s3:// URLs install moetrace[s3]") from None
    except ValueError as e:
        raise MoetraceError(f"cannot use {loc!r}: {e}") from None
    return fs, path


def zarr_store(loc, read_only: bool, storage_options: dict | None = None, chunk_writes: bool = False):
    """zarr's store for ``loc``: a LocalStore for a path, an FsspecStore for a URL.

    ``chunk_writes``: the trace writer's local store, :func:`chunk_file_store` (chunk objects
    written in place, metadata as LocalStore writes it).
    """
    from zarr.storage import FsspecStore, LocalStore

    loc = as_location(loc)
    if isinstance(loc, Path):
        if chunk_writes and not read_only:
            return chunk_file_store()(loc)
        return LocalStore(loc, read_only=read_only)
    # zarr makes its own asynchronous file system instance, bound to zarr's event loop (fsspec's
    # synchronous one lives on another loop and cannot serve zarr's calls).
    try:
        return FsspecStore.from_url(loc, storage_options=storage_options, read_only=read_only)
    except ImportError as e:
        raise MoetraceError(f"cannot use {loc!r}: {e}; for s3:// URLs install moetrace[s3]") from None


def chunk_file_store():
    """The class of the trace writer's local store: zarr's LocalStore, whose ``set`` writes a chunk
    object straight into its file.

    LocalStore (zarr 3.1) writes every object to a temporary file and renames it, from a worker
    thread, creating its parent folders first: four system calls and a thread handoff per
    object, most of the cost of a megabyte-sized chunk after its encoding (benchmarks/
    bench_store_write.py). A trace chunk needs none of it: its CRC-32C codec makes a torn chunk
    an error on reading (tracer/store/reader.py), and resume rewrites every layer after the last
    one marked done. Metadata objects (``zarr.json``) keep LocalStore's atomic replacement: a
    reader may open the store while it is written.
    """
    global _ChunkFileStore
    if _ChunkFileStore is None:
        from zarr.storage import LocalStore

        class ChunkFileStore(LocalStore):
            async def set(self, key, value):
                if key.rsplit("/", 1)[-1] == "zarr.json":
                    return await super().set(key, value)
                if not self._is_open:
                    await self._open()
                self._check_writable()
                # In the event loop's thread: one layer's chunks are written one after another,
                # with no handoff per chunk (the writer thread waits for the layer as a whole).
                _write_file(self.root / key, value.as_buffer_like())

        _ChunkFileStore = ChunkFileStore
    return _ChunkFileStore


_ChunkFileStore = None


def _write_file(path: Path, data) -> None:
    """Replace ``path``'s content with ``data`` (bytes-like), creating its folder if missing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data).cast("B")
        while view:  # a regular file takes it whole; a short write is finished, not dropped
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def listing(loc, storage_options: dict | None = None) -> dict[str, int]:
    """Every object under ``loc``: key relative to ``loc`` -> size in bytes (empty where nothing is there)."""
    loc = as_location(loc)
    if isinstance(loc, Path):  # os.walk: a few times faster than fsspec's local find on many chunks
        out = {}
        for folder, _, files in os.walk(loc):
            rel = os.path.relpath(folder, loc)
            for f in files:
                key = f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
                try:
                    out[key] = os.stat(os.path.join(folder, f)).st_size
                except FileNotFoundError:  # replaced while listing (an atomic write's temporary)
                    pass
        return out
    fs, root = filesystem(loc, storage_options)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {p[len(root):].lstrip("/"): int(info.get("size") or 0) for p, info in found.items()}


def names(loc, storage_options: dict | None = None) -> list[str]:
    """The names directly inside ``loc`` (empty where it does not exist)."""
    loc = as_location(loc)
    if isinstance(loc, Path):
        try:
            return [e.name for e in os.scandir(loc)]
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, root = filesystem(loc, storage_options)
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


def exists(loc, storage_options: dict | None = None) -> bool:
    loc = as_location(loc)
    if isinstance(loc, Path):
        return loc.exists()
    fs, root = filesystem(loc, storage_options)
    return fs.exists(root)


def touch(loc, name: str, storage_options: dict | None = None) -> None:
    """Create the empty object ``loc/name``."""
    loc = as_location(loc)
    if isinstance(loc, Path):  # an empty file is cheap to create, unlike a rewrite of one with data
        os.close(os.open(loc / name, os.O_CREAT | os.O_WRONLY, 0o644))
        return
    fs, root = filesystem(loc, storage_options)
    fs.pipe_file(f"{root}/{name}", b"")


def remove(loc, name: str, storage_options: dict | None = None) -> None:
    """Delete ``loc/name`` (a file or a folder), if it is there."""
    loc = as_location(loc)
    if isinstance(loc, Path):
        import shutil

        p = loc / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        return
    fs, root = filesystem(loc, storage_options)
    try:
        fs.rm(f"{root}/{name}", recursive=True)
    except FileNotFoundError:
        pass
