"""builtin.py as of GENERATOR_VERSION 4 (main 17bedf1), frozen: the reference the faster generator must match bit for bit.

Do not edit: tests/tracer/test_builtin_speed.py compares every tensor the current generator and
writer produce against this module's, and benchmarks/bench_generate.py times it as the baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetrace.errors import MoetraceError

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
    expert_keys: str = "fused"  # "fused" (transformers 5's) or "per_expert" (as released checkpoints ship)


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
    "olmoe-1b-7b": BuiltinShape(
        "OLMoE-1B-7B's real widths (hidden 2048, 16/16 heads of 128, 64 experts top-8, expert width 1024); "
        "choose layers with :layers=N (default 2; the real model has 16)",
        layers=2, hidden=2048, experts=64, top_k=8, expert_width=1024, heads=16, kv_heads=16, head_dim=128,
        family="olmoe", expert_keys="per_expert",
    ),
}
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
    """A planted fault in expert ``expert`` of layer ``layer``, projection ``proj`` (gate, up or down)."""

    layer: int
    expert: int
    proj: str

    @classmethod
    def parse(cls, text: str) -> "Plant":
        parts = text.split(":")
        projs = family().expert_projs
        if len(parts) != 3 or parts[2] not in projs:
            raise MoetraceError(
                f"invalid --plant {text!r}; expected LAYER:EXPERT:PROJ with PROJ one of {', '.join(projs)}"
            )
        try:
            layer, expert = int(parts[0]), int(parts[1])
        except ValueError:
            raise MoetraceError(f"invalid --plant {text!r}; LAYER and EXPERT must be integers") from None
        return cls(layer, expert, parts[2])

    def __str__(self) -> str:
        return f"{self.layer}:{self.expert}:{self.proj}"


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
            {"v": GENERATOR_VERSION, "shape": dataclasses.asdict(self.shape), "plant": str(self.plant or ""),
             "plant_std": PLANT_STD if self.plant else None},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    """Write the model's checkpoint folder once and return it (a cache hit returns at once)."""
    folder = cache_root() / "builtin" / f"{model.preset}-{model.content_hash}"
    if (folder / "model.safetensors").exists() and (folder / "moetrace-builtin.json").exists():
        return folder
    import shutil

    from moetrace.outputs import writable_folder

    writable_folder(folder.parent, "the model cache (MOETRACE_CACHE)")
    _remove_stale_tmp(folder.parent)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _write_checkpoint(model, tmp, progress)
        tmp.rename(folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "moetrace-builtin.json").exists():  # else another process finished first, identically
            raise MoetraceError(f"cannot write built-in model {model.preset} to {str(folder)!r}: {e.strerror or e}") from None
    except BaseException:  # interrupted: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


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
    return {
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
        **f.gguf_config,
    }


