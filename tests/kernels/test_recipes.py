"""llama.cpp file-type recipes against llama_tensor_get_type (src/llama-quant.cpp).

Every expected type below was read off llama.cpp's source (ggml-org/llama.cpp commit 007dbbf3,
llama_tensor_get_type_impl, tensor_type_fallback, tensor_allows_quantization, and the model
loader's weight_name_comparer for the tensor order), not produced by moetrace's code.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from moetrace.hooks import arch
from moetrace.kernels import FormatError
from moetrace.kernels.recipes import (
    FILE_TYPES, ModelShape, TensorSpec, assign_types, family_specs, parse_file_type, summarize,
)


def qwen3moe_specs(*, n_layer=48, hidden=2048, n_head=32, n_head_kv=4, head_dim=128, n_expert=128, moe_ff=768,
                   vocab=151936, tied=False):
    """The tensors of a qwen3moe GGUF (defaults: Qwen3-30B-A3B), through the family registry."""
    config = SimpleNamespace(
        model_type="qwen3_moe", num_hidden_layers=n_layer, hidden_size=hidden, num_attention_heads=n_head,
        num_key_value_heads=n_head_kv, head_dim=head_dim, num_experts=n_expert, num_experts_per_tok=8,
        moe_intermediate_size=moe_ff, vocab_size=vocab, tie_word_embeddings=tied,
    )
    return family_specs(arch.family_of(config), config)

# use_more_bits(i, 48) = i < 6 || i >= 42 || (i - 6) % 3 == 2, written out.
MORE_BITS_48 = {0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47}
# use_more_bits(i, 32) = i < 4 || i >= 28 || (i - 4) % 3 == 2.
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}

F32_PER_LAYER = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "ffn_gate_inp")


@pytest.fixture(scope="module")
def qwen3():
    """Qwen3-30B-A3B: 48 layers, 128 experts, n_head 32, n_head_kv 4 (n_gqa 8), untied output."""
    return qwen3moe_specs()


def _expect_qwen3(ftype: str) -> dict[str, str]:
    """The table of NUMERICS.md, tensor by tensor, from llama.cpp's rules for n_expert=128, n_gqa=8."""
    L = range(48)
    tab: dict[str, str] = {"output_norm.weight": "F32"}
    for i in L:
        for n in F32_PER_LAYER:
            tab[f"blk.{i}.{n}.weight"] = "F32"
    k = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "q8_0": "Q8_0", "q3_k_m": "Q3_K", "q2_k": "Q2_K"}[ftype]
    tab["token_embd.weight"] = k
    tab["output.weight"] = "Q8_0" if ftype == "q8_0" else "Q6_K"
    for i in L:
        b = f"blk.{i}."
        for n in ("attn_q", "attn_k", "ffn_gate_exps", "ffn_up_exps"):
            tab[b + n + ".weight"] = k
        if ftype in ("q4_k_m", "q5_k_m"):
            v = down = "Q6_K" if i in MORE_BITS_48 else k
            out = k
        elif ftype in ("q6_k", "q8_0"):
            v = down = out = k
        elif ftype == "q3_k_m":
            v = "Q5_K" if i < 2 else "Q4_K"
            down = "Q5_K" if i < 48 // 16 else "Q4_K"
            out = "Q4_K"
        else:  # q2_k: attn_v Q4_K because n_gqa >= 4
            v, down, out = "Q4_K", "Q3_K", "Q3_K"
        tab[b + "attn_v.weight"] = v
        tab[b + "ffn_down_exps.weight"] = down
        tab[b + "attn_output.weight"] = out
    return tab


@pytest.mark.parametrize("ftype", ["q4_k_m", "q5_k_m", "q6_k", "q8_0", "q3_k_m", "q2_k"])
def test_qwen3_30b_a3b_table(qwen3, ftype):
    specs, shape = qwen3
    got = assign_types(specs, ftype, shape)
    want = _expect_qwen3(ftype)
    assert set(got) == set(want)
    wrong = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert not wrong, f"{len(wrong)} tensors differ (got, want), e.g. {dict(list(wrong.items())[:5])}"


