"""The tokens a run traces: text, a prompts file, or the built-in demo text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.tracer.store.zarr_store import Tokens

DEMO_TEXT = (
    "Mixture-of-Experts models route every token to a few experts. When one expert's weights are "
    "quantized badly, the tokens routed to it carry the damage into every later layer. moetrace runs "
    "the reference and the quantized model side by side and shows where the error grows."
)


def read_prompts(path) -> list[str]:
    """One prompt per line, or JSONL with a ``text`` field per line; blank lines are skipped."""
    p = Path(path)
    texts = []
    for n, line in enumerate(_read_text(p, "prompts file").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoetraceError(f"{p}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj.get("text"), str):
                raise MoetraceError(f"{p}:{n}: a JSONL prompt needs a string 'text' field")
            texts.append(obj["text"])
        else:
            texts.append(line)
    if not texts:
        raise MoetraceError(f"prompts file {str(p)!r} holds no prompts")
    return texts


def _read_text(p: Path, what: str) -> str:
    """The UTF-8 text of ``p``; every way it can fail is one line naming the file."""
    if not p.exists():
        raise MoetraceError(f"{what} {str(p)!r} does not exist")
    if not p.is_file():
        raise MoetraceError(f"{what} {str(p)!r} is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoetraceError(f"{what} {str(p)!r} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise MoetraceError(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None


def read_token_ids(path) -> list[list[int]]:
    """Token ids from a file: ``.npy`` (1-D: one sequence; 2-D: one sequence per row) or JSONL ``{"ids": [...]}``.

    For checkpoints without a tokenizer, and for comparing on exactly the tokens another tool used.

    Returns:
        one list of ids per sequence (range-checked against the vocabulary by :func:`tokens_from_ids`).
    """
    p = Path(path)
    if p.suffix == ".npy":
        return _npy_ids(p)
    seqs = []
    for n, line in enumerate(_read_text(p, "token-ids file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoetraceError(f"{p}:{n}: invalid JSON ({e.msg}); each line is {{\"ids\": [...]}}") from None
        ids = obj.get("ids") if isinstance(obj, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise MoetraceError(f"{p}:{n}: 'ids' must be a non-empty list of integers")
        seqs.append(ids)
    if not seqs:
        raise MoetraceError(f"token-ids file {str(p)!r} holds no sequences")
    return seqs


def _npy_ids(p: Path) -> list[list[int]]:
    if not p.is_file():
        raise MoetraceError(f"token-ids file {str(p)!r} does not exist")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy parses the header with Python's own parser: any error
        from moetrace.tracer.sources.validate import one_line

        raise MoetraceError(f"token-ids file {str(p)!r} is not a readable .npy array ({one_line(e)})") from None
    if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2) or arr.size == 0:
        raise MoetraceError(
            f"token-ids file {str(p)!r} holds a {arr.ndim}-D {arr.dtype} array of {arr.size} values; "
            f"give a non-empty 1-D or 2-D integer array"
        )
    return [row.tolist() for row in np.atleast_2d(arr)]


def tokens_from_ids(seqs: list[list[int]], vocab: int, tokenizer=None, max_tokens: int | None = None) -> Tokens:
    """:class:`Tokens` from given ids, each checked to lie in ``0..vocab-1``."""
    ids, seq, pos, text = [], [], [], []
    for s, row in enumerate(seqs):
        row = row[:max_tokens] if max_tokens else row
        bad = [i for i in row if not 0 <= i < vocab]
        if bad:
            raise MoetraceError(f"sequence {s}: token id {bad[0]} is outside the vocabulary 0..{vocab - 1}")
        ids += row
        seq += [s] * len(row)
        pos += list(range(len(row)))
        text += [tokenizer.token_text(i) if tokenizer is not None else str(i) for i in row]
    return Tokens(np.array(ids, np.int64), np.array(seq, np.int32), np.array(pos, np.int32), np.array(text, object))


def tokenize(texts: list[str], tokenizer, max_tokens: int | None = None) -> Tokens:
    """Tokenize each text into one sequence and flatten them into :class:`Tokens`."""
    if tokenizer is None:
        raise MoetraceError("this model has no tokenizer files; moetrace cannot turn text into its tokens")
    ids, seq, pos, text = [], [], [], []
    for s, t in enumerate(texts):
        if not t or not t.strip():
            raise MoetraceError(f"prompt {s} is empty; give text with at least one token")
        toks = tokenizer.encode(t)
        if max_tokens is not None:
            if max_tokens < 1:
                raise MoetraceError(f"--max-tokens {max_tokens} must be at least 1")
            toks = toks[:max_tokens]
        if not toks:
            raise MoetraceError(f"prompt {s} tokenizes to nothing")
        ids += toks
        seq += [s] * len(toks)
        pos += list(range(len(toks)))
        text += [tokenizer.token_text(i) for i in toks]
    return Tokens(np.array(ids, np.int64), np.array(seq, np.int32), np.array(pos, np.int32), np.array(text, object))
