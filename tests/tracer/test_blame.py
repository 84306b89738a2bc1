"""Blame and the per-expert table find a planted fault from activations, at locations drawn from a seed.

The plant is drawn, never fixed: (layer, projection) from SEED, the expert among those the run's tokens
reach at that layer (an unreached expert cannot matter, and the variant's routing at layer L depends
only on the layers before it, which a plant in L leaves alone, so an unplanted probe run tells which).
Blame and the table are given the run folder only; they never see the plant.

The variant is Q6_K: ordinary matrices keep about 1% error there, while the planted matrix's block
scales round to zero (tracer/sources/builtin.py, PLANT_STD), so the fault stands far above the noise
on a 3-layer model as Q4_K_M's does on builtin:mini (benchmarks/bench_plant_table.py shows that case).

For time, the runs are shared by the module (one probe run of the routing alone, one traced run per
drawn plant, one blame search per plant, saved in its run folder as ``moetrace blame`` saves it), on
builtin:tiny cut to 3 layers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tests.cli_runner import moetrace

TINY = "builtin:tiny:layers=3"
LAYERS = 3
SEED = 1202
VARIANT = "q6_k-bf16"
TOKENS = 32
N_CASES = 2
MIN_TOKENS = 6  # a drawn expert is one at least this many token slots reach
# Restoring the blamed expert matrix alone recovers at least this share of what restoring its whole
# layer recovers (the acceptance's "most of"): the rest of the layer holds ordinary Q6_K noise only.
MOST = 0.5


def _open(run_dir, name):
    from moetrace.tracer.store.reader import open_trace

    return open_trace(run_dir / f"{name}.zarr")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """N_CASES plants drawn from SEED, each with a traced run folder (free and teacher modes)."""
    from moetrace.tracer import api

    root = tmp_path_factory.mktemp("blame")
    api.run(model=TINY, variants=[VARIANT], max_tokens=TOKENS, out_dir=root, run_name="probe", sites=["topk_idx"])
    probe = _open(root / "probe", VARIANT)
    rng = np.random.default_rng(SEED)
    out = []
    while len(out) < N_CASES:
        L, proj = int(rng.integers(0, LAYERS)), str(rng.choice(["gate", "up", "down"]))
        idx = probe["topk_idx"].sel(mode="free", moe_layer=L).values.ravel()
        reached = sorted(e for e in range(8) if (idx == e).sum() >= MIN_TOKENS)
        plant = f"{L}:{int(rng.choice(reached))}:{proj}"
        if plant in [c[0] for c in out]:
            continue
        name = f"p{len(out)}"
        api.run(model=TINY, variants=[VARIANT], modes=["free", "teacher"], plant=plant, max_tokens=TOKENS,
                out_dir=root, run_name=name)
        out.append((plant, root / name))
    return out


BUDGET = "1MB"


@pytest.fixture(scope="module")
def blamed(cases):
    """Each case's blame search to the expert level, from its run folder alone, as saved there
    (``RUN/blame-VARIANT.json``, where the report finds it): case 0 by the CLI, ``moetrace blame RUN VARIANT
    --budget BUDGET --audit --json`` (a real process, whose JSON stdout must equal the saved file), case 1 by
    the library call behind it."""
    from moetrace.tracer.analysis.blame_run import run_blame

    out = []
    for i, (_, run_dir) in enumerate(cases):
        if i == 0:
            printed = json.loads(moetrace("blame", str(run_dir), VARIANT, "--budget", BUDGET, "--audit", "--json",
                                          "-q").stdout)
        else:
            run_blame(run_dir, VARIANT)
        saved = json.loads((run_dir / f"blame-{VARIANT}.json").read_text())
        assert i != 0 or printed == saved
        out.append(saved)
    return out


def _top(d: dict, level: str) -> dict:
    """The first measured row of a level of a saved blame result (stopped branches have no KL)."""
    return next(r for r in d[level] if r["kl_recovered"] is not None)


@pytest.mark.parametrize("i", range(N_CASES))
def test_blame_ranks_the_drawn_plant_first(cases, blamed, i):
    """Layer level: the planted layer first; kind level: its planted tensor; expert level: the planted expert,
    recovering most of what its layer recovers; all from the run folder alone."""
    plant, _ = cases[i]
    L, e, proj = plant.split(":")
    d = blamed[i]
    why = json.dumps({k: d[k][:4] for k in ("layer", "kind", "expert")}, indent=1)
    assert _top(d, "layer")["layer"] == int(L), why
    assert _top(d, "kind")["part"] == f"blk.{L}.ffn_{proj}_exps", why
    top = _top(d, "expert")
    assert top["expert"] == int(e), why
    assert top["of_layer"] >= MOST, why
    assert top["ci_low"] > 0  # the recovery is not noise over tokens


@pytest.mark.parametrize("i", range(N_CASES))
def test_expert_table_flags_the_drawn_plant(cases, i):
    """The teacher-mode table's worst expert (error over its layer's median) is the planted one; its token
    count and routing weight equal the stored teacher routing."""
    from moetrace.tracer.analysis.expert_view import expert_rows

    plant, run_dir = cases[i]
    L, e, _ = (int(x) if x.isdigit() else x for x in plant.split(":"))
    var = _open(run_dir, VARIANT)
    rows = expert_rows(var)
    assert (rows[0]["layer"], rows[0]["expert"]) == (L, e)
    t = var.sel(mode="teacher")
    idx = t["topk_idx"].values  # (moe_layer, token, k)
    w = t["topk_weight"].values.astype(np.float64)
    counts = np.stack([(idx == x).sum(axis=(1, 2)) for x in range(8)], axis=1)  # (moe_layer, expert)
    assert np.array_equal(t["expert_tokens"].values, counts)
    wsum = np.stack([np.where(idx == x, w, 0).sum(axis=(1, 2)) for x in range(8)], axis=1)
    np.testing.assert_allclose(t["expert_weight"].values, wsum, rtol=1e-5)  # float32 sums of the same weights
    assert np.isnan(var["expert_error"].sel(mode="free").values).all()  # computed in teacher mode only


def test_nothing_restored_reproduces_the_recorded_output(cases):
    """A candidate restoring nothing, started from the recorded input of a middle layer, gives the variant's
    recorded KL bit for bit: the downstream rerun is the run's own computation."""
    from moetrace.tracer.analysis.blame_run import open_run
    from moetrace.tracer.execution.restore import Candidate, Restorer

    source, ref, var, _ = open_run(cases[0][1], VARIANT)
    R = Restorer(source, ref, var)
    out = R.run([Candidate("none", {1: {}})])["none"]
    assert np.array_equal(out.kl, R.variant_kl())
    assert R.forwards == 2  # layers 1 and 2 only


