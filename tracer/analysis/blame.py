"""Blame: which part of a variant causes its output error, found by restoring parts of it.

The search runs from coarse to fine (:func:`blame`): every layer restored alone; then, in the
layers that recover the most, every tensor kind (``attn_q``, ``ffn_down_exps``, ...); then, in the
expert tensor that recovers the most, every expert matrix that tokens reach. Each restoration is a
causal experiment (moetrace.tracer.execution.restore): the variant's recorded input to the restored
layer, the variant's weights below it, the KL of its output to the reference's recorded logits.

A row reads: restoring PART (to the reference's weights, or to ``--to TYPE``) lowers the mean
KL(ref || variant) by ``kl_recovered`` nats (95% bootstrap interval over tokens), which is
``share`` of the variant's whole KL and ``of_layer`` of what restoring the whole layer recovers;
it costs ``bytes`` at the higher type, ``added`` more than now. A branch stopped early (its
residual error energy recovered less than a tenth of the best at the same layer) has no KL figure.

:func:`cross_check` reads an audit's flagged matrices against the ranking; :func:`propose` picks
tensor overrides within a byte budget and :func:`predict` measures them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.tracer.analysis import stats
from moetrace.tracer.execution.restore import Candidate, Restorer, StopRule
from moetrace.tracer.render.table import Column, Table

LEVELS = ("layer", "kind", "expert")
# A part "matters" when restoring it recovers at least this share of the variant's KL; below it the
# audit cross-check calls a flagged matrix harmless for this run's tokens.
HARMLESS_SHARE = 0.05


@dataclass
class BlameResult:
    """The ranking of one blame search.

    Attributes:
        variant: the variant's name; ``to``: the type parts are restored to (``ref``: the reference's).
        kl: the variant's own mean KL(ref || variant); ``final_error``: its last layer's mean relative
            L2 error, seen through the final norm (Restorer.head_view).
        rows: one dict per part measured, per level, best first (see the module docstring).
        cost: layer forwards run and seconds taken, per level.
    """

    variant: str
    to: str
    kl: float
    final_error: float
    n_tokens: int
    rows: list[dict] = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    to_type: str = ""  # the GGML type parts were restored to
    restorer: object = field(default=None, repr=False)  # the search's machinery, reused by predict()

    def level(self, name: str) -> list[dict]:
        return [r for r in self.rows if r["level"] == name]

    def top(self, level: str) -> dict | None:
        rows = [r for r in self.level(level) if r["kl_recovered"] is not None]
        return rows[0] if rows else None


def restore_type(to: str, source_dtype) -> str:
    """The GGML type a restored tensor takes: ``ref`` is the type holding the reference's weights
    losslessly (its checkpoint dtype: BF16, F16 or F32); otherwise the stated type, upper case."""
    if to.lower() != "ref":
        from moetrace.tracer.variants import override_types

        t = to.upper()
        if t not in override_types():
            raise MoetraceError(f"--to {to!r} is no type moetrace can write; valid: ref, "
                                f"{', '.join(x.lower() for x in override_types())}")
        return t
    import torch

    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(source_dtype, "F32")


def _bytes(shape: tuple, type_name: str) -> int:
    from moetrace.kernels.base import row_bytes

    return int(np.prod(shape[:-1])) * row_bytes(type_name, shape[-1])


class _Parts:
    """The restorable parts of a model under a variant: tensors, their kinds, sizes and current types."""

    def __init__(self, R: Restorer, to: str):
        from moetrace.tracer.weights.derive import gguf_specs, never_quantized

        self.R = R
        self.specs = gguf_specs(R.source)
        ref0 = R.source.layer_state(0)
        dtype = next(iter(ref0.values())).dtype
        self.to = restore_type(to, dtype)
        self.never = never_quantized

    def tensors(self, L: int) -> list[str]:
        """GGUF names of layer L whose type differs from the restore type (quantized ones)."""
        out = []
        for g in self.R.tensor_names(L).values():
            for n in (g if isinstance(g, tuple) else (g,)):
                if n in self.specs and not self.never(n, len(self.specs[n])) \
                        and self.R.types.get(n, "F32") != self.to:
                    out.append(n)
        return out

    def size(self, names, expert: int | None = None) -> tuple[int, int]:
        """(bytes at the restore type, bytes added over the current types) of ``names`` (one expert's slice)."""
        new = now = 0
        for n in names:
            shape = self.specs[n][1:] if expert is not None else self.specs[n]
            new += _bytes(shape, self.to)
            now += _bytes(shape, self.R.types.get(n, "F32"))
        return new, new - now


def _kind(name: str) -> str:
    return name.split(".")[2]


def _rows(level: str, cands: list[Candidate], outcomes: dict, kl_var: np.ndarray, parent: float | None,
          n_resamples: int) -> list[dict]:
    """Ranking rows of one level from the candidates' outcomes, best first; stopped branches last."""
    rows = []
    base = float(np.mean(kl_var))
    for c in cands:
        o = outcomes[c.name]
        row = {"level": level, "part": c.name, **c.info, "stopped_at": o.stopped_at,
               "resid_recovery": o.resid_recovery.get(o.stopped_at if o.stopped_at is not None
                                                      else max(o.resid_recovery, default=None))}
        if o.kl is not None:
            gain = kl_var - o.kl  # (token,) per-token KL recovered
            lo, hi = stats.bootstrap_ci(gain, n_resamples=n_resamples)
            rec = float(np.mean(gain))
            row.update(kl_recovered=rec, ci_low=lo, ci_high=hi, share=rec / base if base > 0 else float("nan"),
                       of_layer=rec / parent if parent else None, kl=float(np.mean(o.kl)),
                       final_error=o.final_error)
        else:
            row.update(kl_recovered=None, ci_low=None, ci_high=None, share=None, of_layer=None, kl=None,
                       final_error=None)
        rows.append(row)
    rows.sort(key=lambda r: (r["kl_recovered"] is None,
                             -(r["kl_recovered"] if r["kl_recovered"] is not None else r["resid_recovery"] or 0)))
    return rows


def _routed(R: Restorer, L: int) -> dict[int, int]:
    """Expert -> tokens the variant's free run routed to it at layer L (MoE layers only)."""
    ds = R.var_ds
    if "topk_idx" not in ds or "moe_layer" not in ds["topk_idx"].dims or L not in ds["moe_layer"].values:
        return {}
    idx = ds["topk_idx"].sel(mode="free", moe_layer=L).values.ravel()  # (token * k,)
    ids, counts = np.unique(idx[idx >= 0], return_counts=True)
    return {int(e): int(n) for e, n in zip(ids, counts)}


def blame(source, ref_ds, var_ds, to: str = "ref", layers: int = 1, level: str = "expert",
          n_resamples: int = stats.N_RESAMPLES, progress=None, gguf=None) -> BlameResult:
    """Rank the parts of the variant of ``var_ds`` by the output KL restoring each recovers.

    Args:
        source: the run's model source (opened as the run opened it).
        ref_ds, var_ds: the run's reference store and the variant's (with a free mode).
        to: ``ref`` (the reference's weights) or a GGML type name to restore parts to.
        layers: how many of the best layers are searched at the tensor-kind level.
        level: the finest level searched: ``layer``, ``kind`` or ``expert``.
        progress: optional ``progress(level, layer, layers)``.
        gguf: the GGUF file (a GGUFSource) of a ``gguf`` variant: its tensors are the variant's, and
            restored parts come from the reference (or ``to``) as for any variant.

    Raises:
        MoetraceError: the variant's store has no free mode, or a level name is unknown.
    """
    if level not in LEVELS:
        raise MoetraceError(f"unknown blame level {level!r}; valid: {', '.join(LEVELS)}")
    if "free" not in [str(m) for m in var_ds["mode"].values]:
        raise MoetraceError(f"{var_ds.attrs.get('variant')}: blame restores parts of the free-running variant; trace "
                            f"it with --mode free")
    R = Restorer(source, ref_ds, var_ds, gguf)
    parts = _Parts(R, to)
    kl_var = R.variant_kl()
    res = BlameResult(R.variant.name, to, float(np.mean(kl_var)), R.variant_error(R.n_layers - 1), len(kl_var),
                      to_type=parts.to, restorer=R)

    def run(name, cands, rule):
        f0, t0 = R.forwards, R.seconds
        out = R.run(cands, rule, progress=(lambda L, n: progress(name, L, n)) if progress else None)
        res.cost[name] = {"candidates": len(cands), "layer_forwards": round(R.forwards - f0, 3),
                          "seconds": round(R.seconds - t0, 3)}
        return out

    cands = []
    for L in range(R.n_layers):
        names = parts.tensors(L)
        if names:
            b, added = parts.size(names)
            cands.append(Candidate(f"layer {L}", {L: {n: parts.to for n in names}},
                                   info={"layer": L, "kind": None, "expert": None, "bytes": b, "added_bytes": added}))
    if not cands:
        raise MoetraceError(f"variant {R.variant.name} has no tensor whose type differs from {parts.to}; nothing to "
                            f"restore")
    layer_rows = _rows("layer", cands, run("layer", cands, StopRule(2, 0.1)), kl_var, None, n_resamples)
    res.rows += layer_rows
    if level == "layer":
        return res
    by_layer = {r["layer"]: r["kl_recovered"] for r in layer_rows}
    best_layers = [r["layer"] for r in layer_rows if r["kl_recovered"] is not None][:layers]
    cands = []
    for L in best_layers:
        kinds: dict[str, list[str]] = {}
        for n in parts.tensors(L):
            kinds.setdefault(_kind(n), []).append(n)
        for kind, names in kinds.items():
            b, added = parts.size(names)
            cands.append(Candidate(".".join(names[0].split(".")[:3]), {L: {n: parts.to for n in names}},
                                   info={"layer": L, "kind": kind, "expert": None, "bytes": b, "added_bytes": added,
                                         "tensors": names}))
    outcomes = run("kind", cands, StopRule(2, 0.1))
    for L in best_layers:
        mine = [c for c in cands if c.info["layer"] == L]
        res.rows += _rows("kind", mine, outcomes, kl_var, by_layer[L], n_resamples)
    if level == "kind":
        return res
    for L in best_layers[:1]:
        kind_rows = [r for r in res.level("kind") if r["layer"] == L and r["kl_recovered"] is not None]
        experts_kind = next((r for r in kind_rows if len(parts.specs[r["tensors"][0]]) == 3), None)
        if experts_kind is None or experts_kind is not kind_rows[0]:
            res.notes.append(f"layer {L}: its worst tensor kind holds no experts; no expert level")
            continue
        routed = _routed(R, L)
        cands = []
        for e, n_tok in sorted(routed.items()):
            names = experts_kind["tensors"]
            b, added = parts.size(names, expert=e)
            cands.append(Candidate(f"{experts_kind['part']}[{e}]", {L: {n: parts.to for n in names}}, expert=e,
                                   info={"layer": L, "kind": experts_kind["kind"], "expert": e, "bytes": b,
                                         "added_bytes": added, "tokens": n_tok, "tensors": names}))
        res.rows += _rows("expert", cands, run("expert", cands, StopRule(1, 0.1)), kl_var, by_layer[L],
                          n_resamples)
    return res


# -- the audit cross-check ---------------------------------------------------------------------

def cross_check(res: BlameResult, flagged: list[dict]) -> list[str]:
    """Sentences reading the audit's flagged matrices against the ranking.

    Args:
        flagged: the audit's flagged rows (``tensor`` GGUF name, ``expert`` or None, ``cosine``).
    """
    lines = []
    by_layer = {r["layer"]: r for r in res.level("layer")}
    expert_rows = {(r["layer"], r["kind"], r["expert"]): r for r in res.level("expert")}
    kind_rows = {(r["layer"], r["kind"]): r for r in res.level("kind")}
    top = res.top("expert") or res.top("kind") or res.top("layer")
    for f in flagged:
        name = f["tensor"]
        L, kind = int(name.split(".")[1]), name.split(".")[2]
        what = f"{name.rsplit('.', 1)[0]}" + (f"[{f['expert']}]" if f.get("expert") is not None else "")
        row = expert_rows.get((L, kind, f.get("expert"))) or kind_rows.get((L, kind)) or by_layer.get(L)
        if row is None:
            continue
        share = row.get("share")
        cos = f"cosine {f['cosine']:.3f}"
        if top is not None and row is top:
            lines.append(f"{what}: flagged by the audit ({cos}) and blamed first here: restoring it recovers "
                         f"{_pct(share)} of the output KL")
        elif share is not None and share >= HARMLESS_SHARE:
            lines.append(f"{what}: flagged by the audit ({cos}); restoring {row['part']} recovers {_pct(share)} of "
                         f"the output KL")
        else:
            why = f"{row.get('tokens')} tokens reach it" if row.get("tokens") is not None else \
                f"restoring {row['part']} recovers {_pct(share) if share is not None else 'too little to follow'}"
            lines.append(f"{what}: flagged by the audit ({cos}) but harmless on this run's tokens: {why} "
                         f"(under {_pct(HARMLESS_SHARE)} of the output KL)")
    if top is not None and top.get("kind") and not any(
            f["tensor"].startswith(".".join(top["tensors"][0].split(".")[:3])) and
            (top.get("expert") is None or f.get("expert") == top["expert"]) for f in flagged):
        lines.append(f"{top['part']}: blamed first here, but not flagged by the audit")
    return lines


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


# -- budget --------------------------------------------------------------------------------------

def propose(res: BlameResult, budget_bytes: int) -> list[dict]:
    """The tensor-kind rows that recover the most KL within ``budget_bytes`` added bytes (greedy by KL per byte)."""
    rows = [r for r in res.level("kind") if r["kl_recovered"] is not None and r["kl_recovered"] > 0]
    rows.sort(key=lambda r: -r["kl_recovered"] / max(r["added_bytes"], 1))
    chosen, spent = [], 0
    for r in rows:
        if spent + r["added_bytes"] <= budget_bytes:
            chosen.append(r)
            spent += r["added_bytes"]
    return chosen


def overrides_of(chosen: list[dict], to_type: str) -> list[tuple[str, str]]:
    """(pattern, type) per chosen tensor, llama-quantize's ``--tensor-type`` form (GGUF name without ``.weight``
    would also match longer names; the full name matches one tensor)."""
    return [(n, to_type) for r in chosen for n in r["tensors"]]


def predict(res: BlameResult, chosen: list[dict], n_resamples: int = stats.N_RESAMPLES) -> dict:
    """The KL recovered by restoring every chosen tensor together (one downstream run), with its interval."""
    R, to_type = res.restorer, res.to_type
    f0, t0 = R.forwards, R.seconds
    restore: dict[int, dict[str, str]] = {}
    for r in chosen:
        restore.setdefault(r["layer"], {}).update({n: to_type for n in r["tensors"]})
    kl_var = R.variant_kl()
    o = R.run([Candidate("budget", restore)])["budget"]
    gain = kl_var - o.kl
    lo, hi = stats.bootstrap_ci(gain, n_resamples=n_resamples)
    return {"kl_recovered": float(np.mean(gain)), "ci_low": lo, "ci_high": hi, "kl": float(np.mean(o.kl)),
            "kl_variant": float(np.mean(kl_var)), "layer_forwards": R.forwards - f0, "seconds": R.seconds - t0}


# -- tables ----------------------------------------------------------------------------------------

def _mb(x) -> str:
    return f"{x / 1e6:.2f} MB"


COLUMNS = [
    Column("part", "part", "{}", "the restored part: a layer, a tensor (blk.L.KIND), or one expert's matrix "
           "(blk.L.KIND[E])", align="left"),
    Column("kl_recovered", "KL recovered", "{:.4f}", "mean KL(ref || variant) in nats that restoring the part removes"),
    Column("ci", "95% CI", "{}", "bootstrap interval over tokens of the KL recovered", json=False),
    Column("share", "share", "{:.0%}", "of the variant's whole KL"),
    Column("of_layer", "of layer", "{:.0%}", "of what restoring the part's whole layer recovers"),
    Column("tokens", "tokens", "{:d}", "tokens routed to the expert (expert level)"),
    Column("bytes", "bytes", _mb, "the part's size at the higher type"),
    Column("added_bytes", "added", _mb, "bytes more than at the variant's types"),
    Column("stopped", "stopped", "{}", "the branch was stopped early at this layer; its residual recovery there",
           json=False),
    Column("ci_low", "ci_low", "{:.4f}", table=False),
    Column("ci_high", "ci_high", "{:.4f}", table=False),
    Column("stopped_at", "stopped_at", "{}", table=False),
    Column("resid_recovery", "resid_recovery", "{:.3f}", table=False),
    Column("final_error", "final_error", "{:.4f}", table=False),
    Column("layer", "layer", "{}", table=False),
    Column("kind", "kind", "{}", table=False),
    Column("expert", "expert", "{}", table=False),
]


def level_table(res: BlameResult, level: str, top: int | None = None) -> Table:
    titles = {"layer": "Layers, each restored alone", "kind": "Tensor kinds of the best layers",
              "expert": "Expert matrices of the best expert tensor (tokens routed there)"}
    t = Table(COLUMNS, title=titles[level])
    for r in res.level(level)[:top]:
        row = dict(r)
        if r["kl_recovered"] is not None:
            row["ci"] = f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
        if r["stopped_at"] is not None:
            row["stopped"] = f"layer {r['stopped_at']}, {r['resid_recovery']:.0%}"
        t.add(row)
    return t


def verdict(res: BlameResult) -> str:
    """One line: what to blame and how much of the KL it explains."""
    top = res.top("expert") or res.top("kind") or res.top("layer")
    if top is None:
        return "no part measured"
    lay = res.top("layer")
    return (f"blame {top['part']}: restoring it recovers {_pct(top['share'])} of the output KL "
            f"({top['kl_recovered']:.4f} of {res.kl:.4f} nats)"
            + (f", {_pct(top['of_layer'])} of what its whole layer recovers" if top.get("of_layer") else "")
            + (f"; the best layer is {lay['part']}" if lay is not None and lay is not top else ""))


def format_blame(res: BlameResult, top: int = 10, extra: list[str] | None = None) -> str:
    parts = [f"Blame for {res.variant}: output KL(ref || variant) {res.kl:.4f} nats over {res.n_tokens} tokens; "
             f"parts restored to {res.to}", verdict(res)]
    for level in LEVELS:
        if res.level(level):
            parts.append(level_table(res, level, top).to_text())
    parts += res.notes + (extra or [])
    cost = ", ".join(f"{k} {v['layer_forwards']:.0f} layer forwards ({v['candidates']} parts, {v['seconds']:.1f} s)"
                     for k, v in res.cost.items())
    parts.append(f"Cost: {cost}")
    return "\n\n".join(parts)


def blame_to_dict(res: BlameResult) -> dict:
    out = {"variant": res.variant, "to": res.to, "kl": res.kl, "final_error": res.final_error,
           "tokens": res.n_tokens, "verdict": verdict(res), "cost": res.cost, "notes": res.notes}
    for level in LEVELS:
        out[level] = level_table(res, level).records()
    return out
