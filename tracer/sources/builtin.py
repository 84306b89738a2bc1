"""Built-in synthetic MoE models: deterministic from a seed, generated locally, cached on disk.

A built-in model is a real transformers checkpoint folder of its preset's family (config.json
and BF16 safetensors; Qwen3-MoE with transformers 5.x fused expert keys by default, Mixtral and
OLMoE with the per-expert keys their released checkpoints ship) that moetrace writes itself, so
every command reads it through the same path as a user's checkpoint. The weights imitate what matters
for error propagation in real LLMs:

- heavy-tailed entries (Student t, 5 degrees of freedom) rounded to BF16, as checkpoints ship;
- a few outlier hidden channels, large in the embeddings and fed by the experts' down
  projections, as the "massive activations" of real residual streams;
- routers whose logits have a spread of about 2.5, so top-k margins are not all near zero;
- an output head built from the embeddings (as tied heads are) that makes the model a peaked
  "bigram" predictor: next-token entropy and top-1 margins like a trained LM's, not the flat
  distribution of a random head, whose argmax any nudge flips (see :func:`_lm_head`);
- optionally a planted fault in one expert matrix (see :func:`_plant`): its weights shrink to
  magnitudes where GGUF's fp16 block scales lose their precision, while its partner projection
  grows by the inverse factor, so only the quantized model breaks (like the cosine-0.78 matrix of
  the original investigation); the partner also takes the plant's gain (default 1), which makes
  the planted expert a "loud" one whose output in the reference is GAIN times an ordinary expert's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetrace.errors import InternalError, MoetraceError

# The default family of the built-in models. generate_tensors names tensors as transformers 5
# holds this family; checkpoint_tensors renames them for a preset's own family (from the registry).
MODEL_TYPE = "qwen3_moe"


def family(shape: "BuiltinShape | None" = None):
    """The :class:`~moetrace.hooks.arch.Family` of a preset's shape (default: of the built-in models)."""
    from moetrace.hooks import arch

    return arch.by_model_type(shape.family if shape is not None else MODEL_TYPE)

GENERATOR_VERSION = 4  # bump when generation changes, so cached folders are regenerated


@dataclass(frozen=True)
class BuiltinShape:
    """The widths of a built-in model (all MoE layers, byte-level vocabulary)."""

    description: str
    layers: int
    hidden: int
    experts: int
    top_k: int
    expert_width: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 256
    seed: int = 0
    family: str = MODEL_TYPE  # the transformers model type of the family it is written as
    # "fused" (transformers 5's), "per_expert" (as released checkpoints ship) or "packed" (the
    # family's ``packed`` format, GPT-OSS's MXFP4 experts, as its published checkpoints ship)
    expert_keys: str = "fused"
    # config.json entries of the family or the real model beyond the common ones (DeepSeek's MLA
    # ranks, GPT-OSS's sliding window and YaRN), as (key, value) pairs; a dict value as its own pairs
    config: tuple = ()

    def __post_init__(self):
        # hashable however it came (a shape read back from JSON holds lists): pairs of pairs
        object.__setattr__(self, "config", _frozen(self.config))


def _frozen(v):
    """Lists as tuples, all the way down (JSON gives lists where a preset wrote tuples)."""
    return tuple(_frozen(x) for x in v) if isinstance(v, (list, tuple)) else v


def _config_value(v):
    """A ``config`` value as config.json holds it: (key, value) pairs are a dict."""
    if isinstance(v, tuple) and v and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in v):
        return {k: _config_value(x) for k, x in v}
    return v


# GPT-OSS's own config entries (openai/gpt-oss-20b's config.json): YaRN over 4096 positions,
# factor 32, not truncated; rms_norm_eps 1e-5. The window is the preset's own.
_GPT_OSS_YARN = ("rope_parameters", (("rope_type", "yarn"), ("rope_theta", 150000.0), ("factor", 32.0),
                                     ("beta_fast", 32.0), ("beta_slow", 1.0), ("truncate", False),
                                     ("original_max_position_embeddings", 4096)))
_TINY_GPT_OSS = (("sliding_window", 8), ("rms_norm_eps", 1e-05), _GPT_OSS_YARN)
_GPT_OSS_20B = (("sliding_window", 128), ("rms_norm_eps", 1e-05), _GPT_OSS_YARN)


PRESETS: dict[str, BuiltinShape] = {
    "mini": BuiltinShape(
        "default: 16 MoE layers, 32 experts top-4, widths 256 (K-quants apply)",
        layers=16, hidden=256, experts=32, top_k=4, expert_width=256, heads=4, kv_heads=2, head_dim=64,
    ),
    "tiny": BuiltinShape(
        "for tests: 4 MoE layers, 8 experts top-2, widths 256",
        layers=4, hidden=256, experts=8, top_k=2, expert_width=256, heads=4, kv_heads=2, head_dim=64,
    ),
    "qwen3-30b-a3b": BuiltinShape(
        "Qwen3-30B-A3B's real widths (hidden 2048, 32/4 heads of 128, 128 experts top-8, expert width 768); "
        "choose layers with :layers=N (default 2)",
        layers=2, hidden=2048, experts=128, top_k=8, expert_width=768, heads=32, kv_heads=4, head_dim=128,
    ),
    "tiny-mixtral": BuiltinShape(
        "for tests: Mixtral (8 experts top-2, per-expert keys), 4 layers, widths 256, 4/1 heads of 64",
        layers=4, hidden=256, experts=8, top_k=2, expert_width=256, heads=4, kv_heads=1, head_dim=64,
        family="mixtral", expert_keys="per_expert",
    ),
    "tiny-olmoe": BuiltinShape(
        "for tests: OLMoE (16 experts top-4, not renormalized, per-expert keys), 4 layers, widths 256",
        layers=4, hidden=256, experts=16, top_k=4, expert_width=256, heads=4, kv_heads=4, head_dim=64,
        family="olmoe", expert_keys="per_expert",
    ),
    "mixtral-8x7b": BuiltinShape(
        "Mixtral-8x7B's real widths (hidden 4096, 32/8 heads of 128, 8 experts top-2, expert width 14336); "
        "choose layers with :layers=N (default 2; the real model has 32)",
        layers=2, hidden=4096, experts=8, top_k=2, expert_width=14336, heads=32, kv_heads=8, head_dim=128,
        family="mixtral", expert_keys="per_expert",
    ),
    "tiny-gpt-oss": BuiltinShape(
        "for tests: GPT-OSS (sinks, sliding window 8 on alternate layers, router bias, clamped SwiGLU, 16 experts "
        "top-4, MXFP4 experts as published), 4 layers, widths 256, 4/2 heads of 64",
        layers=4, hidden=256, experts=16, top_k=4, expert_width=256, heads=4, kv_heads=2, head_dim=64,
        family="gpt_oss", expert_keys="packed", config=_TINY_GPT_OSS,
    ),
    "gpt-oss-20b": BuiltinShape(
        "gpt-oss-20b's real widths (hidden 2880, 64/8 heads of 64, 32 experts top-4, expert width 2880, sliding "
        "window 128 on alternate layers, MXFP4 experts); choose layers with :layers=N (default 2; the real model "
        "has 24)",
        layers=2, hidden=2880, experts=32, top_k=4, expert_width=2880, heads=64, kv_heads=8, head_dim=64,
        family="gpt_oss", expert_keys="packed", config=_GPT_OSS_20B,
    ),
    "olmoe-1b-7b": BuiltinShape(
        "OLMoE-1B-7B's real widths (hidden 2048, 16/16 heads of 128, 64 experts top-8, expert width 1024); "
        "choose layers with :layers=N (default 2; the real model has 16)",
        layers=2, hidden=2048, experts=64, top_k=8, expert_width=1024, heads=16, kv_heads=16, head_dim=128,
        family="olmoe", expert_keys="per_expert",
    ),
}
# DeepSeek-V3's own config entries at test widths: low-rank query, latent of 256, one dense lead
# layer, 4 groups of which 2 are kept, scaled weights (V3's 2.5). Rows of 256 so K-quants apply.
_TINY_DSV3 = (("q_lora_rank", 256), ("kv_lora_rank", 256), ("qk_nope_head_dim", 128), ("qk_rope_head_dim", 64),
              ("v_head_dim", 128), ("n_shared_experts", 1), ("first_k_dense_replace", 1), ("n_group", 4),
              ("topk_group", 2), ("routed_scaling_factor", 2.5), ("norm_topk_prob", True),
              ("intermediate_size", 512))
# Moonlight-16B-A3B's config.json (moonshotai/Moonlight-16B-A3B, a deepseek_v3 model): hidden 2048, 16
# heads, no low-rank query (q_lora_rank null), kv_lora_rank 512, qk_nope/qk_rope/v head dims 128/64/128,
# 64 routed experts top-6 of width 1408, 2 shared, n_group = topk_group = 1, routed_scaling_factor
# 2.446, norm_topk_prob, first_k_dense_replace 1, dense width 11264, 27 layers, rope_theta 50000,
# rms_norm_eps 1e-5 (its vocabulary of 163840 is byte-level 256 here, as in every preset). config.json itself was
# not at hand; these agree with published training recipes of the model (27 layers, 1 dense + 26 MoE, 64 experts
# top-6 of 1408 + 2 shared, kv_lora 512, dense 11264, 16 heads of 128, scale 2.446, rope 50000, eps 1e-5) and with
# llama.cpp's deepseek2 loader taking a 27-layer file as the full-query ("lite") form.
_MOONLIGHT = (("q_lora_rank", None), ("kv_lora_rank", 512), ("qk_nope_head_dim", 128), ("qk_rope_head_dim", 64),
              ("v_head_dim", 128), ("n_shared_experts", 2), ("first_k_dense_replace", 1), ("n_group", 1),
              ("topk_group", 1), ("routed_scaling_factor", 2.446), ("norm_topk_prob", True),
              ("intermediate_size", 11264), ("rms_norm_eps", 1e-5),
              ("rope_parameters", (("rope_type", "default"), ("rope_theta", 50000.0))))
# GLM-4.5's own config entries at test widths (GLM-4.5: q/k norms, q/k/v biases, one group, scale 2.5).
_TINY_GLM4_MOE = (("n_shared_experts", 1), ("first_k_dense_replace", 1), ("routed_scaling_factor", 2.5),
                  ("norm_topk_prob", True), ("use_qk_norm", True), ("intermediate_size", 512))
PRESETS.update({
    "tiny-deepseek-v3": BuiltinShape(
        "for tests: DeepSeek-V3 (MLA with low-rank query, layer 0 dense, 16 experts top-4 in 4 groups keeping 2, "
        "1 shared, sigmoid router with selection bias), 4 layers, widths 256",
        layers=4, hidden=256, experts=16, top_k=4, expert_width=256, heads=4, kv_heads=4, head_dim=64,
        family="deepseek_v3", expert_keys="per_expert", config=_TINY_DSV3,
    ),
    "tiny-glm4-moe": BuiltinShape(
        "for tests: GLM-4.5 (GQA with q/k norms and q/k/v biases, half-rotary heads, layer 0 dense, 16 experts "
        "top-4, 1 shared, sigmoid router with selection bias, weights scaled by 2.5), 4 layers, widths 256",
        layers=4, hidden=256, experts=16, top_k=4, expert_width=256, heads=4, kv_heads=2, head_dim=64,
        family="glm4_moe", expert_keys="per_expert", config=_TINY_GLM4_MOE,
    ),
    "moonlight-16b-a3b": BuiltinShape(
        "Moonlight-16B-A3B's real widths (deepseek_v3: hidden 2048, MLA 16 heads, kv_lora_rank 512, 64 experts "
        "top-6 of width 1408, 2 shared, layer 0 dense of width 11264); choose layers with :layers=N (default 2; "
        "the real model has 27)",
        layers=2, hidden=2048, experts=64, top_k=6, expert_width=1408, heads=16, kv_heads=16, head_dim=64,
        family="deepseek_v3", expert_keys="per_expert", config=_MOONLIGHT,
    ),
})
DEFAULT_PRESET = "mini"
OVERRIDABLE = ("layers", "seed")