@pytest.mark.parametrize("ftype, v_of, down_of, out, k", [
    # Q3_K_S: no rule fires for 128 experts / n_gqa 8.
    ("q3_k_s", lambda i: "Q3_K", lambda i: "Q3_K", "Q3_K", "Q3_K"),
    # Q3_K_L: attn_v, ffn_down and attn_output all Q5_K.
    ("q3_k_l", lambda i: "Q5_K", lambda i: "Q5_K", "Q5_K", "Q3_K"),
    # Q4_K_S: attn_v of the first 4 attn_v tensors, ffn_down of layers < n/8 get Q5_K.
    ("q4_k_s", lambda i: "Q5_K" if i < 4 else "Q4_K", lambda i: "Q5_K" if i < 6 else "Q4_K", "Q4_K", "Q4_K"),
    ("q5_k_s", lambda i: "Q5_K", lambda i: "Q5_K", "Q5_K", "Q5_K"),
    ("q4_0", lambda i: "Q4_0", lambda i: "Q4_0", "Q4_0", "Q4_0"),
    ("q4_1", lambda i: "Q4_1", lambda i: "Q4_1", "Q4_1", "Q4_1"),
    ("q5_0", lambda i: "Q5_0", lambda i: "Q5_0", "Q5_0", "Q5_0"),
    ("q5_1", lambda i: "Q5_1", lambda i: "Q5_1", "Q5_1", "Q5_1"),
])
def test_qwen3_other_mixes(qwen3, ftype, v_of, down_of, out, k):
    specs, shape = qwen3
    got = assign_types(specs, ftype, shape)
    assert got["token_embd.weight"] == k and got["output.weight"] == "Q6_K"
    for i in range(48):
        b = f"blk.{i}."
        assert got[b + "attn_v.weight"] == v_of(i), i
        assert got[b + "ffn_down_exps.weight"] == down_of(i), i
        assert got[b + "attn_output.weight"] == out
        assert got[b + "attn_q.weight"] == got[b + "attn_k.weight"] == got[b + "ffn_up_exps.weight"] == k


def test_legacy_ffn_down_with_imatrix(qwen3):
    # Q4_0 / Q5_0 with an imatrix: ffn_down of layers < n/8 become Q4_1 / Q5_1; without one nothing changes.
    specs, shape = qwen3
    for ftype, bumped in (("q4_0", "Q4_1"), ("q5_0", "Q5_1")):
        got = assign_types(specs, ftype, shape, has_imatrix=True)
        assert [got[f"blk.{i}.ffn_down_exps.weight"] for i in range(8)] == [bumped] * 6 + [ftype.upper()] * 2
    got = assign_types(specs, "q4_1", shape, has_imatrix=True)
    assert got["blk.0.ffn_down_exps.weight"] == "Q4_1"


def _mixtral(tied=False, n_layer=32):
    """Mixtral-8x7B-like: 8 experts, n_head 32, n_head_kv 8 (n_gqa 4), hidden 4096, ff 14336."""
    h, f, e = 4096, 14336, 8
    specs = [TensorSpec("token_embd.weight", (32000, h)), TensorSpec("output_norm.weight", (h,))]
    if not tied:
        specs.append(TensorSpec("output.weight", (32000, h)))
    for i in range(n_layer):
        b = f"blk.{i}."
        specs += [TensorSpec(b + "attn_norm.weight", (h,)), TensorSpec(b + "ffn_norm.weight", (h,)),
                  TensorSpec(b + "attn_q.weight", (h, h)), TensorSpec(b + "attn_k.weight", (1024, h)),
                  TensorSpec(b + "attn_v.weight", (1024, h)), TensorSpec(b + "attn_output.weight", (h, h)),
                  TensorSpec(b + "ffn_gate_inp.weight", (e, h)),
                  TensorSpec(b + "ffn_gate_exps.weight", (e, f, h)), TensorSpec(b + "ffn_up_exps.weight", (e, f, h)),
                  TensorSpec(b + "ffn_down_exps.weight", (e, h, f))]
    return specs, ModelShape(n_layer=n_layer, n_expert=e, n_head=32, n_head_kv=8, arch="llama")


@pytest.mark.parametrize("ftype, k, attn_out, down_of", [
    # n_expert == 8: attn_v and attn_k always Q8_0; attn_output Q5_K for Q2_K, Q3_K_S/M, Q4_K_S/M only.
    ("q2_k", "Q2_K", "Q5_K", lambda i: "Q3_K"),
    ("q3_k_s", "Q3_K", "Q5_K", lambda i: "Q3_K"),
    ("q3_k_m", "Q3_K", "Q5_K", lambda i: "Q5_K" if i < 2 else "Q4_K"),
    ("q3_k_l", "Q3_K", "Q3_K", lambda i: "Q5_K"),
    ("q4_k_s", "Q4_K", "Q5_K", lambda i: "Q5_K" if i < 4 else "Q4_K"),
    ("q4_k_m", "Q4_K", "Q5_K", lambda i: "Q6_K" if i in MORE_BITS_32 else "Q4_K"),
    ("q5_k_m", "Q5_K", "Q5_K", lambda i: "Q6_K" if i in MORE_BITS_32 else "Q5_K"),
    ("q6_k", "Q6_K", "Q6_K", lambda i: "Q6_K"),
    ("q4_0", "Q4_0", "Q4_0", lambda i: "Q4_0"),
])
def test_mixtral_like_eight_experts(ftype, k, attn_out, down_of):
    specs, shape = _mixtral()
    got = assign_types(specs, ftype, shape)
    assert got["output.weight"] == "Q6_K" and got["token_embd.weight"] == k
    for i in range(32):
        b = f"blk.{i}."
        assert got[b + "attn_v.weight"] == "Q8_0"
        assert got[b + "attn_k.weight"] == "Q8_0"
        assert got[b + "attn_q.weight"] == k
        assert got[b + "attn_output.weight"] == attn_out
        assert got[b + "ffn_down_exps.weight"] == down_of(i), i
        assert got[b + "ffn_gate_exps.weight"] == got[b + "ffn_up_exps.weight"] == k
        assert got[b + "ffn_gate_inp.weight"] == "F32"


def test_gqa_below_four_q2_k():
    # n_gqa = 2 < 4: Q2_K gives attn_v Q3_K instead of Q4_K.
    specs, _ = qwen3moe_specs(n_layer=2, n_head=8, n_head_kv=4, n_expert=4, vocab=512)
    shape = ModelShape(n_layer=2, n_expert=4, n_head=8, n_head_kv=4)
    got = assign_types(specs, "q2_k", shape)
    assert got["blk.0.attn_v.weight"] == got["blk.1.attn_v.weight"] == "Q3_K"


@pytest.mark.parametrize("ftype, want", [
    ("q4_k_m", "Q6_K"), ("q2_k", "Q6_K"), ("q8_0", "Q8_0"), ("q4_0", "Q6_K"), ("pure_q4_k", "Q4_K"),
])
def test_tied_embeddings_take_the_output_rule(ftype, want):
    specs, shape = qwen3moe_specs(n_layer=4, vocab=1024, tied=True)
    got = assign_types(specs, ftype, shape)
    assert "output.weight" not in got
    assert got["token_embd.weight"] == want


def test_untied_token_embd_keeps_the_default():
    specs, shape = qwen3moe_specs(n_layer=4, vocab=1024, tied=False)
    got = assign_types(specs, "q4_k_m", shape)
    assert got["token_embd.weight"] == "Q4_K" and got["output.weight"] == "Q6_K"


def test_output_row_not_divisible_goes_q8_0():
    # output rule: nx % block(default type) != 0 -> Q8_0 (hidden 2880 = 90 * 32, not a multiple of 256).
    specs, shape = qwen3moe_specs(n_layer=2, hidden=2880, n_head=8, n_head_kv=2, head_dim=64, n_expert=4,
                                  moe_ff=512, vocab=1024)
    assert assign_types(specs, "q4_k_m", shape)["output.weight"] == "Q8_0"


def _one(name, shape_, ftype, model=None):
    model = model or ModelShape(n_layer=1, n_expert=0, n_head=8, n_head_kv=8)
    return assign_types([TensorSpec(name, shape_), TensorSpec("output.weight", (64, 256))], ftype, model)[name]


