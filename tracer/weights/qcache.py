"""The quantized-weight cache: GGUF block bytes computed once per model, tensor, type and imatrix.

Quantizing is the slow half of deriving a variant's weights (ggml's K-quant searches run a few
to a few tens of M params/s), dequantizing the fast half. So moetrace keeps the *block bytes*
of every tensor it quantizes, content-addressed, and a second run, audit or ``moetrace
quantize`` of the same model and file type only dequantizes.

A cache entry's key is the SHA-256 of:

- the model's content hash (``source.model_hash``: the generator hash of a built-in model, the
  config and safetensors headers of a checkpoint);
- the GGUF tensor name (``blk.3.ffn_down_exps.weight``) and the GGML type (``Q4_K``);
- a SHA-256 of the reference tensor's bytes as stored (so two checkpoints that share a config
  and safetensors headers, as finetunes of one model do, never share entries; hashing runs at
  several hundred MB/s, a small fraction of quantizing);
- a hash of the importance-matrix values for that tensor (empty without one);
- the kernel fingerprint: moetrace's version and a hash of the ``moetrace.kernels`` sources, so
  any change to a quantizer invalidates what it wrote.

Entries live under ``moetrace.tracer.sources.builtin.cache_root()/quant/`` as ``.npy`` files of uint8
block bytes shaped ``(n_mat, rows, bytes_per_row)`` (``n_mat`` is the expert count of a 3-D
tensor, 1 otherwise). They are written to a temporary name and renamed, so concurrent runs
never see half a file; a file that fails to load is treated as missing and rewritten.
``MOETRACE_QCACHE=0`` turns the cache off for a process. ``MOETRACE_QCACHE_MAX=20G`` trims it,
least recently used entries first, to that size whenever a run, audit or quantize opens it;
``moetrace cache`` shows its size and prunes or clears it. A Q4_K_M copy of a model takes about
30% of its BF16 size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1  # bump when the layout of cache files changes


@functools.lru_cache(maxsize=1)
def kernels_fingerprint() -> str:
    """moetrace's version plus a hash of every source file of ``moetrace.kernels`` (Python and C)
    and of the compiled kernel module, the code that actually ran."""
    import moetrace
    import moetrace.kernels as pkg

    return _fingerprint(moetrace.__version__, list(pkg.__path__))


def _fingerprint(version: str, folders: list) -> str:
    h = hashlib.sha256(f"{version}/{CACHE_FORMAT}".encode())
    for folder in folders:
        files = [*Path(folder).glob("*.py"), *Path(folder).glob("csrc/*.[ch]"), *Path(folder).glob("_ckernels*")]
        for p in sorted(files):
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def array_hash(a) -> str:
    """A short content hash of an array (float32 bytes and shape); "" for None."""
    if a is None:
        return ""
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    h = hashlib.sha256(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


def tensor_hash(mats) -> str:
    """SHA-256 of a tensor's bytes (dtype and shape included), matrix by matrix so no copy of the whole is made.

    Args:
        mats: a torch tensor (n_mat, rows, cols); each ``mats[i]`` is hashed in its stored dtype.
    """
    import torch

    h = hashlib.sha256(f"{mats.dtype}{tuple(mats.shape)}".encode())
    for m in mats:
        m = m.contiguous()
        h.update(memoryview(m.view(torch.uint8).numpy() if m.numel() else np.zeros(0, np.uint8)))
    return h.hexdigest()[:32]


def parse_size(text: str) -> int:
    """``"20G"``, ``"512M"``, ``"1.5T"`` or a plain byte count -> bytes (binary units); see moetrace.settings."""
    from moetrace.settings import parse_size as parse

    return parse(text)


def max_bytes_from_env() -> int | None:
    """``MOETRACE_QCACHE_MAX`` (e.g. ``20G``): the size the cache is trimmed to when a context opens it."""
    from moetrace.settings import size

    return size("MOETRACE_QCACHE_MAX")


def enabled_by_env() -> bool:
    """False when ``MOETRACE_QCACHE`` is set to 0, off, false or no."""
    from moetrace.settings import switch

    return switch("MOETRACE_QCACHE", True)


class QuantCache:
    """A folder of content-addressed block-byte files.

    Args:
        root: the folder; default ``cache_root()/quant``.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        if root is None:
            from moetrace.tracer.sources.builtin import cache_root

            root = cache_root() / "quant"
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str, shape: tuple[int, ...]):
        """The cached bytes as a read-only memory map of ``shape``, or None (missing, wrong shape, unreadable)."""
        p = self.path(key)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            arr = np.load(p, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            arr = None
        if arr is None or arr.dtype != np.uint8 or tuple(arr.shape) != tuple(shape):
            p.unlink(missing_ok=True)  # stale or damaged: recompute
            self.misses += 1
            return None
        self.hits += 1
        try:
            os.utime(p)  # last use, for prune()
        except OSError:
            pass
        return arr

    def entries(self) -> list[tuple[Path, int, float]]:
        """Every entry as (path, bytes, last use), least recently used first."""
        out = []
        for p in self.root.glob("*/*.npy"):
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((p, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e[2])

    def prune(self, max_bytes: int) -> tuple[int, int]:
        """Delete least recently used entries until the cache holds at most ``max_bytes``.

        Returns:
            (entries deleted, bytes freed).
        """
        entries = self.entries()
        total = sum(e[1] for e in entries)
        deleted = freed = 0
        for p, size, _ in entries:
            if total - freed <= max_bytes:
                break
            p.unlink(missing_ok=True)
            deleted, freed = deleted + 1, freed + size
        return deleted, freed

    def writer(self, key: str, shape: tuple[int, ...]) -> "_EntryWriter":
        """A context manager filling a new entry chunk by chunk (memory-mapped, renamed into place on success)."""
        return _EntryWriter(self.path(key), shape)

    def put(self, key: str, data: np.ndarray) -> None:
        """Store a whole entry at once."""
        with self.writer(key, data.shape) as w:
            w.write(0, data)


class _EntryWriter:
    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path = path
        self.shape = tuple(int(s) for s in shape)
        self.tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
        self.arr = None

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.arr = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.uint8, shape=self.shape)
        except OSError:
            self.arr = None  # an unwritable cache is no error: the run just does not cache
        return self

    def write(self, start: int, chunk: np.ndarray) -> None:
        """Write ``chunk`` at flat row ``start`` of the (n_mat * rows, bytes_per_row) view."""
        if self.arr is not None:
            flat = self.arr.reshape(-1, self.shape[-1])
            flat[start:start + chunk.reshape(-1, self.shape[-1]).shape[0]] = chunk.reshape(-1, self.shape[-1])

    def __exit__(self, exc_type, exc, tb):
        if self.arr is None:
            return False
        self.arr.flush()
        del self.arr
        self.arr = None
        if exc_type is None:
            try:
                os.replace(self.tmp, self.path)
            except OSError:
                self.tmp.unlink(missing_ok=True)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


@dataclass
class QuantContext:
    """What deriving a variant's weights needs beyond the weights: the model, the cache, the imatrix.

    Attributes:
        model_hash: the source's content hash (part of every cache key).
        cache: where block bytes are kept; None to quantize every time.
        imatrix: ``{GGUF name: (n_per_row,) or (n_expert, n_per_row) float32}``, or None.
        imatrix_file: where the imatrix came from (for GGUF metadata and messages).
    """

    model_hash: str
    cache: QuantCache | None = None
    imatrix: dict | None = None
    imatrix_file: str | None = None
    _imatrix_hashes: dict = field(default_factory=dict, repr=False)

    def imatrix_for(self, gguf_name: str):
        return None if self.imatrix is None else self.imatrix.get(gguf_name)

    def key(self, gguf_name: str, type_name: str, content: str = "") -> str:
        """The cache key of ``gguf_name`` quantized as ``type_name`` under this context.

        ``content`` is :func:`tensor_hash` of the reference tensor.
        """
        if gguf_name not in self._imatrix_hashes:
            self._imatrix_hashes[gguf_name] = array_hash(self.imatrix_for(gguf_name))
        blob = json.dumps({
            "model": self.model_hash, "tensor": gguf_name, "type": type_name.upper(),
            "imatrix": self._imatrix_hashes[gguf_name], "kernels": kernels_fingerprint(), "content": content,
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def context_for(source, imatrix: dict | None = None, imatrix_file: str | None = None,
                cache: QuantCache | None | bool = True) -> QuantContext:
    """The quantization context of a model source.

    Args:
        source: a model source with ``model_hash``.
        imatrix: per-tensor importance values (see :func:`moetrace.kernels.imatrix.read_imatrix`).
        cache: True for the default cache (unless ``MOETRACE_QCACHE=0``), False/None for none,
            or a :class:`QuantCache`.
    """
    if cache is True:
        cache = QuantCache() if enabled_by_env() else None
        limit = max_bytes_from_env()
        if cache is not None and limit is not None:
            cache.prune(limit)
    elif cache is False:
        cache = None
    model_hash = getattr(source, "model_hash", None)
    if not model_hash:
        cache = None  # nothing to address entries by
    return QuantContext(model_hash=model_hash or "", cache=cache, imatrix=imatrix, imatrix_file=imatrix_file)