def test_budget_overrides_reproduce_the_prediction_through_a_gguf(cases, blamed, tmp_path):
    """`moetrace blame --budget` (the CLI run of the `blamed` fixture) picks the planted tensor; its llama-quantize overrides, written into a
    GGUF file by moetrace's quantizer and traced as that file, recover the KL blame predicted, inside its stated
    interval; the audit cross-check names the planted matrix as blamed first."""
    from moetrace.tracer import api
    from moetrace.tracer.execution.restore import _kl
    from moetrace.tracer.sources.checkpoint import open_source
    from moetrace.tracer.variants import canonical_overrides
    from moetrace.tracer.weights.gguf_writer import write_gguf

    plant, run_dir = cases[0]
    L, e, proj = plant.split(":")
    out = blamed[0]
    b = out["budget"]
    assert f"blk.{L}.ffn_{proj}_exps" in b["chosen"] and 0 < b["added_bytes"] <= 1e6
    assert b["within"]
    assert any(f"blk.{L}.ffn_{proj}_exps[{e}]" in x and "blamed first" in x for x in out["cross_check"])
    args = b["llama_quantize"].split()
    assert args[0::2] == ["--tensor-type"] * (len(args) // 2)
    gguf = tmp_path / "fixed.gguf"
    write_gguf(open_source(TINY, plant=plant), "q6_k", gguf, overrides=canonical_overrides(args[1::2]))
    var = _open(run_dir, VARIANT)
    seq, ids = var["seq"].values, var["token_id"].values
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"ids": ids[seq == s].tolist()}) + "\n"
                                              for s in np.unique(seq)))
    r = api.run(model=TINY, plant=plant, gguf=str(gguf), variants=["gguf-bf16"], tokens_file=str(tmp_path / "t.jsonl"),
                out_dir=tmp_path, run_name="g", sites=["resid", "logits"])
    ref, g = _open(tmp_path / "g", "orig-fp32"), _open(tmp_path / "g", "gguf-bf16")
    kl = float(np.mean(_kl(ref["logits"].sel(mode="free").values.astype(np.float64),
                           g["logits"].sel(mode="free").values.astype(np.float64))))
    recovered = b["predicted"]["kl_variant"] - kl
    assert b["predicted"]["ci_low"] <= recovered <= b["predicted"]["ci_high"]
    assert r.stores


