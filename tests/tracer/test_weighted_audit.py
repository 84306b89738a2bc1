"""The activation-weighted audit (moetrace audit --run): routing load from the run, impact ranking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from tests.cli_runner import moetrace

TINY = "builtin:tiny"
LAYER = 2


def _unrouted_expert(run_dir) -> int:
    ref = xr.open_zarr(run_dir / "orig-fp32.zarr", consolidated=False)
    idx = ref["topk_idx"].sel(mode="free").isel(moe_layer=LAYER).values  # (token, k); every layer is MoE here
    unused = sorted(set(range(8)) - set(idx.ravel().tolist()))
    assert unused, "the test needs an expert no token reaches; use fewer tokens"
    return unused[0]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """An unplanted run of builtin:tiny over 3 tokens (its routing, and a run of another model than a planted one)."""
    out = tmp_path_factory.mktemp("probe")
    moetrace("run", "--model", TINY, "--variant", "orig-bf16", "--max-tokens", "3", "--out", str(out),
             "--run", "probe", "-q")
    return out / "probe"


def test_unrouted_planted_fault_ranks_below_routed_matrices(probe, tmp_path):
    """A planted expert no token reaches has the worst cosine (first in the plain audit), but impact 0 in the
    weighted one, below every routed matrix; the figures equal numpy on the stores."""
    # Routing at layer LAYER depends only on layers before it, so a fault planted in LAYER leaves it unchanged:
    # find an expert the text never reaches there, then plant the fault in that expert.
    e0 = _unrouted_expert(probe)
    plant = f"{LAYER}:{e0}:down"
    moetrace("run", "--model", TINY, "--plant", plant, "--variant", "q4_k_m-bf16", "--max-tokens", "3",
             "--out", str(tmp_path), "--run", "r", "-q")
    assert _unrouted_expert(tmp_path / "r") == e0
    plain = json.loads(moetrace("audit", "--variant", "q4_k_m", "--model", TINY, "--plant", plant, "--json",
                                "--out", str(tmp_path / "plain.zarr"), "-q").stdout)
    worst = plain["worst"][0]
    assert (worst["tensor"], worst["expert"]) == (f"blk.{LAYER}.ffn_down_exps.weight", e0)

    store = tmp_path / "w.zarr"
    p = moetrace("audit", "--variant", "q4_k_m", "--model", TINY, "--plant", plant, "--run", str(tmp_path / "r"),
                 "--json", "--top", "500", "--out", str(store), "-q")
    out = json.loads(p.stdout)
    rows = out["top"]
    assert len(rows) == 4 * 8 * 3 and out["run_tokens"] == 3
    pos = next(i for i, r in enumerate(rows) if r["expert"] == e0 and r["tensor"] == worst["tensor"])
    planted = rows[pos]
    assert planted["tokens"] == 0 and planted["impact"] == 0.0 and planted["cosine"] == worst["cosine"]
    routed = [r for r in rows if r["tokens"] > 0]
    assert routed and all(r["impact"] > 0 for r in routed)
    assert pos > max(rows.index(r) for r in routed)  # below every routed matrix
    impacts = [r["impact"] for r in rows]
    assert impacts == sorted(impacts, reverse=True)

    # the figures against numpy on the run's reference store and the audit store
    ref = xr.open_zarr(tmp_path / "r" / "orig-fp32.zarr", consolidated=False)
    idx = ref["topk_idx"].sel(mode="free").values  # (moe_layer, token, k): every layer of the model
    w = ref["topk_weight"].sel(mode="free").values.astype(np.float64)  # (layer, token, k)
    ds = xr.open_zarr(store, consolidated=False)
    projs = list(ds["proj"].values)
    for r in rows:
        L, e = r["layer"], r["expert"]
        sel = idx[L] == e
        mass = w[L][sel].sum()
        share = mass / w[L].sum()
        assert r["tokens"] == int(sel.any(axis=1).sum()) == int(sel.sum())
        assert np.isclose(r["routing_mass"], mass, rtol=1e-12, atol=0)
        assert np.isclose(r["mass_share"], share, rtol=1e-12, atol=0)
        rel = float(ds["rel_error"].values[L, e, projs.index(r["proj"])])
        assert np.isclose(r["impact"], rel * share, rtol=1e-12, atol=0)
    np.testing.assert_allclose(ds["mass_share"].values.sum(axis=1), 1.0, rtol=1e-12)

    text = moetrace("audit", "--variant", "q4_k_m", "--model", TINY, "--plant", plant, "--run", str(tmp_path / "r"),
                    "--out", str(store), "-q").stdout
    assert "tokens" in text and "impact" in text and f"The worst cosine, {worst['tensor']} expert {e0}" in text


def test_run_of_another_model_is_refused(probe, tmp_path):
    p = moetrace("audit", "--variant", "q8_0", "--model", TINY, "--plant", "1:1:down", "--run", str(probe),
                 "--out", str(tmp_path / "a.zarr"), "-q", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "same --model and --plant" in p.stderr
    p = moetrace("audit", "--variant", "q8_0", "--model", TINY, "--run", str(tmp_path / "nope"), "-q", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr
