"""Built-in models: deterministic, the structure the issue asks for, planted faults that land."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrace.errors import MoetraceError
from moetrace.tracer.sources import builtin as builtin
from moetrace.tracer.sources.builtin import PLANT_GAIN, PLANT_STD, Plant, generate_tensors, parse_builtin


def test_default_model_shape_meets_requirements():
    s = parse_builtin("builtin:").shape
    assert parse_builtin("builtin:").preset == "mini"
    assert s.layers >= 16 and s.experts >= 32 and s.top_k >= 4
    assert s.hidden % 256 == 0 and s.expert_width % 256 == 0  # K-quants apply
    assert s.vocab == 256  # byte level


def test_qwen3_30b_preset_has_real_widths():
    m = parse_builtin("builtin:qwen3-30b-a3b:layers=4")
    s = m.shape
    assert (s.hidden, s.heads, s.kv_heads, s.head_dim, s.experts, s.top_k, s.expert_width, s.layers) == (
        2048, 32, 4, 128, 128, 8, 768, 4)
    assert m.model_id == "builtin:qwen3-30b-a3b:layers=4"


def test_generation_is_deterministic_and_seeded():
    shape = builtin.PRESETS["tiny"]
    a = dict(generate_tensors(shape))
    b = dict(generate_tensors(shape))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    other = dict(generate_tensors(parse_builtin("builtin:tiny:seed=1").shape))
    assert not np.array_equal(a["lm_head.weight"], other["lm_head.weight"])


def test_weights_are_heavy_tailed_with_outlier_channels():
    shape = builtin.PRESETS["tiny"]
    t = dict(generate_tensors(shape))
    w = t["model.layers.0.mlp.experts.gate_up_proj"].ravel().astype(np.float64)
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert kurtosis > 4.0, f"excess tails expected (Gaussian kurtosis is 3), got {kurtosis:.2f}"
    emb = t["model.embed_tokens.weight"]
    ch = np.sqrt((emb ** 2).mean(0))  # (hidden,)
    out = builtin.outlier_channels(shape)
    assert ch[out].min() > 5 * np.median(ch)


def test_checkpoint_loads_in_transformers(tiny_source):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_source.folder))
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_router_margins_are_not_a_coin_toss(tiny_run):
    import moetrace

    _, stores = tiny_run
    ref = moetrace.open_trace(stores["orig-fp32"])
    lg = np.sort(ref.router_logits.sel(mode="free").values, -1)[..., ::-1]
    k = ref.sizes["k"]
    margin = lg[..., k - 1] - lg[..., k]  # (layer, token)
    assert np.median(margin) > 0.1
    assert (margin < 0.01).mean() < 0.1


def _expert(t, layer, e, x):
    f = t[f"model.layers.{layer}.mlp.experts.down_proj"].shape[2]
    gu = torch.from_numpy(t[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]).double()
    down = torch.from_numpy(t[f"model.layers.{layer}.mlp.experts.down_proj"][e]).double()
    h = torch.nn.functional.silu(x @ gu[:f].T) * (x @ gu[f:].T)  # (token, F)
    return h @ down.T  # (token, H)


def _cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("gain", [1.0, 4.0])
def test_plant_rescales_one_expert_scaling_its_output_by_the_gain(gain):
    """The planted matrix shrinks to PLANT_STD, its partner grows by the inverse factor times the gain: the
    expert computes its function times the gain (gain 1: the same function)."""
    m = parse_builtin("builtin:tiny", plant=f"2:5:down:{gain}")
    assert m.plant.gain == gain
    t = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in generate_tensors(m.shape, m.plant)}
    clean = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in generate_tensors(m.shape)}
    down, down0 = t["model.layers.2.mlp.experts.down_proj"], clean["model.layers.2.mlp.experts.down_proj"]
    assert down[5].std() == pytest.approx(PLANT_STD, rel=0.01)
    changed = [(e, name) for name in ("down_proj", "gate_up_proj") for e in range(m.shape.experts)
               if not np.array_equal(t[f"model.layers.2.mlp.experts.{name}"][e],
                                     clean[f"model.layers.2.mlp.experts.{name}"][e])]
    assert changed == [(5, "down_proj"), (5, "gate_up_proj")]  # one expert, the matrix and its partner
    x = torch.randn(16, m.shape.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # The same function up to the BF16 rounding of both rescaled matrices (2**-9 relative each), times the gain.
    out, out0 = _expert(t, 2, 5, x), _expert(clean, 2, 5, x)
    assert _cos(out, out0) > 0.9999
    assert float(out.norm() / out0.norm()) == pytest.approx(gain, rel=BF16_RESCALE)
    assert m.content_hash != parse_builtin("builtin:tiny").content_hash


# Two BF16 roundings of the rescaled matrices, each 2**-9 relative at most, over the expert's output norm.
BF16_RESCALE = 2 * 2.0 ** -9


def test_plant_gain_is_in_the_name_and_the_cache_key():
    """The default plant is an ordinary expert (gain 1) with the name and cache key it had before gains; a loud
    one names its gain and has its own key."""
    default, loud = parse_builtin("builtin:tiny", plant="2:5:down"), parse_builtin("builtin:tiny", plant="2:5:down:4")
    assert PLANT_GAIN == 1.0 and default.plant.gain == 1.0 and str(default.plant) == "2:5:down"
    assert str(loud.plant) == "2:5:down:4" and loud.model_id.endswith("+plant=2:5:down:4")
    assert default.content_hash != loud.content_hash
    assert parse_builtin("builtin:tiny", plant="2:5:down:1").content_hash == default.content_hash


@pytest.mark.parametrize("plant,msg", [("99:0:down", "outside"), ("0:99:up", "outside"), ("1:2:mid", "PROJ"),
                                       ("a:b:up", "integers"), ("1:2", "LAYER:EXPERT:PROJ"),
                                       ("1:2:up:0", "GAIN"), ("1:2:up:x", "GAIN"), ("1:2:up:1:2", "PROJ")])
def test_bad_plant_is_rejected(plant, msg):
    with pytest.raises(MoetraceError, match=msg):
        parse_builtin("builtin:tiny", plant=plant)


@pytest.mark.parametrize("spec,msg", [("builtin:nope", "unknown built-in"), ("builtin:tiny:layers=0", "at least 1"),
                                      ("builtin:tiny:width=3", "invalid override")])
def test_bad_builtin_spec(spec, msg):
    with pytest.raises(MoetraceError, match=msg):
        parse_builtin(spec)


def test_plant_parse_roundtrip():
    assert str(Plant.parse("5:3:down")) == "5:3:down"
    assert str(Plant.parse("5:3:down:2.5")) == "5:3:down:2.5" and str(Plant.parse("5:3:down:1")) == "5:3:down"


# Calibration bounds: where a trained byte- or small-vocabulary LM's next-token distribution sits on
# English text. Entropy: a strong byte-level model predicts with about 1 nat (1.2-1.4 bits/byte),
# a bigram model of English bytes with about 2.3 nats; a random head over 256 bytes gives a
# near-Gaussian spread whose argmax any nudge flips.
ENTROPY_RANGE = (1.0, 2.5)  # nats, mean over tokens
PEAKED_SHARE = 0.6  # most tokens with a top-1 probability over calibration.PEAKED (0.5): a trained LM is sure
MARGIN_MIN = np.log(4.0)  # nats: on half the tokens the top token is at least 4x as likely as the runner-up
RMS_GROWTH_MIN = 1.2  # the residual's RMS grows with depth, last layer at least 1.2x the first
MASSIVE_MIN = 4.0  # the outlier channels' RMS at least 4x the median channel's at every layer


def _assert_calibrated(cal):
    from moetrace.tracer.analysis.calibration import format_calibration

    text = format_calibration(cal)
    assert ENTROPY_RANGE[0] <= float(cal["entropy_mean"]) <= ENTROPY_RANGE[1], text
    assert float(cal["top1_peaked"]) >= PEAKED_SHARE, text
    assert float(cal["top1_margin_median"]) >= MARGIN_MIN, text
    rms = cal["resid_rms"].values
    assert (np.diff(rms) > 0).all() and float(cal["resid_rms_growth"]) >= RMS_GROWTH_MIN, text
    assert float(cal["massive_ratio"].min()) >= MASSIVE_MIN, text


def test_tiny_is_calibrated_like_a_trained_lm(tiny_run):
    import moetrace
    from moetrace.tracer.analysis.calibration import calibration

    _, stores = tiny_run
    _assert_calibrated(calibration(moetrace.open_trace(stores["orig-fp32"])))


def test_mini_is_calibrated_like_a_trained_lm(tmp_path):
    """The demo's model on the demo's text, with the planted fault (the reference computes the same function)."""
    import moetrace
    from moetrace.tracer.analysis.calibration import calibration
    from moetrace.tracer.execution.executor import RunConfig, run_trace
    from moetrace.tracer.sources.checkpoint import open_source
    from moetrace.tracer.sources.prompts import DEMO_TEXT, tokenize

    source = open_source("builtin:mini", plant="5:3:down")
    cfg = RunConfig(model="builtin:mini", variants=["orig-bf16"], sites=["resid", "logits"], plant="5:3:down")
    stores = run_trace(source, cfg, tokenize([DEMO_TEXT], source.tokenizer), tmp_path / "mini")
    _assert_calibrated(calibration(moetrace.open_trace(stores["orig-fp32"])))


def test_a_random_head_fails_the_calibration_bounds(tiny_run):
    """The bounds can fail: the same trace with a random Gaussian head (the old built-in head) is flat."""
    import moetrace
    from moetrace.tracer.analysis.calibration import calibration

    _, stores = tiny_run
    ref = moetrace.open_trace(stores["orig-fp32"]).load()
    h, v = ref.sizes["hidden"], ref.sizes["vocab"]
    x = ref.resid.isel(layer=-1).values  # (mode, token, hidden)
    x = x / np.sqrt((x ** 2).mean(-1, keepdims=True))
    head = np.random.default_rng(0).standard_normal((v, h)) * 4.0 / np.sqrt(h)
    ref["logits"] = (ref.logits.dims, (x @ head.T).astype(np.float32))
    cal = calibration(ref)
    assert float(cal["top1_margin_median"]) < MARGIN_MIN or float(cal["top1_peaked"]) < PEAKED_SHARE


def test_run_summary_says_a_builtin_model_is_synthetic(tmp_path):
    from moetrace.tracer import api

    res = api.run("builtin:tiny", ["orig-bf16"], text="Experts route tokens.", sites=["resid", "logits"],
                  out_dir=tmp_path, run_name="t")
    assert "(builtin:tiny is a synthetic model calibrated to" in res.summary_text()
    assert res.summary_text().count("synthetic") == 1