def test_tokens_of_a_flagged_expert_and_the_report(cases, blamed):
    """`moetrace routing --expert L:E` (run in this process) lists exactly the tokens either side routes to E at L (numpy on the stores);
    the report opens with a table of contents of one-line verdicts and shows the per-expert, component and blame
    sections of the variant."""
    from moetrace.cli.main import main
    from moetrace.tracer.render.report import write_report

    plant, run_dir = cases[1]
    L, e, proj = (int(x) if x.isdigit() else x for x in plant.split(":"))
    p = CliRunner().invoke(main, ["routing", str(run_dir / "orig-fp32.zarr"), str(run_dir / f"{VARIANT}.zarr"),
                                 "--expert", f"{L}:{e}", "--json"])
    assert p.exit_code == 0, p.stderr
    rows = json.loads(p.stdout)["tokens"]
    ref, var = _open(run_dir, "orig-fp32"), _open(run_dir, VARIANT)
    ri = ref["topk_idx"].sel(mode="free", moe_layer=L).values
    vi = var["topk_idx"].sel(mode="free", moe_layer=L).values
    want = np.flatnonzero((ri == e).any(-1) | (vi == e).any(-1))
    assert [r["token"] for r in rows] == want.tolist()
    assert all((r["ref_weight"] is None) == (not (ri[r["token"]] == e).any()) for r in rows)

    rep = write_report(run_dir, n_resamples=20)  # finds the blame ranking saved by the `blamed` fixture
    page = rep.index.read_text()
    assert '<ul class="toc">' in page
    for sid in (f"{VARIANT}-experts", f"{VARIANT}-components", f"{VARIANT}-blame"):
        assert f'href="#{sid}"' in page and f'id="{sid}"' in page
    assert f"worst expert matrix: layer {L} expert {e}" in page
    assert f"blame blk.{L}.ffn_{proj}_exps[{e}]" in page


# BF16 arithmetic alone: about 2**-8 relative per rounding, a few roundings deep in an expert's SwiGLU.
BF16_EXPERT_ERROR = 2e-2


def test_unchanged_weights_leave_only_arithmetic_error(tiny_run):
    """orig-bf16 has the reference's weights: every expert's table error is BF16 arithmetic alone (small, never 0),
    and experts_part (the routed experts' combined error) stays under the MoE block's whole output error."""
    run_dir, stores = tiny_run
    var, ref = _open(run_dir, "orig-bf16"), _open(run_dir, "orig-fp32")
    t = var.sel(mode="teacher")
    err, tok = t["expert_error"].values, t["expert_tokens"].values
    assert (err[tok > 0] > 0).all() and (err[tok > 0] < BF16_EXPERT_ERROR).all()
    assert np.isnan(err[tok == 0]).all()
    moe_err = np.linalg.norm(t["moe_out"].values.astype(np.float64)
                             - ref["moe_out"].sel(mode="free").values.astype(np.float64), axis=-1)  # (moe_layer, token)
    # the teacher-mode MoE input carries the attention's BF16 error too, so the whole block errs at least as much
    assert np.median(t["experts_part"].values / np.maximum(moe_err, 1e-30)) < 1.0


def test_blame_without_the_variant_store_is_one_line(cases):
    """A variant the run folder has no store of: exit status 2, one line naming the stores there (the command run
    in this process: its error path needs no second interpreter)."""
    from moetrace.cli.main import main

    plant, run_dir = cases[0]
    p = CliRunner().invoke(main, ["blame", str(run_dir), "q8_0-bf16"])
    assert p.exit_code == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "no store of variant q8_0-bf16" in p.stderr and VARIANT in p.stderr


def test_stop_rule_recovery_is_not_diluted_by_a_sparse_fault():
    """The stop rule's recovery weighs tokens by their error energy: removing a large error that few tokens
    carry (one expert's fault, 20 of 270 tokens) counts for more than shaving every token's error by 40%, where a mean over tokens had it the other way round (and stopped the sparse fault's branch)."""
    from moetrace.tracer.execution.restore import recovery

    rng = np.random.default_rng(5)
    var_err = rng.uniform(0.05, 0.15, 270)  # ordinary quantization error on every token
    var_err[:20] = rng.uniform(0.6, 1.0, 20)  # the fault's tokens
    fixes_fault = var_err.copy()
    fixes_fault[:20] = rng.uniform(0.05, 0.15, 20)
    shaves_all = var_err * 0.6
    assert recovery(var_err, var_err) == 0.0 and recovery(var_err, np.zeros(270)) == 1.0
    assert recovery(var_err, fixes_fault) > recovery(var_err, shaves_all)
    # the mean measure it replaces ranked them the other way round
    mean_rec = lambda err: 1 - err.mean() / var_err.mean()  # noqa: E731
    assert mean_rec(fixes_fault) < mean_rec(shaves_all)
    # energy, as a float64 sum of squares
    assert np.isclose(recovery(var_err, fixes_fault), 1 - np.sum(fixes_fault ** 2) / np.sum(var_err ** 2), rtol=0,
                      atol=1e-15)
