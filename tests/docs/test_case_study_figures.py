"""docs/case_study_figures.py on real runs of builtin:tiny: token groups, and the fault's effect by group.

The property that makes the token split trustworthy is causality: a token before the first one that
meets the faulty expert (in the reference's routing or the variant's own) cannot carry any of the
fault's error, in any layer, since attention only looks back. In fp32 its added error is then 0 up to
rounding, while the routed tokens' is large. (The demo text: expert 3 of layer 1 first meets a token
some positions in, so the control group is not empty.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import moetrace

ROOT = Path(__file__).resolve().parents[2]
PLANT = "1:3:down"  # tiny: 4 layers, 8 experts top-2; layer 1's down projection is Q4_K under q4_k_m
# A token's float32 figures may move by rounding when a later token's routing changes the batch an expert
# multiplies (the matmul's blocking depends on its row count): far below any error a fault adds.
FP32_BATCHING = 1e-6


def _script():
    spec = importlib.util.spec_from_file_location("case_study_figures", ROOT / "docs" / "case_study_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from moetrace.tracer.api import run

    out = tmp_path_factory.mktemp("cs")
    args = dict(model="builtin:tiny", variants=["orig-bf16", "q4_k_m-fp32"], modes=["free", "teacher"], max_tokens=64,
                out_dir=out)
    run(**args, run_name="clean")
    run(**args, run_name="plant", plant=PLANT)
    return out / "clean", out / "plant"


def test_groups_partition_tokens_and_follow_causality(runs):
    fig = _script()
    _, plant = runs
    ref, var = moetrace.open_trace(plant / "orig-fp32.zarr"), moetrace.open_trace(plant / "q4_k_m-fp32.zarr")
    routed = fig.routed_tokens(ref, var, 1, 3)
    groups = fig.token_groups(ref, routed)
    masks = np.stack(list(groups.values()))  # (3, token)
    assert np.array_equal(masks.sum(0), np.ones(routed.size))  # every token in exactly one group
    assert np.array_equal(groups["routed"], routed)
    first = ref["pos"].values[routed].min()
    assert np.array_equal(groups["before"], ref["pos"].values < first)  # one sequence here


def test_fault_output_before_group_is_untouched(runs, capsys):
    fig = _script()
    clean, plant = runs
    fig.main(["fault", "--clean", str(clean), "--plant", str(plant), "--layer", "1", "--expert", "3"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[-3:]}
    assert set(rows) == {"routed", "after", "before"}, out
    # Columns: group, tokens, local without, local with, added L1..L3, added KL, top-1 lost.
    before, routed = rows["before"], rows["routed"]
    assert all(abs(float(x)) <= FP32_BATCHING for x in before[4:7]), out  # causally out of reach
    assert float(routed[4]) > 10 * abs(float(rows["after"][4])), out  # the planted layer hits the routed tokens
    assert float(routed[3]) > 2 * float(routed[2]), out  # local error at the planted layer, with vs without


def _grid(out: str, title: str) -> dict[tuple[str, str], str]:
    """The cells of the ``paths`` table whose title starts with ``title``: {(weights, compute): text}."""
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(title))
    cols = lines[i + 1].split()[1:]
    cells = {}
    for line in lines[i + 2:]:
        if not line.strip():
            break
        row, *vals = line.split()
        cells.update({(row, c): v for c, v in zip(cols, vals)})
    return cells


def _kl_float64(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Token mean of KL(p || q) over the last axis, in float64: an independent reference."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_paths_grid_compares_each_variant_with_its_own_weights_in_fp32(runs, capsys):
    fig = _script()
    _, plant = runs
    fig.main(["paths", "--run", str(plant)])
    out = capsys.readouterr().out
    kl, same = _grid(out, "KL(orig-fp32 ||"), _grid(out, "KL(WEIGHTS-fp32 ||")
    ref, q4, bf = (moetrace.open_trace(plant / f"{n}.zarr")["logits"].sel(mode="free").values
                   for n in ("orig-fp32", "q4_k_m-fp32", "orig-bf16"))
    assert same[("q4_k_m", "fp32")] == "0.000e+00", out  # a variant against itself
    assert same[("orig", "bf16")] == kl[("orig", "bf16")], out  # orig's fp32 variant is the reference
    assert same[("q4_k_m", "bf16")] == "-" and kl[("orig", "fp32")] == "-", out  # not traced: no cell
    # Printed to 4 significant digits: within 1e-3 relative of the float64 KL.
    assert float(kl[("q4_k_m", "fp32")]) == pytest.approx(_kl_float64(ref, q4), rel=1e-3), out
    assert float(kl[("orig", "bf16")]) == pytest.approx(_kl_float64(ref, bf), rel=1e-3), out
