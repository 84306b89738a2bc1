"""Figures of docs/case-study-qwen3-30b-a3b.md that no moetrace command prints as such.

Every number comes from the trace stores two ``moetrace run`` commands wrote: a run of the model
without a fault (``--clean``) and the same run with one expert matrix planted (``--plant``), over
the same tokens. Each run's variants are compared with that run's own ``orig-fp32`` reference.

    python docs/case_study_figures.py load  --run traces/cs-clean --layer 2 [--expert 64]
    python docs/case_study_figures.py fault --clean traces/cs-clean --plant traces/cs-plant --layer 2 --expert 64
    python docs/case_study_figures.py fault --plant traces/plant --layer 0 --expert 22 \
        --without 'q4_k_m+blk.0.ffn_up_exps=bf16-bf16' --with q4_k_m-bf16

    python docs/case_study_figures.py paths --run traces/plant

``load``: tokens per expert at one layer in the reference (which expert to plant the fault in).
``paths``: one grid of file types (rows) by compute paths (columns) for claims 2 and 4: each variant's
output KL against the reference, and against the same file type's ``fp32`` variant (the arithmetic
alone, on the same weights), its final-layer error and its mean local (teacher-forced) error.
``fault``: per variant, the output figures with and without the fault (claim 1): the same
variant in a run without the fault (``--clean``), or another variant of the same run that leaves
the faulty tensor unquantized (``--without``), and the error split by token groups (claim 3): tokens the reference routed to the
planted expert at the planted layer (or the variant's own routing did), tokens after the first of those in their sequence (reachable
only through attention), and tokens before it (causally out of reach: a control that must read 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import moetrace
from moetrace.tracer.analysis.common import reference, variant
from moetrace.tracer.analysis.compare import hidden_error, kl_per_token, top1_agree


def _open(run: Path, name: str):
    return moetrace.open_trace(str(run / f"{name}.zarr"))


def _variants(run: Path) -> list[str]:
    return sorted(p.name[: -len(".zarr")] for p in run.glob("*.zarr") if p.name != "orig-fp32.zarr")


def routed_tokens(ref, var, layer: int, expert: int) -> np.ndarray:
    """(token,) True where the reference's top-k at ``layer``, or the variant's own (free mode), holds ``expert``.

    The variant's own choice counts too: a token whose routing flipped onto the faulty expert meets it
    although the reference never sent it there.
    """
    idx = reference(ref, "topk_idx").sel(layer=layer).values  # (token, k)
    own = variant(var, "topk_idx", "free").sel(layer=layer).values  # (token, k)
    return (idx == expert).any(-1) | (own == expert).any(-1)


def token_groups(ref, routed: np.ndarray) -> dict[str, np.ndarray]:
    """routed / after (later in a sequence that has a routed token) / before (causally out of reach)."""
    seq, pos = ref["seq"].values, ref["pos"].values
    first = {s: pos[(seq == s) & routed].min() for s in np.unique(seq[routed])}
    after_first = np.array([s in first and p > first[s] for s, p in zip(seq, pos)])
    return {"routed": routed, "after": after_first & ~routed, "before": ~after_first & ~routed}


def per_token(ref, var, mode: str) -> dict[str, np.ndarray]:
    """Per-token figures of ``var`` in ``mode``: resid relative L2 (layer, token), KL and top-1 agreement (token)."""
    err = hidden_error(reference(ref, "resid"), variant(var, "resid", mode)).rel_error.values  # (layer, token)
    rl, vl = reference(ref, "logits"), variant(var, "logits", mode)
    return {"rel": err, "kl": kl_per_token(rl, vl).values, "agree": top1_agree(rl, vl).values.astype(float)}


def cmd_load(args) -> None:
    ref = _open(args.run, "orig-fp32")
    idx = reference(ref, "topk_idx").sel(layer=args.layer).values  # (token, k)
    load = np.bincount(idx.ravel().astype(np.int64), minlength=int(ref.sizes["expert"]))
    order = np.argsort(-load, kind="stable")
    print(f"tokens per expert at layer {args.layer} ({idx.shape[0]} tokens, top-{idx.shape[1]}; reference routing):")
    print("  busiest: " + ", ".join(f"e{e} {load[e]}" for e in order[:8]))
    print(f"  median {np.median(load):.0f}, mean {load.mean():.2f}, idle experts {int((load == 0).sum())}")
    if args.expert is not None:
        pos = ref["pos"].values[(idx == args.expert).any(-1)]
        first = f", the first at position {pos.min()}" if pos.size else ""
        print(f"  expert {args.expert}: {load[args.expert]} tokens{first}")


def _pairs(args) -> list[tuple[str, tuple, tuple]]:
    """(label, (reference, store) without the fault, (reference, store) with it) for each variant compared.

    With ``--clean RUN``: each variant of the planted run against the same variant of the clean run. With
    ``--without V``: each ``--with`` variant of the planted run against variant V of the same run (V leaves
    the faulty tensor unquantized), over the same reference.
    """
    ref_p = _open(args.plant, "orig-fp32")
    if args.clean is not None:
        ref_c = _open(args.clean, "orig-fp32")
        if not np.array_equal(ref_c["token_id"].values, ref_p["token_id"].values):
            raise SystemExit("the two runs traced different tokens")
        names = [v for v in _variants(args.plant) if v in _variants(args.clean)]
        return [(n, (ref_c, _open(args.clean, n)), (ref_p, _open(args.plant, n))) for n in names]
    base = (ref_p, _open(args.plant, args.without))
    return [(n, base, (ref_p, _open(args.plant, n))) for n in args.with_]


def cmd_fault(args) -> None:
    if (args.clean is None) == (args.without is None):
        raise SystemExit("give --clean RUN, or --without VARIANT with --with VARIANT ...")
    pairs = _pairs(args)
    ref_p = pairs[0][2][0]
    against = f"run {args.clean}" if args.clean is not None else f"variant {args.without}"
    print(f"fault {args.layer}:{args.expert}, {ref_p.sizes['token']} tokens; without the fault: {against}")
    print("\nclaim 1: the whole output with and without the fault (free mode, against orig-fp32)")
    print(f"{'variant':<22}{'KL without':>12}{'KL with':>11}{'top-1 without':>15}{'top-1 with':>12}"
          f"{'final relL2 without':>21}{'final relL2 with':>18}")
    figs = {}
    for name, (rc, vc), (rp, vp) in pairs:
        c, p = per_token(rc, vc, "free"), per_token(rp, vp, "free")
        figs[name] = (c, p, (rc, vc), (rp, vp))
        print(f"{name:<22}{c['kl'].mean():>12.3e}{p['kl'].mean():>11.3e}{100 * c['agree'].mean():>14.1f}%"
              f"{100 * p['agree'].mean():>11.1f}%{c['rel'][-1].mean():>21.3e}{p['rel'][-1].mean():>18.3e}")
    print("\nclaim 3: where the fault's error goes, by token group ('added' = with - without, token means of the"
          " free-mode relative L2 error; 'local': teacher mode at the planted layer)")
    for name, (c, p, (rc, vc), (rp, vp)) in figs.items():
        if "teacher" not in vp.attrs.get("modes", []) or "teacher" not in vc.attrs.get("modes", []):
            continue
        tp = per_token(rp, vp, "teacher")["rel"][args.layer]
        tc = per_token(rc, vc, "teacher")["rel"][args.layer]
        groups = token_groups(rp, routed_tokens(rp, vp, args.layer, args.expert))
        print(f"{name}")
        print(f"  {'group':<8}{'tokens':>7}{'local without':>15}{'local with':>12}"
              + "".join(f"{'added L' + str(L):>11}" for L in range(args.layer, p['rel'].shape[0]))
              + f"{'added KL':>11}{'top-1 lost':>11}")
        for g, m in groups.items():
            if not m.any():
                continue
            added = p["rel"][:, m].mean(1) - c["rel"][:, m].mean(1)  # (layer,)
            print(f"  {g:<8}{int(m.sum()):>7}{tc[m].mean():>15.3e}{tp[m].mean():>12.3e}"
                  + "".join(f"{added[L]:>+11.2e}" for L in range(args.layer, p['rel'].shape[0]))
                  + f"{p['kl'][m].mean() - c['kl'][m].mean():>+11.2e}"
                  + f"{100 * (c['agree'][m].mean() - p['agree'][m].mean()):>+10.1f}%")


def split_variant(name: str) -> tuple[str, str]:
    """``WEIGHTS-COMPUTE`` -> (weights, compute); the compute path names hold no '-'."""
    weights, _, compute = name.rpartition("-")
    return weights, compute


def _grid(title: str, cells: dict, rows: list[str], cols: list[str], fmt: str) -> None:
    """Print one rows x cols table of ``cells[(row, col)]`` ('-' where absent)."""
    print(f"\n{title}")
    print(f"{'weights':<10}" + "".join(f"{c:>23}" for c in cols))
    for r in rows:
        print(f"{r:<10}" + "".join(f"{format(cells[(r, c)], fmt):>23}" if (r, c) in cells else f"{'-':>23}"
                                   for c in cols))


def cmd_paths(args) -> None:
    ref = _open(args.run, "orig-fp32")
    stores = {n: _open(args.run, n) for n in _variants(args.run)}
    same = {**stores, "orig-fp32": ref}  # each variant's own weights in fp32, the reference's included
    names = {n: split_variant(n) for n in stores}
    rows = sorted({w for w, _ in names.values()}, key=lambda w: (w != "orig", w))
    cols = sorted({c for _, c in names.values()}, key=lambda c: (c not in ("fp32", "bf16"), c != "fp32", c))
    rl = reference(ref, "logits")
    kl, kl_same, final, local = {}, {}, {}, {}
    for n, ds in stores.items():
        key, vl = names[n], variant(ds, "logits", "free")
        kl[key] = float(kl_per_token(rl, vl).mean())
        base = f"{key[0]}-fp32"
        if base in same:  # KL(WEIGHTS-fp32 || variant): what the arithmetic alone adds on these weights
            kl_same[key] = float(kl_per_token(variant(same[base], "logits", "free"), vl).mean())
        final[key] = float(per_token(ref, ds, "free")["rel"][-1].mean())
        if "teacher" in ds.attrs.get("modes", []):
            local[key] = float(per_token(ref, ds, "teacher")["rel"].mean())
    print(f"run {args.run}: {ref.sizes['token']} tokens, {len(stores)} variants against orig-fp32 (free mode unless said)")
    _grid("KL(orig-fp32 || variant), nats, token mean", kl, rows, cols, ".3e")
    _grid("KL(WEIGHTS-fp32 || variant), nats: the arithmetic alone on the same weights", kl_same, rows, cols, ".3e")
    _grid("final-layer relative L2 error, token mean", final, rows, cols, ".3e")
    _grid("local (teacher-forced) relative L2 error, mean over layers and tokens", local, rows, cols, ".3e")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("load", help="tokens per expert at one layer (reference routing)")
    a.add_argument("--run", type=Path, required=True)
    a.add_argument("--layer", type=int, required=True)
    a.add_argument("--expert", type=int, default=None, help="also print this expert's load and first position")
    b = sub.add_parser("fault", help="the fault's effect: claims 1 and 3")
    b.add_argument("--plant", type=Path, required=True, help="the run with the planted fault")
    b.add_argument("--clean", type=Path, default=None, help="the same run without the fault")
    b.add_argument("--without", default=None, help="or: a variant of the planted run without the fault's effect")
    b.add_argument("--with", dest="with_", action="append", default=[], help="the variants compared with --without")
    b.add_argument("--layer", type=int, required=True)
    b.add_argument("--expert", type=int, required=True)
    c = sub.add_parser("paths", help="file types x compute paths: output KL, the arithmetic alone (claims 2, 4)")
    c.add_argument("--run", type=Path, required=True)
    args = ap.parse_args(argv)
    {"load": cmd_load, "fault": cmd_fault, "paths": cmd_paths}[args.cmd](args)


if __name__ == "__main__":
    main()
