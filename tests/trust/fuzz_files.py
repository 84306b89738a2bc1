"""Real model files for the property suite, the readers the commands use, and the case bookkeeping.

The files are made by moetrace's real writers: the built-in model's checkpoint folder
(``builtin:tiny:layers=2``: config.json + model.safetensors, as ``builtin.materialize`` writes it), a
sharded copy with ``model.safetensors.index.json`` (written with the safetensors package), a GGUF file
written by :func:`moetrace.tracer.weights.gguf_writer.write_gguf` (what ``moetrace quantize`` runs), and
token-id and prompt files. Two layers instead of tiny's four keep a case to tens of milliseconds;
every check that depends on the layer count still has two layers to disagree about.

Each generated case mutates one file and reads it back as the commands do; the outcome must be a
result or one :class:`~moetrace.errors.MoetraceError` of one line, within :data:`CASE_SECONDS`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings

from moetrace.errors import MoetraceError

MODEL = "builtin:tiny:layers=2"
CASE_SECONDS = 30  # per-case bound: a case that runs longer is a hang, and fails
# Profiles: "ci" (the default, what `make test` runs) and "full" (1,000 cases per file kind).
# Select with MOETRACE_FUZZ=full. Examples per test come from the profile.
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.large_base_example])
settings.register_profile("ci", max_examples=int(os.environ.get("MOETRACE_FUZZ_EXAMPLES", 60)), **_COMMON)
settings.register_profile("full", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("MOETRACE_FUZZ", "ci"))

# kind -> Counter(cases, result, error): reported at the end of the session (conftest).
COUNTS: dict[str, Counter] = defaultdict(Counter)


class Hang(Exception):
    pass


@contextmanager
def time_bound(seconds: int = CASE_SECONDS):
    """Fail a case that runs longer than ``seconds`` (SIGALRM: the main thread, Linux)."""
    def on_alarm(signum, frame):
        raise Hang(f"the case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_outcome(kind: str, read) -> str:
    """Run ``read()``; a result or a one-line MoetraceError passes, anything else fails the case."""
    COUNTS[kind]["cases"] += 1
    with time_bound():
        try:
            read()
        except MoetraceError as e:
            msg = str(e)
            assert msg and "\n" not in msg, f"a MoetraceError of more than one line: {msg!r}"
            COUNTS[kind]["error"] += 1
            return "error"
    COUNTS[kind]["result"] += 1
    return "result"


# -- the readers: what `moetrace run` / `audit` read from each file --------------------------
def read_checkpoint(folder):
    """Open a checkpoint folder and read every layer and the tensors outside the layers."""
    from moetrace.tracer.sources.checkpoint import CheckpointSource

    src = CheckpointSource(folder)
    with src.mapped():
        for L in range(src.num_layers):
            src.layer_state(L)
        src.tensor("model.embed_tokens.weight")
        src.tensor("model.norm.weight")
        if not getattr(src.config, "tie_word_embeddings", False):
            src.tensor("lm_head.weight")
    return src


def read_gguf(path, reference):
    """Open a GGUF file, read every layer and global, and check it as ``--gguf`` against ``reference``."""
    from moetrace.tracer.sources.gguf import GGUFSource

    g = GGUFSource(path)
    for L in range(g.num_layers):
        g.layer_state(L)
    for hf in g.family.global_names:
        if g.has(hf):
            g.tensor(hf)
    g.check_matches(reference)
    return g


def read_tokens(path, vocab: int = 256):
    from moetrace.tracer.sources.checkpoint import ByteTokenizer
    from moetrace.tracer.sources.prompts import read_token_ids, tokens_from_ids

    return tokens_from_ids(read_token_ids(path), vocab, ByteTokenizer())


def read_prompt_file(path):
    from moetrace.tracer.sources.checkpoint import ByteTokenizer
    from moetrace.tracer.sources.prompts import read_prompts, tokenize

    return tokenize(read_prompts(path), ByteTokenizer())


# -- making the files --------------------------------------------------------------------------
def make_files(base: Path) -> dict:
    """Write the pristine files under ``base``; returns their paths and the reference source."""
    import torch
    from safetensors.torch import load_file, save_file

    from moetrace.tracer.sources.checkpoint import open_source
    from moetrace.tracer.weights.gguf_writer import write_gguf

    ref = open_source(MODEL)
    ckpt = base / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(ref.folder / name, ckpt / name)
    sharded = base / "sharded"
    sharded.mkdir()
    shutil.copyfile(ref.folder / "config.json", sharded / "config.json")
    tensors = load_file(str(ref.folder / "model.safetensors"))
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    names = list(shards)
    for k, t in tensors.items():
        shards[names[1 if k.startswith("model.layers.1.") else 0]][k] = t
    weight_map = {}
    for shard, part in shards.items():
        save_file({k: v.contiguous() for k, v in part.items()}, str(sharded / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    gguf_path = base / "tiny-q4_k_m.gguf"
    write_gguf(ref, "q4_k_m", gguf_path, cache=False)
    ids = base / "ids.jsonl"
    ids.write_text(json.dumps({"ids": [1, 2, 3, 255]}) + "\n" + json.dumps({"ids": [7, 0]}) + "\n")
    npy = base / "ids.npy"
    np.save(npy, np.array([[1, 2, 3], [4, 5, 6]], np.int64))
    prompts = base / "prompts.txt"
    prompts.write_text("Experts route tokens.\n{\"text\": \"no\"}\nA second prompt \u00e9\n")
    del torch
    return {"ref": ref, "ckpt": ckpt, "sharded": sharded, "gguf": gguf_path, "ids": ids, "npy": npy,
            "prompts": prompts}


# -- byte-level helpers --------------------------------------------------------------------------
def st_header(data: bytes) -> tuple[dict, bytes]:
    """(header JSON, data section) of a safetensors file's bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def flip(data: bytes, flips) -> bytes:
    """``data`` with ``value`` XORed into the byte at each ``offset % len(data)`` (value 1..255)."""
    b = bytearray(data)
    for offset, value in flips:
        b[offset % len(b)] ^= value
    return bytes(b)


def gguf_layout(path) -> dict:
    """Byte positions of the parts a mutation edits in a GGUF file, read with gguf-py's own reader.

    Returns:
        {"tensors": [(name, dims offset, n_dims, type offset, data-offset offset)],
         "numbers": [(key, offset, numpy dtype)] for scalar metadata, "data_offset": int}.
    """
    import gguf

    r = gguf.GGUFReader(str(path))
    tensors = []
    for t in r.tensors:
        f = t.field
        pos, offs = f.offset, []
        for part in f.parts:
            offs.append(pos)
            pos += int(part.nbytes)
        tensors.append((t.name, offs[3], len(f.parts[3]), offs[4], offs[5]))
    numbers = []
    for key, f in r.fields.items():
        if len(f.parts) == 4 and f.types and f.types[0] not in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
            pos = f.offset + sum(int(p.nbytes) for p in f.parts[:3])
            numbers.append((key, pos, f.parts[3].dtype))
    return {"tensors": tensors, "numbers": numbers, "data_offset": int(r.data_offset)}


class Blob(bytes):
    """File bytes that print as their length: a failing case's report names the mutation, not 7 MB."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


def put(data: bytes, offset: int, raw: bytes) -> bytes:
    return data[:offset] + raw + data[offset + len(raw):]