@pytest.mark.parametrize("ftype, row, want", [
    # tensor_type_fallback: K types whose 256-block does not divide the row.
    ("q2_k", 2880, "Q4_0"), ("q3_k_s", 2880, "Q4_0"), ("q4_k_s", 2880, "Q5_0"), ("q5_k_s", 2880, "Q5_1"),
    ("q6_k", 2880, "Q8_0"), ("pure_q4_k", 2880, "Q5_0"),
    # ... and F16 when the 32-block fallback does not divide it either.
    ("q2_k", 100, "F16"), ("q4_k_m", 100, "F16"), ("q5_k_m", 100, "F16"), ("q6_k", 100, "F16"),
    # rows that fit are left alone
    ("q4_k_m", 512, "Q4_K"), ("q8_0", 2880, "Q8_0"), ("q4_0", 2880, "Q4_0"),
])
def test_row_size_fallbacks(ftype, row, want):
    assert _one("blk.0.attn_q.weight", (64, row), ftype) == want


@pytest.mark.parametrize("ftype", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "pure_q8_0"])
def test_legacy_types_have_no_fallback(ftype):
    # llama.cpp: "no tensor type fallback is defined for type q4_0" -> quantization stops.
    with pytest.raises(FormatError, match=r"blk\.0\.attn_q\.weight.*100"):
        _one("blk.0.attn_q.weight", (64, 100), ftype)


def test_never_quantized():
    specs = [
        TensorSpec("blk.0.attn_norm.weight", (256,)),
        TensorSpec("blk.0.attn_q_norm.weight", (1, 256)),          # 2-D in numpy, 1-D for ggml
        TensorSpec("blk.0.ffn_gate_inp.weight", (8, 256)),         # the router
        TensorSpec("blk.0.ffn_gate_inp_shexp.weight", (256,)),
        TensorSpec("blk.0.attn_q.bias", (64, 256)),                # does not end in "weight"
        TensorSpec("blk.0.post_attention_norm.weight", (4, 256), "BF16"),  # "_norm.weight", keeps its type
        TensorSpec("blk.0.attn_q.weight", (64, 256), "BF16"),
        TensorSpec("output.weight", (64, 256), "BF16"),
    ]
    got = assign_types(specs, "q4_k_m", ModelShape(n_layer=1, n_expert=8, n_head=8, n_head_kv=8))
    assert got == {
        "output.weight": "Q6_K", "blk.0.attn_norm.weight": "F32", "blk.0.attn_q.bias": "F32",
        "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_q_norm.weight": "F32", "blk.0.ffn_gate_inp.weight": "F32",
        "blk.0.ffn_gate_inp_shexp.weight": "F32", "blk.0.post_attention_norm.weight": "BF16",
    }


def test_attn_v_counts_layers_in_order_whatever_the_input_order(qwen3):
    # The loader sorts by the number after "blk." (blk.10 after blk.9), so shuffling changes nothing.
    specs, shape = qwen3
    shuffled = list(specs)
    random.Random(0).shuffle(shuffled)
    got = assign_types(shuffled, "q4_k_m", shape)
    assert {i for i in range(48) if got[f"blk.{i}.attn_v.weight"] == "Q6_K"} == MORE_BITS_48
    assert list(got)[:3] == ["output.weight", "output_norm.weight", "token_embd.weight"]  # layer -1 first, by name


def test_dense_ffn_down_counts_in_order():
    # A dense model (n_expert 0) takes ffn_down's layer from a counter, in loader order.
    specs = [TensorSpec("output.weight", (256, 256))]
    for i in range(16):
        specs += [TensorSpec(f"blk.{i}.ffn_down.weight", (256, 512)), TensorSpec(f"blk.{i}.attn_v.weight", (64, 256))]
    got = assign_types(specs[::-1], "q4_k_m", ModelShape(n_layer=16, n_expert=0, n_head=8, n_head_kv=2))
    # use_more_bits(i, 16) = i < 2 || i >= 14 || (i - 2) % 3 == 2
    more = {0, 1, 4, 7, 10, 13, 14, 15}
    assert {i for i in range(16) if got[f"blk.{i}.ffn_down.weight"] == "Q6_K"} == more
    assert {i for i in range(16) if got[f"blk.{i}.attn_v.weight"] == "Q6_K"} == more


def test_expert_tensor_needs_its_layer_in_the_name():
    shape = ModelShape(n_layer=2, n_expert=4, n_head=4, n_head_kv=4)
    with pytest.raises(FormatError, match="ffn_down_exps.weight"):
        assign_types([TensorSpec("ffn_down_exps.weight", (4, 256, 256))], "q4_k_m", shape)
    with pytest.raises(FormatError, match=r"blk\.2\.ffn_up_exps\.weight.*layer 2"):
        assign_types([TensorSpec("blk.2.ffn_up_exps.weight", (4, 256, 256))], "q4_k_m", shape)


def test_70b_attn_v_gets_q5_k():
    # LLaMA with 80 layers and GQA is LLM_TYPE_70B: attn_v Q3_K/Q4_K become Q5_K.
    specs = [TensorSpec(f"blk.{i}.attn_v.weight", (1024, 8192)) for i in range(80)]
    shape = ModelShape(n_layer=80, n_expert=0, n_head=64, n_head_kv=8, arch="llama")
    assert set(assign_types(specs, "q3_k_m", shape).values()) == {"Q5_K"}
    got = assign_types(specs, "q4_k_m", shape)
    assert {got[f"blk.{i}.attn_v.weight"] for i in range(80)} == {"Q5_K", "Q6_K"}


def test_falcon_rules():
    specs = [TensorSpec("output.weight", (512, 256))]
    specs += [TensorSpec(f"blk.{i}.ffn_down.weight", (256, 1024)) for i in range(32)]
    got = assign_types(specs, "q4_k_m", ModelShape(n_layer=32, n_expert=0, n_head=8, n_head_kv=1, arch="falcon"))
    assert got["output.weight"] == "Q8_0"
    # i < n/16 -> Q6_K, use_more_bits -> Q5_K, else Q4_K
    assert [got[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2, 3, 5, 6)] == ["Q6_K", "Q6_K", "Q5_K", "Q5_K", "Q4_K",
                                                                              "Q5_K"]


@pytest.mark.parametrize("name", ["pure_q4_k", "pure_q8_0", "PURE_Q6_K", "pure_q4_0", "pure_q2_k"])
def test_pure_types(qwen3, name):
    specs, shape = qwen3
    t = name.upper()[5:]
    got = assign_types(specs, name, shape)
    for spec in specs:
        want = "F32" if spec.n_dims < 2 or "_norm" in spec.name or "ffn_gate_inp" in spec.name else t
        assert got[spec.name] == want, spec.name


def test_parse_file_type():
    assert parse_file_type("Q4_K_M").name == "q4_k_m"
    assert parse_file_type("q4_k_m").default_type == "Q4_K"
    assert parse_file_type("pure_Q4_K").pure and parse_file_type("pure_q4_k").default_type == "Q4_K"
    assert len(FILE_TYPES) == 27 and "q3_k_l" in FILE_TYPES and "pure_q6_k" in FILE_TYPES and "mxfp4_moe" in FILE_TYPES
    with pytest.raises(FormatError, match="q4km.*valid file types: q2_k, q3_k_s"):
        parse_file_type("q4km")
    with pytest.raises(FormatError, match="pure_iq4_xs"):
        parse_file_type("pure_iq4_xs")


def test_errors():
    shape = ModelShape(n_layer=1)
    with pytest.raises(FormatError, match="duplicate.*blk.0.attn_q.weight"):
        assign_types([TensorSpec("blk.0.attn_q.weight", (8, 256))] * 2, "q8_0", shape)
    with pytest.raises(FormatError, match="positive"):
        TensorSpec("x.weight", (0, 256))
    with pytest.raises(FormatError, match="n_layer"):
        ModelShape(n_layer=0)
    assert TensorSpec.from_ne("a.weight", [2048, 768, 128]).shape == (128, 768, 2048)


