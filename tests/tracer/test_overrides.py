"""Per-tensor type overrides (llama-quantize's --tensor-type): grammar, recipe, GGUF file, traced run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moetrace.errors import MoetraceError
from moetrace.kernels import recipes
from moetrace.tracer.variants import Variant
from tests.cli_runner import moetrace

TINY = "builtin:tiny"


def test_grammar_canonical_names_and_store_names():
    v = Variant.parse("Q4_K_M+blk.9.ffn_down_exps=Q8_0-bf16")
    assert v.name == "q4_k_m+blk.9.ffn_down_exps=q8_0-bf16" == v.store_name
    assert (v.weights, v.compute, v.overrides) == ("q4_k_m", "bf16", (("blk.9.ffn_down_exps", "Q8_0"),))
    # '-', '+' and '|' inside a pattern, a DEQw word after the overrides, a repeated pattern dropped
    v = Variant.parse(r"q4_k_m+blk\.[1-3]+\.attn_v=q8_0+blk.0.(a|b)=f16+blk\.[1-3]+\.attn_v=q6_k-bf16w-fp32")
    assert v.overrides == ((r"blk\.[1-3]+\.attn_v", "Q8_0"), ("blk.0.(a|b)", "F16"))
    assert (v.dequant, v.compute) == ("bf16", "fp32")
    assert v.name == r"q4_k_m+blk\.[1-3]+\.attn_v=q8_0+blk.0.(a|b)=f16-bf16w-fp32"
    assert Variant.parse(v.name) == v and Variant.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    # a pattern with characters a folder name or URL should not hold is hashed in the store name
    store = v.store_name
    assert "\\" not in store and "|" not in store and "(" not in store and "[" not in store
    assert store.startswith("q4_k_m+~") and store.endswith("-bf16w-fp32") and "=q8_0+~" in store
    assert Variant.parse("q4_k_m+blk.0.(a|c)=f16-fp32").store_name != Variant.parse("q4_k_m+blk.0.(a|b)=f16-fp32").store_name
    long = Variant.parse("q4_k_m" + "".join(f"+blk.{i}.ffn_down_exps=q8_0" for i in range(12)) + "-bf16")
    assert len(long.store_name) <= 180 and "=" not in long.store_name
    assert Variant.parse("q4_k_m-bf16").overrides == ()


@pytest.mark.parametrize("text, message", [
    ("q4_k_m+blk.9=q9_9-bf16", "unknown GGML type 'q9_9'.*valid types: f32, f16, bf16"),
    ("q4_k_m+blk.(=q8_0-bf16", "not a valid regular expression"),
    ("orig+attn_v=q8_0-bf16", "apply to a file type or pure_TYPE"),
    ("q4_k_m+=q8_0-bf16", "expected WEIGHTS\\+PATTERN=TYPE-COMPUTE"),
    ("q4_k_m+attn_v=q8_0+-bf16", "ends its overrides with"),
    ("q4_k_m+attn_v-bf16", "expected WEIGHTS\\+PATTERN=TYPE-COMPUTE"),
])
def test_bad_overrides_are_one_line_errors(text, message):
    with pytest.raises(MoetraceError, match=message) as e:
        Variant.parse(text)
    assert "\n" not in str(e.value)


def _dense_specs(n):
    specs = [recipes.TensorSpec("token_embd.weight", (1000, 256)), recipes.TensorSpec("output.weight", (1000, 256))]
    for i in range(n):
        specs += [recipes.TensorSpec(f"blk.{i}.attn_v.weight", (256, 256)),
                  recipes.TensorSpec(f"blk.{i}.attn_norm.weight", (256,)),
                  recipes.TensorSpec(f"blk.{i}.ffn_down.weight", (256, 512))]
    return specs


def test_recipe_override_changes_exactly_the_matching_tensors_and_skips_the_counter():
    shape = recipes.ModelShape(n_layer=8, n_head=4, n_head_kv=4)
    specs = _dense_specs(8)
    plain = recipes.assign_types(specs, "q4_k_m", shape)
    # attn_v: use_more_bits(i, 8) is true for i in 0, 3, 6, 7
    assert [plain[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K",
                                                                   "Q6_K", "Q6_K"]
    over = recipes.assign_types(specs, "q4_k_m", shape, overrides=(("blk.7.ffn_down", "Q8_0"),))
    changed = {n for n in plain if plain[n] != over[n]}
    assert changed == {"blk.7.ffn_down.weight"} and over["blk.7.ffn_down.weight"] == "Q8_0"
    # A dense model's ffn_down rule counts ffn_down tensors, and an overridden one is not counted (as in
    # llama.cpp): overriding layer 5 moves layer 6 from use_more_bits(6) (Q6_K) to use_more_bits(5) (Q4_K).
    over5 = recipes.assign_types(specs, "q4_k_m", shape, overrides=(("blk.5.ffn_down", "Q8_0"),))
    assert {n for n in plain if plain[n] != over5[n]} == {"blk.5.ffn_down.weight", "blk.6.ffn_down.weight"}
    assert (plain["blk.6.ffn_down.weight"], over5["blk.6.ffn_down.weight"]) == ("Q6_K", "Q4_K")
    # norms are never quantized (llama.cpp leaves them alone), so an override that only finds norms takes nothing
    with pytest.raises(MoetraceError, match="attn_norm=q8_0 matches no quantized tensor"):
        recipes.assign_types(specs, "q4_k_m", shape, overrides=(("blk.5.ffn_down", "Q8_0"), ("attn_norm", "Q8_0")))
    with pytest.raises(MoetraceError, match="blk.5.ffn_down=q6_k matches no quantized tensor.*earlier override"):
        recipes.assign_types(specs, "q4_k_m", shape, overrides=(("ffn_down", "Q8_0"), ("blk.5.ffn_down", "Q6_K")))
    # llama.cpp skips llama_tensor_get_type_impl for an overridden tensor, so its attn_v counter does
    # not advance: overriding layer 0's attn_v shifts the use_more_bits layers of the others by one.
    with_v0 = recipes.assign_types(specs, "q4_k_m", shape, overrides=(("blk.0.attn_v", "Q5_0"),))
    assert [with_v0[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q5_0", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K",
                                                                     "Q4_K", "Q6_K"]
    # the first matching override wins; the row-size fallback still applies (rows of 256 take Q8_0, not 512-blocks)
    first = recipes.assign_types(specs, "q4_k_m", shape, overrides=(("blk.1.ffn_down", "Q8_0"), ("ffn_down", "Q5_K")))
    assert [first[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q5_K", "Q8_0", "Q5_K"]
    odd = [recipes.TensorSpec("output.weight", (64, 96)), recipes.TensorSpec("blk.0.attn_v.weight", (96, 96))]
    assert recipes.assign_types(odd, "q4_k_m", recipes.ModelShape(n_layer=1), overrides=(("attn_v", "Q4_K"),)) \
        ["blk.0.attn_v.weight"] == "Q5_0"


def test_recipe_cli_shows_the_override(tmp_path):
    p = moetrace("recipe", "q4_k_m", "--model", TINY, "--tensor-type", "blk.1.ffn_down_exps=q8_0", "--json")
    out = json.loads(p.stdout)
    rows = {t["name"]: t for t in out["tensors"]}
    plain = {t["name"]: t for t in json.loads(moetrace("recipe", "q4_k_m", "--model", TINY, "--json").stdout)["tensors"]}
    assert out["overrides"] == [{"pattern": "blk.1.ffn_down_exps", "type": "Q8_0"}]
    assert {n for n in rows if rows[n]["type"] != plain[n]["type"]} == {"blk.1.ffn_down_exps.weight"}
    r = rows["blk.1.ffn_down_exps.weight"]
    assert (r["type"], r["override"], r["recipe_type"]) == ("Q8_0", "blk.1.ffn_down_exps", plain[r["name"]]["type"])
    text = moetrace("recipe", r"q4_k_m+blk\.(2|3)\.attn_q=q6_k", "--model", TINY).stdout
    assert "override blk\\.(2|3)\\.attn_q=q6_k: 2 tensors, 2 of them changed" in text
    bad = moetrace("recipe", "q4_k_m", "--model", TINY, "--tensor-type", "ffn_dwn_exps=q8_0", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "matches no quantized tensor" in bad.stderr
    bad = moetrace("quantize", "q4_k_m", "-o", str(tmp_path / "x.gguf"), "--tensor-type", "ffn_down_exps", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "expected PATTERN=TYPE" in bad.stderr
    bad = moetrace("quantize", "q4_k_m", "-o", str(tmp_path / "x.gguf"), "--tensor-type", "ffn_down_exps=q7", check=False)
    assert bad.returncode == 2 and "unknown GGML type 'q7'" in bad.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_quantized_gguf_carries_the_overrides_and_a_traced_override_equals_the_file(tmp_path):
    """The GGUF quantize writes with --tensor-type holds the overridden types (read back with gguf's reader), and
    tracing the variant q4_k_m+OVERRIDE gives exactly the stores of tracing that file as gguf-fp32."""
    import gguf

    import moetrace as mt

    path = tmp_path / "over.gguf"
    moetrace("quantize", "q4_k_m", "--model", TINY, "-o", str(path), "--tensor-type", "blk.1.ffn_down_exps=q8_0",
             "--tensor-type", r"blk\.(2|3)\.attn_q=bf16", "-q")
    plain = tmp_path / "plain.gguf"
    moetrace("quantize", "q4_k_m", "--model", TINY, "-o", str(plain), "-q")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    base = {t.name: t.tensor_type.name for t in gguf.GGUFReader(plain).tensors}
    assert types["blk.1.ffn_down_exps.weight"] == "Q8_0" and base["blk.1.ffn_down_exps.weight"] != "Q8_0"
    assert types["blk.2.attn_q.weight"] == types["blk.3.attn_q.weight"] == "BF16"
    assert {n for n in types if types[n] != base[n]} == {"blk.1.ffn_down_exps.weight", "blk.2.attn_q.weight",
                                                         "blk.3.attn_q.weight"}
    variant = r"q4_k_m+blk.1.ffn_down_exps=q8_0+blk\.(2|3)\.attn_q=bf16-fp32"
    moetrace("run", "--model", TINY, "--variant", variant, "--variant", "gguf-fp32", "--gguf", str(path),
             "--max-tokens", "12", "--out", str(tmp_path), "--run", "r", "-q")
    v = Variant.parse(variant)
    a = mt.open_trace(tmp_path / "r" / f"{v.store_name}.zarr")
    b = mt.open_trace(tmp_path / "r" / "gguf-fp32.zarr")
    assert a.attrs["variant"] == v.name
    for name in ("resid", "moe_out", "topk_idx", "logits"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    # and the override made a difference: the plain q4_k_m run differs
    moetrace("run", "--model", TINY, "--variant", "q4_k_m-fp32", "--max-tokens", "12", "--out", str(tmp_path),
             "--run", "r", "-q")
    c = mt.open_trace(tmp_path / "r" / "q4_k_m-fp32.zarr")
    assert not np.array_equal(a["logits"].values, c["logits"].values)
