"""Where blame, the per-expert table and decompose put planted faults drawn from a seed, one row per plant.

For each plant: a traced run of the planted model (the reference and the variant, ``--mode free --mode
teacher``, the default text cut to ``--tokens``, the CLI default 271 tokens when not given), then blame at
the expert level with the audit off (activations only: blame never reads the plant), the teacher-mode
per-expert table and the local/propagated decomposition. A row gives the planted layer's rank at blame's
layer level, the planted tensor's rank among its layer's tensor kinds (``-`` when the planted layer is not
the one searched there), the planted expert's rank at the expert level, what blame ranked first at each
level, the share of the whole layer's recovery that blame's top part recovers, the tokens routed to the
planted expert, and the worst expert of the table and the layer of highest local error.

Plants are drawn as the tests draw them, from a seed the tests do not use: layers spread over the model
(one from each of ``--n`` equal bins), a projection, and an expert the variant's routing at that layer
reaches with at least ``--min-tokens`` token slots, read from one unplanted probe run (the routing at layer
L depends only on the layers before L, which a plant in L leaves alone).

    python benchmarks/bench_plant_table.py [--model builtin:] [--variant q4_k_m-bf16] [--seed 14] [--n 6]
        [--gain G] [--plants L:E:P,...] [--tokens N] [--draw-only] [--run-dir RUN [--restore-layers L,...]]

Run it under ``flock /work/heavy.lock nice -n 10`` on a shared machine (several CPU-minutes per plant).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

PROJS = ("gate", "up", "down")


def draw(probe, n: int, seed: int, min_tokens: int) -> list[str]:
    """``n`` plants L:E:P from ``seed``: L one per equal bin of the layers, E reached by >= min_tokens slots."""
    rng = np.random.default_rng(seed)
    layers = [int(x) for x in probe["moe_layer"].values]
    out = []
    for part in np.array_split(np.array(layers), n):
        L = int(rng.choice(part))
        idx = probe["topk_idx"].sel(mode="free", moe_layer=L).values.ravel()  # (token * k,)
        ids, counts = np.unique(idx[idx >= 0], return_counts=True)
        reached = [int(e) for e, c in zip(ids, counts) if c >= min_tokens]
        out.append(f"{L}:{int(rng.choice(reached))}:{str(rng.choice(PROJS))}")
    return out


def _rank(rows: list[dict], match) -> str:
    ranked = [r for r in rows if r["kl_recovered"] is not None]
    pos = next((i for i, r in enumerate(ranked) if match(r)), None)
    return "-" if pos is None else f"{pos + 1}/{len(ranked)}"


def trace(model: str, variant: str, plant: str, tokens, out: Path) -> tuple[Path, float]:
    """The planted run (free and teacher modes, every site), as ``moetrace run`` traces it: (folder, seconds)."""
    from moetrace.tracer import api

    name = plant.replace(":", "_").replace(".", "p")
    t0 = time.perf_counter()
    api.run(model=model, variants=[variant], modes=["free", "teacher"], plant=plant, max_tokens=tokens,
            out_dir=out, run_name=name)
    return out / name, time.perf_counter() - t0


def measure(run_dir: Path, variant: str, run_s=None, budget: str | None = None) -> dict:
    """One plant's row from its traced run: blame (audit off), the per-expert table, the decomposition.

    With ``budget``, blame's ``--budget`` step too: the chosen overrides' predicted KL recovery (with its 95%
    interval) and the recovery of a real traced run with those overrides (``moetrace blame --budget``).
    """
    from moetrace.tracer.analysis import blame as B
    from moetrace.tracer.analysis.blame_run import open_run
    from moetrace.tracer.analysis.decompose import decompose, max_local_layer
    from moetrace.tracer.analysis.expert_view import expert_rows

    source, ref, var, cfg = open_run(run_dir, variant)
    plant = cfg["plant"]
    t0 = time.perf_counter()
    res = B.blame(source, ref, var, level="expert", n_resamples=200)
    blame_s = time.perf_counter() - t0
    budget_info = _budget(run_dir, cfg, var, ref, res, budget) if budget else None
    L, e, p = plant.split(":")[:3]
    L, e = int(L), int(e)
    kind = f"blk.{L}.ffn_{p}_exps"
    top_l, top_k, top_e = res.top("layer"), res.top("kind"), res.top("expert")
    idx = var["topk_idx"].sel(mode="free", moe_layer=L).values
    worst = expert_rows(var)[0]
    return {
        "plant": plant, "tokens_to_expert": int((idx == e).any(-1).sum()), "n_tokens": res.n_tokens,
        "kl": round(res.kl, 4),
        "layer_rank": _rank(res.level("layer"), lambda r: r["layer"] == L),
        "kind_rank": _rank([r for r in res.level("kind") if r["layer"] == L], lambda r: r["part"] == kind),
        "expert_rank": _rank([r for r in res.level("expert") if r["part"].startswith(kind + "[")],
                             lambda r: r["expert"] == e),
        "top_layer": top_l["part"] if top_l else "-",
        "top_layer_kl": round(top_l["kl_recovered"], 4) if top_l else None,
        "planted_layer_kl": next((round(r["kl_recovered"], 4) for r in res.level("layer")
                                  if r["layer"] == L and r["kl_recovered"] is not None), None),
        "top_kind": top_k["part"] if top_k else "-", "top_expert": top_e["part"] if top_e else "-",
        "top_of_layer": round(top_e["of_layer"], 3) if top_e and top_e.get("of_layer") else None,
        "table_worst": f"{worst['layer']}:{worst['expert']}",
        "max_local_layer": max_local_layer(decompose(ref, var))[0],
        "run_s": None if run_s is None else round(run_s, 1), "blame_s": round(blame_s, 1),
        # layer forwards of blame's layer and kind levels over the traced run's (reference, free, teacher)
        "x_forwards_layer_kind": round(sum(res.cost[lv]["layer_forwards"] for lv in ("layer", "kind"))
                                       / (3 * int(source.num_layers)), 2),
        "budget": budget_info,
    }


def _budget(run_dir: Path, cfg: dict, var, ref, res, budget: str) -> dict:
    """blame --budget: the overrides chosen, the predicted recovery and a real traced run's."""
    from moetrace.tracer.analysis import blame as B
    from moetrace.tracer.analysis.blame_run import parse_budget, quantize_args, verify

    chosen = B.propose(res, parse_budget(budget))
    if not chosen:  # no tensor kind fits the budget
        return {"chosen": [], "within": None}
    p = B.predict(res, chosen, n_resamples=1000)
    real = verify(run_dir, cfg, var, ref, B.overrides_of(chosen, res.to_type))
    rec = p["kl_variant"] - real["kl"]
    return {"chosen": [r["part"] for r in chosen], "llama_quantize": quantize_args(B.overrides_of(chosen, res.to_type)),
            "predicted": round(p["kl_recovered"], 4), "ci": [round(p["ci_low"], 4), round(p["ci_high"], 4)],
            "real": round(rec, 4), "within": bool(p["ci_low"] <= rec <= p["ci_high"])}


def restore_layers(run_dir: Path, variant: str, layers: list[int]) -> dict:
    """A cheaper check than a whole blame: restore only the listed whole layers (blame's layer-level
    candidates), each alone; KL recovered with its 95% bootstrap interval."""
    from moetrace.tracer.analysis import blame as B
    from moetrace.tracer.analysis import stats
    from moetrace.tracer.analysis.blame_run import open_run
    from moetrace.tracer.execution.restore import Candidate, Restorer

    source, ref, var, cfg = open_run(run_dir, variant)
    R = Restorer(source, ref, var)
    parts = B._Parts(R, "ref")
    kl_var = R.variant_kl()  # (token,)
    cands = [Candidate(f"layer {L}", {L: {n: parts.to for n in parts.tensors(L)}}) for L in layers]
    out = R.run(cands)
    row = {"plant": cfg["plant"], "kl": round(float(np.mean(kl_var)), 4)}
    for c in cands:
        gain = kl_var - out[c.name].kl  # (token,)
        lo, hi = stats.bootstrap_ci(gain, n_resamples=200)
        row[c.name] = [round(float(np.mean(gain)), 4), round(lo, 4), round(hi, 4)]
    return row


COLS = ("plant", "tokens_to_expert", "kl", "layer_rank", "planted_layer_kl", "top_layer", "top_layer_kl",
        "kind_rank", "top_kind", "expert_rank", "top_expert", "top_of_layer", "table_worst", "max_local_layer",
        "run_s", "blame_s", "x_forwards_layer_kind", "budget")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:")
    ap.add_argument("--variant", default="q4_k_m-bf16")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--min-tokens", type=int, default=6, help="token slots a drawn expert receives at least")
    ap.add_argument("--gain", default=None, help="append :GAIN to every drawn plant")
    ap.add_argument("--plants", default=None, help="comma-separated L:E:P[:GAIN] instead of drawing")
    ap.add_argument("--tokens", type=int, default=None, help="cut the default text to N tokens (default: all)")
    ap.add_argument("--run-dir", default=None, help="only analyse this traced run folder of a planted model")
    ap.add_argument("--budget", default=None, help="also blame --budget (e.g. 1MB) and a real run of its overrides")
    ap.add_argument("--restore-layers", default=None, help="with --run-dir: only restore these whole layers, "
                    "each alone (L,L,...), and print the KL each recovers")
    ap.add_argument("--draw-only", action="store_true", help="print the drawn plants and stop")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from moetrace.tracer import api
    from moetrace.tracer.store.reader import open_trace

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-plants-", dir="."))
    try:
        if args.run_dir and args.restore_layers:
            print(json.dumps(restore_layers(Path(args.run_dir), args.variant,
                                            [int(x) for x in args.restore_layers.split(",")])))
            return
        if args.run_dir:  # analyse a run traced before (e.g. by `moetrace run --plant ... --mode free --mode teacher`)
            print("| " + " | ".join(str(measure(Path(args.run_dir), args.variant, budget=args.budget)[c])
                                    for c in COLS) + " |")
            return
        if args.plants:
            plants = args.plants.split(",")
        else:
            r = api.run(model=args.model, variants=[args.variant], modes=["free"], max_tokens=args.tokens,
                        out_dir=out, run_name="probe", sites=["topk_idx"])
            plants = draw(open_trace(r.stores[args.variant]), args.n, args.seed, args.min_tokens)
            if args.gain:
                plants = [f"{p}:{args.gain}" for p in plants]
        print(f"model {args.model}, variant {args.variant}, plants {', '.join(plants)}", flush=True)
        if args.draw_only:
            return
        print("| " + " | ".join(COLS) + " |\n|" + "---|" * len(COLS), flush=True)
        rows = []
        for plant in plants:
            run_dir, run_s = trace(args.model, args.variant, plant, args.tokens, out)
            row = measure(run_dir, args.variant, run_s, args.budget)
            rows.append(row)
            print("| " + " | ".join(str(row[c]) for c in COLS) + " |", flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
        print(json.dumps(rows))
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("MOETRACE_PROGRESS", "off")
    main()