def test_summary_sizes_and_bits_per_weight(qwen3):
    specs, shape = qwen3
    s = summarize(specs, "q4_k_m", shape)
    # By hand, bytes per 256 weights: Q4_K 144, Q6_K 210; F32 4 bytes each.
    emb = 151936 * 2048
    norms = 2048 + 48 * (2 * 2048 + 2 * 128)
    router = 48 * 128 * 2048
    q = o = 4096 * 2048
    kv = 512 * 2048
    exp = 128 * 768 * 2048
    q4 = emb + 48 * (q + kv + o + 2 * exp) + 24 * (kv + exp)  # 24 of 48 layers keep attn_v/down in Q4_K
    q6 = emb + 24 * (kv + exp)
    want = q4 // 256 * 144 + q6 // 256 * 210 + 4 * (norms + router)
    assert s.total_bytes == want == 18_550_716_416
    assert s.total_elements == 30_532_122_624
    assert s.bits_per_weight == pytest.approx(8 * want / 30_532_122_624)
    assert 4.86 < s.bits_per_weight < 4.87
    row = next(t for t in s.tensors if t.name == "blk.0.attn_q.weight")
    assert (row.type_name, row.n_bytes) == ("Q4_K", 4096 * (2048 // 256) * 144)
    assert s.bytes_by_type()["Q6_K"] == q6 // 256 * 210
    assert "bits per weight" in s.format_table()


# -- MXFP4_MOE (llama_tensor_get_type_impl's LLAMA_FTYPE_MOSTLY_MXFP4_MOE branch, commit 007dbbf3) --------


@pytest.mark.parametrize("tied", [False, True])
def test_mxfp4_moe_experts_mxfp4_everything_else_q8_0(tied):
    """ne[2] > 1 (the expert tensors) -> MXFP4; the output head, a tied token embedding and every other
    quantized tensor -> Q8_0 (no attn_v/ffn_down rules, no use_more_bits); norms and the router stay F32."""
    specs, shape = qwen3moe_specs(n_layer=8, hidden=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=8,
                                  moe_ff=128, vocab=512, tied=tied)
    got = assign_types(specs, "mxfp4_moe", shape)
    for spec in specs:
        n = spec.name
        if len(spec.shape) < 2 or "_norm" in n or "ffn_gate_inp" in n:
            want = "F32"
        elif n.endswith("_exps.weight"):
            want = "MXFP4"
        else:
            want = "Q8_0"
        assert got[n] == want, (n, got[n], want)
    assert ("output.weight" in got) != tied


def test_mxfp4_moe_single_expert_tensor_and_bailingmoe3():
    """A 3-D tensor of one matrix (ne[2] == 1) is not an expert tensor; bailingmoe3 takes only ffn_* ones."""
    shape = ModelShape(n_layer=2, n_expert=4, n_head=4, n_head_kv=4, arch="bailingmoe3")
    specs = [TensorSpec("blk.0.ffn_up_exps.weight", (4, 64, 128)), TensorSpec("blk.0.attn_kv_b.weight", (4, 64, 128)),
             TensorSpec("blk.1.ffn_down_exps.weight", (1, 128, 64)), TensorSpec("output.weight", (512, 128))]
    got = assign_types(specs, "mxfp4_moe", shape)
    assert got == {"output.weight": "Q8_0", "blk.0.attn_kv_b.weight": "Q8_0", "blk.0.ffn_up_exps.weight": "MXFP4",
                   "blk.1.ffn_down_exps.weight": "Q8_0"}
    qwen = ModelShape(n_layer=2, n_expert=4, n_head=4, n_head_kv=4, arch="qwen3moe")
    assert assign_types(specs, "mxfp4_moe", qwen)["blk.0.attn_kv_b.weight"] == "MXFP4"  # ne[2] > 1 is enough


def test_mxfp4_moe_has_no_fallback():
    """MXFP4 and Q8_0 have no tensor_type_fallback: rows that 32 does not divide stop llama-quantize."""
    shape = ModelShape(n_layer=1, n_expert=4)
    with pytest.raises(FormatError, match="no fallback for MXFP4"):
        assign_types([TensorSpec("blk.0.ffn_up_exps.weight", (4, 64, 100))], "mxfp4_moe", shape)


def test_mxfp4_experts_only_keeps_every_other_tensor():
    """``mxfp4`` (GPT-OSS's checkpoint layout, not a llama.cpp file type): the same expert tensors MXFP4, the
    rest in their source type."""
    specs, shape = qwen3moe_specs(n_layer=2, hidden=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=8, moe_ff=128,
                                  vocab=512)
    got = assign_types(specs, "mxfp4", shape)
    for spec in specs:
        assert got[spec.name] == ("MXFP4" if spec.name.endswith("_exps.weight") else spec.dtype), spec.name
    assert {s.dtype for s in specs} == {"F32", "BF16"}