# The planted fault: the planted matrix is rescaled to this standard deviation. Q4_K's
# super-block scale d = max_scale/63 then lands among fp16's subnormals (spacing 2**-24 = 6e-8),
# where rounding moves it by tens of percent per block; Q8_0's d = amax/127 is 4x larger and
# keeps a few bits, Q4_0's d = max/-8 is normal. Measured cosines of the planted matrix on
# builtin:mini: Q4_K 0.42-0.55, Q5_K under 0.1, Q6_K 0 (its d rounds to zero), Q8_0 0.985,
# Q4_0 0.994. With q4_k_m-bf16 the planted layer then has the highest teacher-forced (local)
# error of builtin:mini's 16 layers, mean and p99 over tokens.
PLANT_STD = 4.7e-6
# The plant's gain (``--plant L:E:P:GAIN``) also makes the planted expert a "loud" one: its partner
# projection grows by GAIN more (see _plant), so the reference routes an output GAIN times an ordinary
# expert's through it, as real MoE models have a few "super experts". The default, 1, is an ordinary
# expert, which on builtin:mini often matters less at the output than an early layer's ordinary Q4_K
# error that the later layers amplify (docs/benchmarks.md, "Planted faults"). A loud plant needs a
# large gain to stand first at every depth (about 16-32 in the last layers), and the partner then holds
# values far past fp16's range (max 65504; about 12000 * GAIN on builtin:mini), so fp16 weights
# overflow: use gains above about 4 with bf16 or fp32 compute only.
PLANT_GAIN = 1.0

# The output calibration (see _lm_head): each input byte has SUCCESSORS likely next bytes whose
# logits fall off by a per-byte decay drawn from SUCCESSOR_DECAY, the first several nats above
# the bulk, the head scaled by HEAD_SCALE (see _head_scale), which sets the next-token
# entropy on text: 2.4 gives about 1.5 nats mean on builtin:mini and tiny, inside the 1-2.5 of
# trained byte-level and small-vocabulary LMs.
SUCCESSORS = 4
SUCCESSOR_DECAY = (0.3, 0.95)
HEAD_SCALE = 2.4
HEAD_DEPTH_EXP = 0.7
OUTLIER_NORM = 0.05  # the final norm's weight on the outlier channels

@dataclass(frozen=True)
class Plant:
    """A planted fault in expert ``expert`` of layer ``layer``, projection ``proj`` (gate, up or down),
    whose output is ``gain`` times an ordinary expert's (see PLANT_GAIN; 1: an ordinary expert)."""

    layer: int
    expert: int
    proj: str
    gain: float = PLANT_GAIN

    @classmethod
    def parse(cls, text: str) -> "Plant":
        parts = text.split(":")
        projs = family().expert_projs
        if len(parts) not in (3, 4) or parts[2] not in projs:
            raise MoetraceError(
                f"invalid --plant {text!r}; expected LAYER:EXPERT:PROJ[:GAIN] with PROJ one of {', '.join(projs)}"
            )
        try:
            layer, expert = int(parts[0]), int(parts[1])
        except ValueError:
            raise MoetraceError(f"invalid --plant {text!r}; LAYER and EXPERT must be integers") from None
        try:
            gain = float(parts[3]) if len(parts) == 4 else PLANT_GAIN
        except ValueError:
            gain = float("nan")
        if not (np.isfinite(gain) and gain > 0):
            raise MoetraceError(f"invalid --plant {text!r}; GAIN must be a positive number (default {PLANT_GAIN:g})")
        return cls(layer, expert, parts[2], gain)

    def __str__(self) -> str:
        gain = f":{self.gain:g}" if self.gain != PLANT_GAIN else ""
        return f"{self.layer}:{self.expert}:{self.proj}{gain}"


