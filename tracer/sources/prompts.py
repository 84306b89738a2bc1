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
    if not p.is_file():
        raise MoetraceError(f"prompts file {str(p)!r} does not exist")
    texts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
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


def tokenize(texts: list[str], tokenizer, max_tokens: int | None = None) -> Tokens:
    """Tokenize each text into one sequence and flatten them into :class:`Tokens`."""
    if tokenizer is None:
        raise MoetraceError("this model has no tokenizer files; moetrace cannot turn text into its tokens")
    ids, seq, pos, text = [], [], [], []
    for s, t in enumerate(texts):
        if not t or not t.strip():
            raise MoetraceError(f"prompt {s} is empty; give text with at least one token")
        toks = tokenizer.encode(t)
        if max_tokens:
            toks = toks[:max_tokens]
        if not toks:
            raise MoetraceError(f"prompt {s} tokenizes to nothing")
        ids += toks
        seq += [s] * len(toks)
        pos += list(range(len(toks)))
        text += [tokenizer.token_text(i) for i in toks]
    return Tokens(np.array(ids, np.int64), np.array(seq, np.int32), np.array(pos, np.int32), np.array(text, object))