def _rng(shape: BuiltinShape, name: str) -> np.random.Generator:
    # One independent stream per tensor name, so any tensor can be generated on its own.
    digest = hashlib.sha256(f"{shape.seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _t(rng: np.random.Generator, size, scale: float) -> np.ndarray:
    # Student t with 5 degrees of freedom has variance 5/3; normalize to std `scale`.
    return (rng.standard_t(5, size=size) * (scale / np.sqrt(5.0 / 3.0))).astype(np.float32)


def outlier_channels(shape: BuiltinShape) -> np.ndarray:
    """The hidden channels that carry massive activations (about 1 in 128)."""
    n = max(2, shape.hidden // 128)
    return np.sort(_rng(shape, "outlier_channels").choice(shape.hidden, n, replace=False))


def generate_tensors(shape: BuiltinShape, plant: Plant | None = None):
    """Yield (hf_name, float32 array) for every tensor of the model, one at a time."""
    h, e, f, L = shape.hidden, shape.experts, shape.expert_width, shape.layers
    out_ch = outlier_channels(shape)
    depth = 1.0  # residual branches at full scale: the stream grows with depth, as in real LLMs

    emb = _t(_rng(shape, "embed"), (shape.vocab, h), 1.0)
    emb[:, out_ch] *= 12.0
    yield "model.embed_tokens.weight", emb
    for i in range(L):
        p = f"model.layers.{i}."
        r = lambda n: _rng(shape, p + n)  # noqa: E731
        yield p + "input_layernorm.weight", (1.0 + 0.1 * r("ln1").standard_normal(h)).astype(np.float32)
        yield p + "post_attention_layernorm.weight", (1.0 + 0.1 * r("ln2").standard_normal(h)).astype(np.float32)
        yield p + "self_attn.q_proj.weight", _t(r("q"), (shape.heads * shape.head_dim, h), 1.0 / np.sqrt(h))
        yield p + "self_attn.k_proj.weight", _t(r("k"), (shape.kv_heads * shape.head_dim, h), 1.0 / np.sqrt(h))
        yield p + "self_attn.v_proj.weight", _t(r("v"), (shape.kv_heads * shape.head_dim, h), 1.0 / np.sqrt(h))
        yield p + "self_attn.o_proj.weight", _t(
            r("o"), (h, shape.heads * shape.head_dim), depth / np.sqrt(shape.heads * shape.head_dim)
        )
        yield p + "self_attn.q_norm.weight", (1.0 + 0.1 * r("qn").standard_normal(shape.head_dim)).astype(np.float32)
        yield p + "self_attn.k_norm.weight", (1.0 + 0.1 * r("kn").standard_normal(shape.head_dim)).astype(np.float32)
        # Router: logit spread about 2.5 on RMS-normalized inputs, plus a per-expert preference.
        yield p + "mlp.gate.weight", _t(r("router"), (e, h), 2.5 / np.sqrt(h))
        gate_up = _t(r("gate_up"), (e, 2 * f, h), 1.0 / np.sqrt(h))  # (E, 2F, H)
        down = _t(r("down"), (e, h, f), depth / np.sqrt(f))  # (E, H, F)
        down[:, out_ch, :] *= 4.0  # experts feed the outlier channels
        if plant is not None and plant.layer == i:
            _plant(shape, plant, gate_up, down)
        yield p + "mlp.experts.gate_up_proj", gate_up
        yield p + "mlp.experts.down_proj", down
    norm = (1.0 + 0.1 * _rng(shape, "norm").standard_normal(h)).astype(np.float32)
    norm[out_ch] = OUTLIER_NORM  # trained final norms mute the massive channels, which carry no token identity
    yield "model.norm.weight", norm
    yield "lm_head.weight", _lm_head(shape, emb, out_ch)


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
    """Shrink the planted matrix to PLANT_STD and grow its partner by the same factor, in place.

    Why not "a few extreme values": whatever outliers do to the rest of their blocks, they hold
    most of the matrix's energy and any faithful quantizer reproduces them, so the matrix's
    cosine stays above 0.99. A matrix whose every block scale is lost in fp16's rounding is what
    a weight audit sees at cosine 0.78, and it is a real hazard: a rescaling that leaves the
    model's function unchanged (as merges and equalization do) can push weights there.

    down is paired with up (``down(silu(gate) * up)`` is unchanged when up grows by s and down
    shrinks by s); up with down likewise; gate with up, which keeps the expert's output
    magnitude where silu is near-linear but not its exact function.
    """
    f, e = shape.expert_width, plant.expert
    views = {"gate": gate_up[e, :f], "up": gate_up[e, f:], "down": down[e]}
    partner = {"gate": "up", "up": "down", "down": "up"}[plant.proj]
    mat = views[plant.proj]
    factor = np.float32(PLANT_STD / mat.std())
    mat *= factor  # writes through the views
    views[partner] /= factor


def checkpoint_tensors(shape: BuiltinShape, plant: Plant | None = None):
    """Yield (name, float32 array) of every tensor as a checkpoint of the shape's family names it.

    :func:`generate_tensors` names tensors as transformers 5 holds Qwen3-MoE; here each becomes
    the family's: a tensor the family has not (Mixtral's q/k norms) is left out, a 1-D norm
    weight of another width (OLMoE's whole-projection q/k norms) is resized to it (``np.resize``
    repeats the values, same distribution), and with ``expert_keys="per_expert"`` the fused
    expert tensors are split into the family's per-expert keys (``fusion.key``) and the other
    keys take their checkpoint names (``fusion.renames`` reversed).
    """
    from types import SimpleNamespace

    fam = family(shape)
    fusion = fam.fusion
    per_expert = shape.expert_keys == "per_expert"
    if per_expert and fusion is None:
        raise MoetraceError(f"built-in preset with family {fam.name}: the family has no per-expert keys")
    dims = fam.dims(SimpleNamespace(**hf_config_dict(shape)))
    layer_keys = fam.layer_stems  # transformers 5 keys inside a layer
    for name, arr in generate_tensors(shape, plant):
        if not name.startswith("model.layers."):
            yield name, arr
            continue
        layer = int(name.split(".")[2])
        prefix = fam.layer_prefix(layer)
        inner = name[len(prefix):]
        if inner not in layer_keys:
            continue
        if per_expert and inner in fusion.fused:
            projs = fusion.fused[inner]
            rows = arr.shape[1] // len(projs)
            for e in range(arr.shape[0]):
                for i, proj in enumerate(projs):
                    yield prefix + fusion.per_expert_key(e, proj), arr[e, i * rows:(i + 1) * rows]
            continue
        want = tuple(dims[d] for d in fam.tensors.get(inner, ()))
        if arr.ndim == 1 and want and arr.shape != want:
            arr = np.resize(arr, want)
        yield prefix + (fusion.checkpoint_key(inner) if per_expert else inner), arr


def _write_checkpoint(model: BuiltinModel, folder: Path, progress=None) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, arr in checkpoint_tensors(model.shape, model.plant):
        tensors[name] = torch.from_numpy(arr).to(torch.bfloat16)  # checkpoints ship BF16
        if progress:
            progress(name)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model.shape), indent=2))
    (folder / "moetrace-builtin.json").write_text(
        json.dumps({"model_id": model.model_id, "hash": model.content_hash, "plant": str(model.plant or "")})
    )
