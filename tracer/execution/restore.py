"""Restore parts of a variant and measure, downstream only, how much of its output error goes away.

A *candidate* is the variant with some of its weights restored: a whole layer, one tensor kind of a
layer (``ffn_down_exps``), or one expert's matrix, to the reference's weights or to a stated higher
GGML type. Its effect is causal: the candidate's layers run from the variant's own recorded input
to its first restored layer (the free-mode ``resid`` of the layer before, in the variant's store),
then every layer below in the variant's weights, then the output head; its KL to the reference's
recorded logits is compared with the variant's own recorded KL. Nothing upstream of a candidate's
first layer is run again.

Candidates run in lockstep, one layer at a time, as the executor runs variants: a layer's variant
weights are derived once and shared by every candidate passing through it, and each candidate's
stream is a few (token, hidden) tensors. A candidate whose error at a layer recovers much less than
the best candidate's at that same layer (:class:`StopRule`) is stopped there: its branch is not
followed to the output, and its residual recovery at the layer it reached is reported instead.

Restoring a tensor is a change of its GGML type (``F32`` for the reference's weights), so a
candidate's weights are exactly those of the variant with a ``--tensor-type`` override for that
tensor (tracer/weights/derive.py), and its bytes at the new type are the GGUF file's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from moetrace.errors import MoetraceError
from moetrace.tracer.weights.derive import TensorTypes, variant_layer_state


@dataclass
class Candidate:
    """One restoration: per layer, GGUF tensor name -> the GGML type it is restored to.

    Attributes:
        name: how the part reads (``layer 5``, ``blk.5.ffn_down_exps``, ``blk.5.ffn_down_exps[3]``).
        restore: layer -> {GGUF name: type}; the first layer is where the candidate starts.
        expert: for one expert's matrix: the expert index (the tensor is restored in that expert's rows only).
        info: what the search attaches (kind, layer, bytes, ...).
    """

    name: str
    restore: dict[int, dict[str, str]]
    expert: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def start(self) -> int:
        return min(self.restore)


@dataclass
class StopRule:
    """When a branch is stopped early.

    A candidate that has run ``min_layers`` layers is stopped at a layer where its residual
    recovery (:func:`recovery`: the share of the variant's residual error energy it removes) is
    below ``fraction`` times the best recovery any candidate reached at that same layer.
    """

    min_layers: int = 2
    fraction: float = 0.1


@dataclass
class Outcome:
    """What one candidate did.

    Attributes:
        kl: (token,) KL(ref || candidate) of the next-token distributions; None where stopped.
        final_error: mean relative L2 error of the last layer's residual; None where stopped.
        resid_recovery: layer -> residual recovery at that layer (see :class:`StopRule`).
        stopped_at: the layer where the branch was stopped (None: ran to the output).
    """

    kl: np.ndarray | None = None
    final_error: float | None = None
    resid_recovery: dict = field(default_factory=dict)
    stopped_at: int | None = None


class Restorer:
    """The machinery of restoring: the model's modules, the variant's weights and the run's recorded streams.

    Args:
        source: the run's model source.
        ref_ds, var_ds: the reference's and the variant's trace stores (the variant's with a free mode).
    """

    def __init__(self, source, ref_ds, var_ds, gguf=None):
        from moetrace.tracer.execution.executor import _Model, _VariantWeights
        from moetrace.tracer.variants import Variant
        from moetrace.tracer.weights.derive import tensor_types

        self.source = source
        self.model = _Model.for_source(source)
        self.family = self.model.family
        self.variant = Variant.parse(var_ds.attrs["variant"])
        self.types = tensor_types(source, self.variant)
        self.gguf = gguf  # a GGUF file's variant: its weights and types are the file's
        if gguf is not None:
            types = TensorTypes(gguf.ggml_types())
            types.context, types.family, types.config = self.types.context, self.types.family, self.types.config
            self.types = types
        self.weights = _VariantWeights(source, self.variant,
                                       {self.variant.gguf_name: gguf} if gguf is not None else None)
        self.ref_ds, self.var_ds = ref_ds, var_ds
        self.n_layers = int(source.num_layers)
        self.seq = var_ds["seq"].values
        self.pos = var_ds["pos"].values
        self.ids = var_ds["token_id"].values
        self.seqs = sorted(set(self.seq.tolist()))
        self.ctx = [self.model.context(self._embed(s), torch.from_numpy(self.pos[self.seq == s]).long())
                    for s in self.seqs]
        self.ref_logits = ref_ds["logits"].sel(mode="free").values.astype(np.float64)  # (token, vocab)
        self._var_error: dict[int, np.ndarray] = {}  # layer -> (token,) relative L2 errors
        self._ref_views: dict[int, np.ndarray] = {}  # layer -> the reference's stream through the final norm
        self._norm = None  # the model's final norm, built on first use
        self._held = None  # (layer, reference state, variant state) of the layer being run
        self.forwards = 0  # decoder-layer forward passes run (the cost)
        self.seconds = 0.0

    # -- recorded streams --------------------------------------------------------------------
    def _embed(self, s: int) -> torch.Tensor:
        ids = torch.from_numpy(self.ids[self.seq == s]).long()
        return self.variant.path.embed(self.weights.globals["model.embed_tokens.weight"], ids)  # (1, T_s, H)

    def recorded_input(self, L: int) -> list[torch.Tensor]:
        """The variant's free-mode input to layer L, per sequence (1, T_s, H), in its compute dtype."""
        if L == 0:
            return [self._embed(s) for s in self.seqs]
        h = torch.from_numpy(self.var_ds["resid"].sel(mode="free", layer=L - 1).values)  # (token, H) float32
        return [h[torch.from_numpy(self.seq == s)][None].to(self.variant.dtype) for s in self.seqs]

    def token_errors(self, L: int, hs: list[torch.Tensor]) -> np.ndarray:
        """(token,) relative L2 error of a stream's layer-L output against the reference's, both seen
        through the model's final norm (:meth:`head_view`)."""
        h = torch.cat([x[0] for x in hs])  # (token, H)
        return _token_errors(self.head_view(h), self._ref_view(L))

    def error(self, L: int, hs: list[torch.Tensor]) -> float:
        """Mean over tokens of :meth:`token_errors`."""
        return float(np.mean(self.token_errors(L, hs)))

    def variant_token_errors(self, L: int) -> np.ndarray:
        """(token,) the variant's own error at layer L (its recorded free-mode stream), as :meth:`token_errors`."""
        if L not in self._var_error:
            h = torch.from_numpy(self.var_ds["resid"].sel(mode="free", layer=L).values)
            self._var_error[L] = _token_errors(self.head_view(h), self._ref_view(L))
        return self._var_error[L]

    def variant_error(self, L: int) -> float:
        return float(np.mean(self.variant_token_errors(L)))

    def head_view(self, h: torch.Tensor) -> np.ndarray:
        """(token, H) float64: the residual stream ``h`` (token, H) as the output head reads it, through
        the model's final norm in float32.

        Errors are measured here, not on the raw stream: a residual's norm is mostly its few outlier
        channels, which the final norm mutes (real models' massive activations, builtin:mini's outlier
        channels), so a raw relative error ranks restorations by channels the output barely sees. On a
        planted run (docs/benchmarks.md, "Planted faults") the raw measure put the planted layer's
        restoration below an early layer's at every later layer while it recovered 5x that layer's KL;
        seen through the final norm the two order as their KL does.
        """
        if self._norm is None:
            self._norm = self.model.norm(self.weights.globals["model.norm.weight"].to(torch.float32))
        with torch.inference_mode():
            return self._norm(h.to(torch.float32)).double().numpy()

    def _ref_view(self, L: int) -> np.ndarray:
        if L not in self._ref_views:
            self._ref_views[L] = self.head_view(torch.from_numpy(self.ref_ds["resid"].sel(mode="free", layer=L).values))
        return self._ref_views[L]

    def variant_kl(self) -> np.ndarray:
        """(token,) the variant's own recorded KL(ref || variant)."""
        return _kl(self.ref_logits, self.var_ds["logits"].sel(mode="free").values.astype(np.float64))

    # -- weights -----------------------------------------------------------------------------
    def tensor_names(self, L: int) -> dict[str, str | tuple]:
        """Name inside layer L -> GGUF name(s), for the tensors layer L holds."""
        return self.family.gguf_layer_names(L, self.source.config)

    def _layer(self, L: int) -> tuple[dict, dict]:
        """(reference state, variant state) of layer L, kept until another layer is asked for."""
        if self._held is None or self._held[0] != L:
            self._held = None  # free the layer before reading the next
            ref = self.source.layer_state(L)
            if self.gguf is not None:
                base = self.weights.layer(L, lambda: ref, lambda: self.gguf.layer_state(L))
            else:
                base = variant_layer_state(ref, L, self.variant, self.types, cast=False)
            self._held = (L, ref, base)
        return self._held[1], self._held[2]

    def state(self, L: int, restore: dict[str, str] | None = None, expert: int | None = None) -> dict:
        """Layer L's weights under the variant, with ``restore`` (GGUF name -> type) applied.

        Only the restored tensors are derived again; with ``expert``, only that expert's rows of
        them change.
        """
        ref, base = self._layer(L)
        if not restore:
            return base
        types = TensorTypes({**self.types, **restore})
        types.context, types.family = self.types.context, self.types.family
        keys = [k for k, g in self.tensor_names(L).items()
                if k in ref and any(n in restore for n in (g if isinstance(g, tuple) else (g,)))]
        part = variant_layer_state({k: ref[k] for k in keys}, L, self.variant, types, cast=False)
        if self.gguf is not None:  # a fused tensor restored in part keeps the file's other parts, not re-derived ones
            names = self.tensor_names(L)
            for k in keys:
                if isinstance(names[k], tuple) and not all(n in restore for n in names[k]):
                    part[k] = self._merged(k, names[k], base[k], part[k], restore)
        if expert is not None:
            return self._one_expert(L, base, part, restore, expert)
        out = type(base)(base)
        out.roles = base.roles
        out.update(part)
        return out

    def _merged(self, key: str, names: tuple, base: torch.Tensor, restored: torch.Tensor,
                restore: dict) -> torch.Tensor:
        """Fused ``key`` with the parts in ``restore`` from ``restored`` and the others from ``base`` (dense)."""
        config = self.source.config
        if not isinstance(base, torch.Tensor) or not isinstance(restored, torch.Tensor):
            from moetrace.errors import InternalError

            raise InternalError(f"{key}: a GGUF variant is blamed under dense compute paths only")
        got = self.family.to_gguf(key, restored.to(torch.float32), config)
        have = self.family.to_gguf(key, base.to(torch.float32), config)
        parts = [g if n in restore else h for n, g, h in zip(names, got, have)]
        return self.family.from_gguf(key, [p.clone() for p in parts], config)

    def _one_expert(self, L: int, base: dict, full: dict, restore: dict, expert: int) -> dict:
        """``base`` with expert ``expert``'s rows of the restored tensors taken from ``full``."""
        out = type(base)(base)
        out.roles = base.roles
        for key, g in self.tensor_names(L).items():
            parts = g if isinstance(g, tuple) else (g,)
            hit = [i for i, n in enumerate(parts) if n in restore]
            if not hit:
                continue
            if key not in full:
                continue
            if not isinstance(base[key], torch.Tensor) or not isinstance(full[key], torch.Tensor):
                raise MoetraceError(f"variant {self.variant.name}: compute path {self.variant.compute!r} takes GGUF "
                                    f"block bytes, so one expert's matrix cannot be restored alone; blame it at the "
                                    f"tensor level (--level kind)")
            t = base[key].to(torch.float32).clone()  # (E, rows, cols); never the reference's own tensor
            rows = t.shape[1] // len(parts)
            for i in hit:
                t[expert, i * rows:(i + 1) * rows] = full[key][expert, i * rows:(i + 1) * rows].to(torch.float32)
            out[key] = t
        return out

    # -- running -----------------------------------------------------------------------------
    def _layer_forward(self, L: int, state: dict, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        layer = self.model.layer(L, state, self.variant.path)
        try:
            out = []
            for s, h in enumerate(hs):
                masks, pe = self.ctx[s]
                out.append(layer(h, attention_mask=masks[self.model.layer_types[L]], position_embeddings=pe))
                self.forwards += 1 / len(hs)
            return out
        finally:
            self.model.release(layer)

    def _head(self, hs: list[torch.Tensor]) -> np.ndarray:
        g = self.weights.globals
        norm = self.model.norm(g["model.norm.weight"])
        w = g.get("lm_head.weight", g["model.embed_tokens.weight"])
        return torch.cat([self.variant.path.head(norm, w, h) for h in hs], dim=0).double().numpy()  # (token, vocab)

    def run(self, candidates: list[Candidate], rule: StopRule | None = None, progress=None) -> dict[str, Outcome]:
        """Run ``candidates`` in lockstep from their first restored layer to the output.

        Returns:
            candidate name -> :class:`Outcome`.
        """
        t0 = time.perf_counter()
        out = {c.name: Outcome() for c in candidates}
        streams: dict[str, list[torch.Tensor]] = {}
        start = min((c.start for c in candidates), default=self.n_layers)
        with torch.inference_mode():
            for L in range(start, self.n_layers):
                if progress:
                    progress(L, self.n_layers)
                starting = [c for c in candidates if c.start == L]
                running = [c for c in candidates if c.name in streams]
                if not starting and not running:
                    continue
                base = self.state(L) if running else None  # the variant's own layer, for every running branch
                for c in running:
                    if L in c.restore:  # a candidate restoring several layers
                        streams[c.name] = self._layer_forward(L, self.state(L, c.restore[L], c.expert),
                                                              streams[c.name])
                    else:
                        streams[c.name] = self._layer_forward(L, base, streams[c.name])
                if starting:
                    hs = self.recorded_input(L)
                    for c in starting:
                        streams[c.name] = self._layer_forward(L, self.state(L, c.restore[L], c.expert), hs)
                del base
                self._measure(L, candidates, streams, out, rule)
            self._held = None  # free the last layer's weights
            for c in candidates:
                if c.name in streams:
                    out[c.name].kl = _kl(self.ref_logits, self._head(streams.pop(c.name)))
        self.seconds += time.perf_counter() - t0
        return out

    def _measure(self, L: int, candidates, streams: dict, out: dict, rule: StopRule | None) -> None:
        """Residual recovery of every running candidate at layer L; stop the branches the rule drops."""
        var_err = self.variant_token_errors(L)
        rec = {}
        for c in candidates:
            if c.name in streams:
                err = self.token_errors(L, streams[c.name])
                rec[c.name] = recovery(var_err, err)
                out[c.name].resid_recovery[L] = rec[c.name]
                if L == self.n_layers - 1:
                    out[c.name].final_error = float(np.mean(err))
        if rule is None or not rec:
            return
        best = max(rec.values())
        for c in candidates:
            if c.name in rec and L - c.start + 1 >= rule.min_layers and L < self.n_layers - 1 \
                    and rec[c.name] < rule.fraction * best:
                del streams[c.name]
                out[c.name].stopped_at = L


def recovery(var_err: np.ndarray, err: np.ndarray) -> float:
    """The share of the variant's residual error energy that a candidate removes: 1 - sum(err^2) / sum(var_err^2)
    over tokens, from (token,) relative L2 errors.

    Energy, not the mean error: the output KL grows with the square of the residual error, and a fault
    that reaches few tokens (one expert's) leaves large errors on those few, which a mean over every
    token dilutes below an ordinary layer's small error on all of them (docs/benchmarks.md, "Planted
    faults": a gain-32 plant on 21 of 271 tokens whose layer recovered 5x the KL of the top layer was
    stopped early by the mean).
    """
    total = float(np.sum(var_err ** 2))
    return 1.0 - float(np.sum(err ** 2)) / total if total > 0 else 0.0


def _token_errors(h: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(token,) ||h - r|| / ||r|| row by row (float64 arrays)."""
    return np.linalg.norm(h - r, axis=-1) / np.maximum(np.linalg.norm(r, axis=-1), 1e-30)


def _kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """(token,) KL(softmax(ref) || softmax(logits)) in float64."""
    from moetrace.tracer.analysis.compare import log_softmax

    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)