@dataclass(frozen=True)
class BuiltinModel:
    """A resolved built-in model: preset name, its shape (with overrides) and an optional plant."""

    preset: str
    shape: BuiltinShape
    plant: Plant | None = None

    @property
    def model_id(self) -> str:
        base = PRESETS[self.preset]
        over = [f"{k}={getattr(self.shape, k)}" for k in OVERRIDABLE if getattr(self.shape, k) != getattr(base, k)]
        text = f"builtin:{self.preset}" + (":" + ",".join(over) if over else "")
        return text + (f"+plant={self.plant}" if self.plant else "")

    @property
    def content_hash(self) -> str:
        blob = json.dumps(
            {"v": GENERATOR_VERSION, "shape": _hashed_shape(self.shape), "plant": str(self.plant or ""),
             "plant_std": PLANT_STD if self.plant else None,
             # an ordinary plant (gain 1) keeps the key it had before gains existed
             **({"plant_gain": self.plant.gain} if self.plant and self.plant.gain != 1.0 else {})},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _hashed_shape(shape: BuiltinShape) -> dict:
    """The shape's fields for the content hash; an empty ``config`` is left out, so presets without
    one keep the hash (and cached folders) they had before the field existed."""
    d = dataclasses.asdict(shape)
    if not d["config"]:
        del d["config"]
    return d


def parse_builtin(spec: str, plant: str | Plant | None = None) -> BuiltinModel:
    """Resolve ``builtin:NAME[:key=value,...]`` (``builtin:`` alone is the default model).

    Raises:
        MoetraceError: an unknown preset or override, or a plant outside the model.
    """
    body = spec[len("builtin:"):] if spec.startswith("builtin:") else spec
    name, _, over = body.partition(":")
    name = name or DEFAULT_PRESET
    if name not in PRESETS:
        raise MoetraceError(f"unknown built-in model {spec!r}; valid: {', '.join('builtin:' + n for n in PRESETS)}")
    shape = PRESETS[name]
    if over:
        changes = {}
        for item in over.split(","):
            key, eq, value = item.partition("=")
            if key not in OVERRIDABLE or not eq:
                raise MoetraceError(
                    f"invalid override {item!r} in {spec!r}; valid: {', '.join(k + '=N' for k in OVERRIDABLE)}"
                )
            try:
                changes[key] = int(value)
            except ValueError:
                raise MoetraceError(f"invalid override {item!r} in {spec!r}; {key} must be an integer") from None
        if changes.get("layers", 1) < 1:
            raise MoetraceError(f"invalid override in {spec!r}: layers must be at least 1")
        shape = dataclasses.replace(shape, **changes)
    if isinstance(plant, str):
        plant = Plant.parse(plant)
    if plant is not None:
        if not (0 <= plant.layer < shape.layers and 0 <= plant.expert < shape.experts):
            raise MoetraceError(
                f"--plant {plant} is outside builtin:{name}: layers 0..{shape.layers - 1}, "
                f"experts 0..{shape.experts - 1}"
            )
    return BuiltinModel(name, shape, plant)


def cache_root() -> Path:
    """Where generated models live: $MOETRACE_CACHE, else ~/.cache/moetrace (see moetrace.settings)."""
    from moetrace.settings import cache_root as root

    return root()


def materialize(model: BuiltinModel, progress=None) -> Path:
    """Write the model's checkpoint folder once and return it (a cache hit returns at once).

    A planted model's folder is an overlay of its unplanted base model (materialized first, or
    found in the cache): only the planted expert's tensors (see :func:`_write_overlay`).
    """
    folder = cache_root() / "builtin" / f"{model.preset}-{model.content_hash}"
    if _complete(folder):
        return folder
    import shutil

    from moetrace.outputs import writable_folder

    base = materialize(dataclasses.replace(model, plant=None), progress) if model.plant else None
    writable_folder(folder.parent, "the model cache (MOETRACE_CACHE)")
    _remove_stale_tmp(folder.parent)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        if base is None:
            _write_checkpoint(model, tmp, progress)
        else:
            _write_overlay(model, base, tmp, progress)
        if folder.exists() and not _complete(folder):  # an overlay whose base was deleted from the cache
            shutil.rmtree(folder)
        tmp.rename(folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(folder):  # else another process finished first, identically
            raise MoetraceError(f"cannot write built-in model {model.preset} to {str(folder)!r}: {e.strerror or e}") from None
    except BaseException:  # interrupted: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _complete(folder: Path) -> bool:
    """Whether a cached model folder is whole (``exists`` follows an overlay's link to its base's file)."""
    return (folder / "model.safetensors").exists() and (folder / "moetrace-builtin.json").exists()


def _remove_stale_tmp(parent: Path) -> None:
    """Delete generation folders (``NAME.tmpPID``) whose process is gone: a kill -9 can leave them."""
    import re
    import shutil

    for p in parent.glob("*.tmp*"):
        m = re.search(r"\.tmp(\d+)$", p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def hf_config_dict(shape: BuiltinShape) -> dict:
    """The config.json of a built-in model (its family's transformers config fields).

    The family's fixed behaviour (``gguf_config``: renormalization, activation, every layer MoE)
    is written as its released checkpoints set it.
    """
    f = family(shape)
    k = f.keys
    cfg = {
        "architectures": [f.hf_architecture],
        "model_type": f.model_types[0],
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.expert_width * 3,
        f.keys.expert_width: shape.expert_width,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        k.experts: shape.experts,
        k.top_k: shape.top_k,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": "bfloat16",
        # rope_parameters there are details joined to a GGUF file's RoPE, not a whole config entry
        **{k: v for k, v in f.gguf_config.items() if k != "rope_parameters"},
        **{k: _config_value(v) for k, v in shape.config},  # the family's and the real model's own
    }
    if shape.expert_keys == "packed":
        formats = sorted(set(f.packed.values()))
        if len(formats) != 1:
            raise MoetraceError(f"built-in preset with family {f.name}: expert_keys 'packed' needs the family to pack "
                                f"its experts in one format; it has {formats or 'none'}")
        # As a published checkpoint says it: which format, and that only the packed keys are in it
        # (attention and router by the family's own module paths).
        layers = f.layer_prefix("*")
        cfg["quantization_config"] = {"quant_method": formats[0],
                                      "modules_to_not_convert": [layers + f.sites.attention, layers + f.sites.router,
                                                                 "model.embed_tokens", "lm_head"]}
    return cfg


def _rng(shape: BuiltinShape, name: str) -> np.random.Generator:
    # One independent stream per tensor name, so any tensor can be generated on its own.
    digest = hashlib.sha256(f"{shape.seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


T_CHUNK = 1 << 18  # values drawn per call in _t: a 2 MB float64 temporary, not one the size of the tensor


def _t(rng: np.random.Generator, size, scale: float) -> np.ndarray:
    """Student t with 5 degrees of freedom (variance 5/3), normalized to std ``scale``, as float32.

    Drawn in chunks of T_CHUNK and scaled in float64 before the cast, so every value is the one a
    single ``(rng.standard_t(5, size) * c).astype(np.float32)`` gives (the generator's stream does
    not depend on how the draws are split), without that call's two float64 temporaries of 8 bytes
    per value.
    """
    c = scale / np.sqrt(5.0 / 3.0)
    out = np.empty(size, dtype=np.float32)
    flat = out.reshape(-1)  # a view: out is contiguous
    for i in range(0, flat.size, T_CHUNK):
        x = rng.standard_t(5, size=min(T_CHUNK, flat.size - i))  # (chunk,) float64
        x *= c
        flat[i:i + x.size] = x  # rounds to float32 as astype does
    return out


def outlier_channels(shape: BuiltinShape) -> np.ndarray:
    """The hidden channels that carry massive activations (about 1 in 128)."""
    n = max(2, shape.hidden // 128)
    return np.sort(_rng(shape, "outlier_channels").choice(shape.hidden, n, replace=False))


def generate_tensors(shape: BuiltinShape, plant: Plant | None = None):
    """Yield (hf_name, float32 array) for every tensor of the model, one at a time."""
    for name, _, make in tensor_plan(shape, plant):
        yield name, make()


def tensor_plan(shape: BuiltinShape, plant: Plant | None = None):
    """Yield (hf_name, dims, make) for every tensor in order; ``make()`` generates its float32 array.

    Names and dims come without generating anything, so a writer can put the safetensors header
    first and then stream the tensors. A layer's two expert tensors are generated together (the
    plant couples them) and held until the next layer's are asked for, so at most one layer's
    expert weights live at a time.
    """
    h = shape.hidden
    out_ch = outlier_channels(shape)
    yield "model.embed_tokens.weight", (shape.vocab, h), lambda: _embed(shape, out_ch)
    held = _OneSlot()
    for i in range(shape.layers):
        yield from _layer_plan(shape, i, out_ch, plant, held)
    yield "model.norm.weight", (h,), lambda: _final_norm(shape, out_ch)
    yield "lm_head.weight", (shape.vocab, h), lambda: _lm_head(shape, _embed(shape, out_ch), out_ch)


def _embed(shape: BuiltinShape, out_ch: np.ndarray) -> np.ndarray:
    emb = _t(_rng(shape, "embed"), (shape.vocab, shape.hidden), 1.0)  # (vocab, hidden)
    emb[:, out_ch] *= 12.0
    return emb


def _final_norm(shape: BuiltinShape, out_ch: np.ndarray) -> np.ndarray:
    norm = (1.0 + 0.1 * _rng(shape, "norm").standard_normal(shape.hidden)).astype(np.float32)
    norm[out_ch] = OUTLIER_NORM  # trained final norms mute the massive channels, which carry no token identity
    return norm


def _layer_plan(shape: BuiltinShape, i: int, out_ch: np.ndarray, plant: Plant | None, held: "_OneSlot"):
    """(hf_name, dims, make) of decoder layer ``i``'s tensors (see :func:`tensor_plan`)."""
    h, e, f, hd = shape.hidden, shape.experts, shape.expert_width, shape.head_dim
    q, kv = shape.heads * hd, shape.kv_heads * hd
    depth = 1.0  # residual branches at full scale: the stream grows with depth, as in real LLMs
    p = f"model.layers.{i}."

    def norm(tag: str, n: int):
        return lambda: (1.0 + 0.1 * _rng(shape, p + tag).standard_normal(n)).astype(np.float32)

    def t(tag: str, dims: tuple, scale: float):
        return lambda: _t(_rng(shape, p + tag), dims, scale)

    def experts(k: int):
        return lambda: held.get(i, lambda: _experts(shape, i, out_ch, plant))[k]

    yield p + "input_layernorm.weight", (h,), norm("ln1", h)
    yield p + "post_attention_layernorm.weight", (h,), norm("ln2", h)
    yield p + "self_attn.q_proj.weight", (q, h), t("q", (q, h), 1.0 / np.sqrt(h))
    yield p + "self_attn.k_proj.weight", (kv, h), t("k", (kv, h), 1.0 / np.sqrt(h))
    yield p + "self_attn.v_proj.weight", (kv, h), t("v", (kv, h), 1.0 / np.sqrt(h))
    yield p + "self_attn.o_proj.weight", (h, q), t("o", (h, q), depth / np.sqrt(q))
    yield p + "self_attn.q_norm.weight", (hd,), norm("qn", hd)
    yield p + "self_attn.k_norm.weight", (hd,), norm("kn", hd)
    # Router: logit spread about 2.5 on RMS-normalized inputs, plus a per-expert preference.
    yield p + "mlp.gate.weight", (e, h), t("router", (e, h), 2.5 / np.sqrt(h))
    yield p + "mlp.experts.gate_up_proj", (e, 2 * f, h), experts(0)
    yield p + "mlp.experts.down_proj", (e, h, f), experts(1)


def _experts(shape: BuiltinShape, i: int, out_ch: np.ndarray, plant: Plant | None):
    """Layer ``i``'s (gate_up (E, 2F, H), down (E, H, F)), the two drawn in parallel threads.

    They are independent streams, and numpy draws without the GIL: on two cores this takes
    about 2/3 of the time of one after the other.
    """
    from concurrent.futures import ThreadPoolExecutor

    h, e, f = shape.hidden, shape.experts, shape.expert_width
    depth = 1.0
    p = f"model.layers.{i}."
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(_t, _rng(shape, p + "down"), (e, h, f), depth / np.sqrt(f))  # (E, H, F)
        gate_up = _t(_rng(shape, p + "gate_up"), (e, 2 * f, h), 1.0 / np.sqrt(h))  # (E, 2F, H)
        down = later.result()
    down[:, out_ch, :] *= 4.0  # experts feed the outlier channels
    if plant is not None and plant.layer == i:
        _plant(shape, plant, gate_up, down)
    return gate_up, down


class _OneSlot:
    """Holds one key's value at a time: asking for another key drops the held value before making the new one."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, make):
        if self.key != key:
            self.key, self.value = None, None
            self.value = make()
            self.key = key
        return self.value


def _lm_head(shape: BuiltinShape, emb: np.ndarray, out_ch: np.ndarray) -> np.ndarray:
    """An output head that makes the model a peaked "bigram" predictor, as trained LMs are peaked.

    A random head over 256 bytes gives Gaussian logits: the top two tokens sit a fraction of a
    nat apart and any nudge flips the argmax, which no trained model does. The residual stream
    keeps the current token's embedding (cosine about 0.9 after the first layer, 0.3 after 16),
    so a head built from the embeddings, as tied heads are, reads it: output token v holds
    ``c * sum_k a_k(x) * unit(emb[x])`` for the input tokens x = perm_k(v) it succeeds. Each input
    token thus gets SUCCESSORS likely next tokens with strengths ``decay(x) ** k``, decay drawn per
    token (near 0: one sure successor; near 1: several), and the other tokens a Gaussian bulk.

    Returns:
        (vocab, hidden) float32.
    """
    rng = _rng(shape, "lm_head")
    e = emb.astype(np.float64)
    e[:, out_ch] = 0.0  # the final norm mutes these channels
    e /= np.linalg.norm(e, axis=1, keepdims=True)  # (vocab, hidden) unit rows
    decay = rng.uniform(*SUCCESSOR_DECAY, size=shape.vocab)  # (vocab,) per input token
    head = np.zeros_like(e)
    for k in range(SUCCESSORS):
        perm = rng.permutation(shape.vocab)  # output v is input perm[v]'s k-th successor
        head += (decay[perm] ** k)[:, None] * e[perm]
    return (_head_scale(shape) * head).astype(np.float32)


def _head_scale(shape: BuiltinShape) -> float:
    """The head's scale c: HEAD_SCALE * (layers / 16) ** HEAD_DEPTH_EXP * sqrt(256 / hidden).

    The successor logit is ``c * |norm(h)| * rho``, with ``|norm(h)|`` about sqrt(hidden) (hence the
    width factor) and rho the cosine of the last residual with the input embedding, which falls with
    depth as layers add their outputs (0.9 after one layer, 0.3 after 16 on builtin:mini); the rest
    of the residual makes the bulk. The depth exponent is fit so builtin:tiny (4 layers) and
    builtin:mini (16) land at a similar entropy.
    """
    return HEAD_SCALE * (shape.layers / 16) ** HEAD_DEPTH_EXP * np.sqrt(256 / shape.hidden)


def _plant(shape: BuiltinShape, plant: Plant, gate_up: np.ndarray, down: np.ndarray) -> None:
    """Shrink the planted matrix to PLANT_STD and grow its partner by the same factor times the
    plant's gain, in place.

    Why not "a few extreme values": whatever outliers do to the rest of their blocks, they hold
    most of the matrix's energy and any faithful quantizer reproduces them, so the matrix's
    cosine stays above 0.99. A matrix whose every block scale is lost in fp16's rounding is what
    a weight audit sees at cosine 0.78, and it is a real hazard: a rescaling that leaves the
    model's function unchanged (as merges and equalization do) can push weights there.

    down is paired with up (``down(silu(gate) * up)`` is unchanged when up grows by s and down
    shrinks by s); up with down likewise; gate with up, which keeps the expert's output
    magnitude where silu is near-linear but not its exact function. The expert's output is linear in
    the partner (up or down), so the gain scales that output and nothing else: the reference routes
    the same tokens to a louder expert.
    """
    f, e = shape.expert_width, plant.expert
    views = {"gate": gate_up[e, :f], "up": gate_up[e, f:], "down": down[e]}
    partner = {"gate": "up", "up": "down", "down": "up"}[plant.proj]
    mat = views[plant.proj]
    factor = np.float32(PLANT_STD / mat.std())
    mat *= factor  # writes through the views
    views[partner] /= factor
    if plant.gain != 1.0:  # gain 1 keeps the very values of the ordinary plant
        views[partner] *= np.float32(plant.gain)


def checkpoint_tensors(shape: BuiltinShape, plant: Plant | None = None):
    """Yield (name, float32 array) of every tensor as a checkpoint of the shape's family names it."""
    for name, _, make in checkpoint_plan(shape, plant):
        yield name, make()


def checkpoint_plan(shape: BuiltinShape, plant: Plant | None = None):
    """Yield (name, dims, make) of every tensor as a checkpoint of the shape's family names it.

    :func:`tensor_plan` names tensors as transformers 5 holds Qwen3-MoE; here each becomes
    the family's: a tensor the layer has not (Mixtral's q/k norms, the experts of a dense layer)
    is left out, a 1-D norm weight of another width (OLMoE's whole-projection q/k norms) is
    resized to it (``np.resize`` repeats the values, same distribution), a tensor Qwen3-MoE lacks
    or holds at another shape (DeepSeek's latent attention, shared experts, router bias, dense
    MLP; GPT-OSS's biases and sinks) is generated from its shape and role (see :func:`_family_tensor`),
    a tensor the family names or lays out otherwise (GPT-OSS's router, its transposed and interleaved
    experts) is renamed and relaid (see :func:`_as_family`); with ``expert_keys="per_expert"`` the
    fused expert tensors are split into the family's per-expert keys (``fusion.key``) and the other
    keys take their checkpoint names (``fusion.renames`` reversed); with ``expert_keys="packed"`` the
    family's ``packed`` keys are written in its format (GPT-OSS's MXFP4 blocks and scales).
    """
    from types import SimpleNamespace

    fam = family(shape)
    fusion = fam.fusion
    per_expert = shape.expert_keys == "per_expert"
    if per_expert and fusion is None:
        raise MoetraceError(f"built-in preset with family {fam.name}: the family has no per-expert keys")
    config = SimpleNamespace(**hf_config_dict(shape))
    held: list = []  # one layer's planned tensors, until the layer is complete
    for name, dims, make in tensor_plan(shape, plant):
        if name.startswith("model.layers."):
            if held and int(held[0][0].split(".")[2]) != int(name.split(".")[2]):
                yield from _family_layer(shape, fam, config, held, per_expert)
                held = []
            held.append((name, dims, make))
            continue
        if held:
            yield from _family_layer(shape, fam, config, held, per_expert)
            held = []
        yield name, dims, make


def _family_layer(shape: BuiltinShape, fam, config, planned: list, per_expert: bool):
    """(name, dims, make) of one layer as the family's checkpoint holds it, from the Qwen3-MoE plan ``planned``."""
    layer = int(planned[0][0].split(".")[2])
    prefix = fam.layer_prefix(layer)
    fusion = fam.fusion
    want = fam.hf_layer_shapes(config, layer)  # transformers 5 key inside the layer -> shape
    have = {}
    for inner, dims, make in _as_family(fam, [(name[len(prefix):], dims, make) for name, dims, make in planned],
                                        want):
        if dims != want[inner]:
            if len(dims) != 1 or len(want[inner]) != 1:
                continue  # another shape: the family's own tensor is generated below
            dims, make = want[inner], _resized(make, want[inner])
        have[inner] = (dims, make)
    for inner, dims in want.items():
        if inner not in have:
            have[inner] = (dims, _family_tensor(shape, fam, prefix + inner, dims))
    for inner, (dims, make) in have.items():
        if per_expert and inner in fusion.fused:
            projs = fusion.fused[inner]
            rows = dims[1] // len(projs)
            for e in range(dims[0]):
                for i, proj in enumerate(projs):
                    yield prefix + fusion.per_expert_key(e, proj), (rows, dims[2]), _rows(make, e, i * rows, rows)
            continue
        if shape.expert_keys == "packed" and inner in fam.packed:
            yield from _packed_plan(prefix, inner, dims, make, fam)
            continue
        yield prefix + (fusion.checkpoint_key(inner) if per_expert else inner), dims, make


def _as_family(fam, planned: list, want: dict):
    """(key, dims, make) of the Qwen3-MoE plan's layer tensors ``planned`` (keys inside the layer) under the
    family's keys and in its layout: a key the family holds under another name with the same GGUF tensor
    (GPT-OSS's router ``mlp.router``, Qwen3-MoE's ``mlp.gate``) takes that name, a key the family holds
    transposed or interleaved (GPT-OSS's experts) is laid out so; a tensor the family has not is left out."""
    base = family()

    def kind(f, key):  # the GGUF tensor a key is (stem, .weight or .bias); None: a fused or unknown key
        stem = f.layer_stems.get(key)
        return (stem, f.gguf_suffix(key)) if isinstance(stem, str) else None

    by_kind = {kind(fam, key): key for key in want if kind(fam, key) is not None}
    planned_keys = {inner for inner, _, _ in planned}
    for inner, dims, make in planned:
        if inner not in want:
            inner = by_kind.get(kind(base, inner))
            if inner is None or inner in planned_keys:
                continue
        if inner in fam.transposed or inner in fam.interleaved:  # from Qwen3-MoE's layout to the family's
            dims = (*dims[:-2], dims[-1], dims[-2]) if inner in fam.transposed else dims
            make = _relaid(make, base, fam, inner)
        yield inner, dims, make


ROUTER_BIAS_STD = 0.1  # a selection bias that changes some choices among sigmoid scores of spread ~0.3
# Biases and other vectors the Qwen3-MoE plan lacks, by GGUF stem: their standard deviation
# (default ROUTER_BIAS_STD). GPT-OSS's attention sinks are logits of the order of the scores; its
# router's bias a per-expert preference of a fifth of the router's logit spread; its expert biases small.
VECTOR_STD = {"attn_sinks": 1.0, "ffn_gate_inp": 0.5, "ffn_gate_exps": 0.02, "ffn_up_exps": 0.02,
              "ffn_down_exps": 0.02}


def _family_tensor(shape: BuiltinShape, fam, name: str, dims: tuple):
    """``make`` of a tensor the Qwen3-MoE plan lacks, from its shape and its role (by its GGUF name):
    a norm 1 + 0.1 N(0, 1); a bias or another vector (a router's selection bias, attention sinks)
    N(0, std) with std from VECTOR_STD; a matrix Student t scaled by 1/sqrt(row length), as the
    plan's own projections."""
    from moetrace.kernels.compute import role_of

    inner = name.split(".", 3)[3]
    stems = fam.layer_stems_unfused
    part = fam.fused[inner][0] if inner in fam.fused else inner
    stem = stems.get(part, "")
    rng = lambda: _rng(shape, name)  # noqa: E731
    if len(dims) == 1 and role_of(stem + ".weight") == "norm":
        return lambda: (1.0 + 0.1 * rng().standard_normal(dims)).astype(np.float32)
    if len(dims) == 1 or (part in stems and fam.gguf_suffix(part) == ".bias"):
        std = VECTOR_STD.get(stem, ROUTER_BIAS_STD)
        return lambda: (std * rng().standard_normal(dims)).astype(np.float32)
    return lambda: _t(rng(), dims, 1.0 / np.sqrt(dims[-1]))


def _relaid(make, base, fam, key: str):
    """``make``'s tensor, held as ``base`` holds ``key``, as ``fam`` holds it (transposed, interleaved)."""
    import torch

    def relaid():
        parts = base.to_gguf(key, torch.from_numpy(make()))
        return fam.from_gguf(key, parts).contiguous().numpy()

    return relaid


def _packed_plan(prefix: str, key: str, dims: tuple, make, fam):
    """The checkpoint tensors of ``key`` packed in the family's format (GPT-OSS: MXFP4 blocks and scales)."""
    from moetrace.tracer.sources.packed import pack, packed_names

    fmt = fam.packed[key]
    out_in = (*dims[:-2], dims[-1], dims[-2]) if key in fam.transposed else dims  # [out, in]
    names = packed_names(key, fmt)
    held = _OneSlot()

    def part(i):
        def make_part():
            def build():
                import torch

                w = torch.from_numpy(make())
                w = w.transpose(-1, -2) if key in fam.transposed else w
                return pack(fmt, w)
            return held.get(key, build)[i]
        return make_part

    shapes = [(*out_in[:-1], out_in[-1] // 32, 16), (*out_in[:-1], out_in[-1] // 32)]
    for i, (n, shp) in enumerate(zip(names, shapes)):
        yield prefix + n, shp, part(i)


def _rows(make, e: int, start: int, n: int):
    return lambda: make()[e, start:start + n]  # (n, cols) of expert e


def _resized(make, want: tuple):
    return lambda: np.resize(make(), want)


WRITE_CHUNK = 1 << 22  # values converted to BF16 at a time when writing


def _write_checkpoint(model: BuiltinModel, folder: Path, progress=None) -> None:
    write_safetensors(folder / "model.safetensors", checkpoint_plan(model.shape, model.plant), progress)
    _write_descriptors(model, folder)


OVERLAY_FILE = "plant.safetensors"


def _write_overlay(model: BuiltinModel, base: Path, folder: Path, progress=None) -> None:
    """A planted model as its base's checkpoint plus the planted expert's tensors, not a second copy.

    ``plant.safetensors`` holds the tensors the plant changes, generated as a full planted model
    generates them: the planted expert's matrices (per-expert keys), or the planted layer's fused
    expert tensors. ``model.safetensors`` is a relative link to the base model's file and
    ``model.safetensors.index.json`` maps the overlay's names to ``plant.safetensors`` and the rest
    to it, so CheckpointSource reads the folder as any sharded checkpoint.
    """
    plan = list(checkpoint_plan(model.shape, model.plant))
    changed = [entry for entry in plan if _planted(model, entry[0])]
    write_safetensors(folder / OVERLAY_FILE, changed, progress)
    (folder / "model.safetensors").symlink_to(os.path.relpath(base / "model.safetensors", folder))
    names = {name for name, _, _ in changed}
    weight_map = {name: OVERLAY_FILE if name in names else "model.safetensors" for name, _, _ in plan}
    index = {"metadata": {"base_model": base.name}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    _write_descriptors(model, folder)


def _planted(model: BuiltinModel, name: str) -> bool:
    """Whether checkpoint tensor ``name`` is one the plant changes (see :func:`_plant`)."""
    fam = family(model.shape)
    prefix = fam.layer_prefix(model.plant.layer)
    if not name.startswith(prefix):
        return False
    inner = name[len(prefix):]
    fusion = fam.fusion
    m = fusion.match(inner) if fusion is not None else None
    if m:
        return m[1] == model.plant.expert
    if fusion is None:  # no per-expert keys: the planted layer's expert tensors (packed ones by their parts)
        from moetrace.tracer.sources.validate import PACKED_SUFFIXES

        for suffix in PACKED_SUFFIXES:
            inner = inner[:-len(suffix)] if inner.endswith(suffix) and inner[:-len(suffix)] in fam.packed else inner
        stems = fam.layer_stems.get(inner, ())
        return any(st.endswith("_exps") for st in ((stems,) if isinstance(stems, str) else stems))
    return fusion.rename(inner) in fusion.fused


def _write_descriptors(model: BuiltinModel, folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model.shape), indent=2))
    (folder / "moetrace-builtin.json").write_text(
        json.dumps({"model_id": model.model_id, "hash": model.content_hash, "plant": str(model.plant or "")})
    )


def write_safetensors(path: Path, plan, progress=None) -> None:
    """Write the (name, dims, make) of ``plan`` as one BF16 safetensors file, one tensor in memory at a time.

    The header goes first (it needs only names and dims), then each tensor's bytes as it is
    generated, converted to BF16 (as checkpoints ship) in chunks of WRITE_CHUNK values.
    ``progress(done, total, name)`` is called after each tensor.
    """
    entries = list(plan)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims, _ in entries:
        dtype = _st_dtype(name)
        size = (1 if dtype == "U8" else 2) * int(np.prod(dims, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for k, (name, dims, make) in enumerate(entries):
            arr = make()
            want = np.uint8 if _st_dtype(name) == "U8" else np.float32
            if arr.shape != tuple(dims) or arr.dtype != want:
                raise InternalError(f"built-in generator bug: {name} is {arr.dtype} {arr.shape}, planned {dims}")
            if want == np.uint8:
                fh.write(np.ascontiguousarray(arr).data)  # packed blocks and scales, as they are
            else:
                _write_bf16(fh, arr)
            if progress:
                progress(k + 1, len(entries), name)


def _st_dtype(name: str) -> str:
    """The safetensors dtype a built-in checkpoint stores ``name`` in: BF16, or U8 for packed blocks and scales."""
    from moetrace.tracer.sources.validate import PACKED_SUFFIXES

    return "U8" if name.endswith(PACKED_SUFFIXES) else "BF16"


def _write_bf16(fh, arr: np.ndarray) -> None:
    import torch

    flat = np.ascontiguousarray(arr).reshape(-1)  # a view where arr is contiguous (every planned tensor is)
    for i in range(0, flat.size, WRITE_CHUNK):
        part = torch.from_numpy(flat[i:i + WRITE_CHUNK]).to(torch.bfloat16)  # round to nearest even, as .to() does
        fh.write(part.view(torch.uint8).numpy().data)
