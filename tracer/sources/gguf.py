"""GGUF files as model sources: architecture from the metadata, tensors under transformers names.

``--model FILE.gguf`` traces a GGUF file as the reference; ``--gguf FILE`` gives the weights of
the ``gguf-*`` variants. Either way the file is memory-mapped by ``gguf.GGUFReader`` and read one
decoder layer at a time: F32, F16 and BF16 tensors come back as they are stored, quantized ones
are dequantized to float32 with :func:`moetrace.kernels.dequantize` (bit-exact with ggml), one
expert at a time from the 3-D expert tensors.

Names and shapes (arch ``qwen3moe``; GGUFReader reverses ggml's ``ne``, so shapes are HF's
[out, in]): ``blk.N.ffn_gate_exps`` and ``ffn_up_exps`` (E, I, H) become the two halves of
``mlp.experts.gate_up_proj`` (E, 2I, H); ``ffn_down_exps`` (E, H, I) is ``mlp.experts.down_proj``.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

import numpy as np
import torch

from moetrace.errors import MoetraceError
from moetrace.tracer.naming import GLOBAL_TENSORS, LAYER_TENSORS

# GGUF general.architecture -> transformers model_type.
SUPPORTED_ARCHS = {"qwen3moe": "qwen3_moe"}
_FLOAT = {"F32": None, "F16": None, "BF16": torch.bfloat16}


class GGUFSource:
    """A GGUF file as a model source (the same interface as :class:`~moetrace.tracer.sources.checkpoint.CheckpointSource`).

    Args:
        path: the ``.gguf`` file.
        model_id: the id recorded in traces (default: the resolved path).

    Raises:
        MoetraceError: a missing, truncated or corrupted file, an unsupported architecture, or
            metadata the architecture needs but the file lacks.
    """

    builtin = None

    def __init__(self, path: str | Path, model_id: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise MoetraceError(f"GGUF file {str(self.path)!r} does not exist")
        self.reader = _open_reader(self.path)
        self.arch = self._field("general.architecture", required=True)
        if self.arch not in SUPPORTED_ARCHS:
            raise MoetraceError(
                f"GGUF architecture {self.arch!r} of {str(self.path)!r} is not supported yet; "
                f"supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._check_extents()
        self.config = self._config()
        self.model_id = model_id or str(self.path.resolve())
        self.model_hash = self._hash()
        self.tokenizer = self._tokenizer()

    # -- metadata ------------------------------------------------------------------------
    def _field(self, key: str, required: bool = False, default=None):
        f = self.reader.get_field(key)
        if f is None:
            if required:
                raise MoetraceError(f"GGUF file {str(self.path)!r} lacks the metadata key {key!r}")
            return default
        try:
            return f.contents()
        except Exception as e:  # a malformed field: name it
            raise MoetraceError(f"GGUF file {str(self.path)!r}: metadata key {key!r} is unreadable ({e})") from None

    def _check_extents(self) -> None:
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise MoetraceError(
                    f"GGUF file {str(self.path)!r} is truncated: tensor {t.name} needs bytes "
                    f"{t.data_offset}..{t.data_offset + t.n_bytes}, the file has {size}"
                )

    def _config(self):
        from transformers import AutoConfig

        a = self.arch
        req = lambda k: self._field(f"{a}.{k}", required=True)  # noqa: E731
        hidden = int(req("embedding_length"))
        heads = int(req("attention.head_count"))
        head_dim = int(self._field(f"{a}.attention.key_length", default=hidden // heads))
        if "token_embd.weight" not in self._tensors:
            raise MoetraceError(f"GGUF file {str(self.path)!r} has no token_embd.weight tensor")
        vocab = int(self._tensors["token_embd.weight"].shape[-1])  # ne = (hidden, vocab)
        gate = self._tensors.get("blk.0.ffn_gate_exps.weight")
        expert_ff = self._field(f"{a}.expert_feed_forward_length")
        if expert_ff is None and gate is not None:
            expert_ff = int(gate.shape[1])  # ne = (hidden, I, E)
        if expert_ff is None:
            raise MoetraceError(f"GGUF file {str(self.path)!r} lacks {a}.expert_feed_forward_length")
        scaling = self._field(f"{a}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise MoetraceError(
                f"GGUF file {str(self.path)!r} uses RoPE scaling {scaling!r}, which moetrace does not support yet"
            )
        d = {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": SUPPORTED_ARCHS[a],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(self._field(f"{a}.feed_forward_length", default=3 * int(expert_ff))),
            "moe_intermediate_size": int(expert_ff),
            "num_hidden_layers": int(req("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{a}.attention.head_count_kv", default=heads)),
            "head_dim": head_dim,
            "num_experts": int(req("expert_count")),
            "num_experts_per_tok": int(req("expert_used_count")),
            "norm_topk_prob": True,  # llama.cpp's qwen3moe graph always renormalizes the top-k weights
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "hidden_act": "silu",
            "max_position_embeddings": int(self._field(f"{a}.context_length", default=4096)),
            "rms_norm_eps": _f32(req("attention.layer_norm_rms_epsilon")),
            "rope_parameters": {"rope_type": "default",
                                "rope_theta": _f32(self._field(f"{a}.rope.freq_base", default=1_000_000.0))},
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": False,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        }
        return AutoConfig.for_model(**d)

    def _hash(self) -> str:
        # The metadata and tensor table (everything before the tensor data) plus the file size:
        # cheap, and changes whenever a tensor's type, shape or placement does.
        h = hashlib.sha256(bytes(self.reader.data[: self.reader.data_offset]))
        h.update(str(self.path.stat().st_size).encode())
        return h.hexdigest()[:16]

    def _tokenizer(self):
        from moetrace.tracer.sources.checkpoint import ByteTokenizer

        if self._field("tokenizer.ggml.model") in (None, "none"):  # "none": llama.cpp's "no vocabulary"
            return ByteTokenizer() if self.config.vocab_size == 256 else None
        return _GGUFTokenizer(self.path)

    # -- tensors -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def ggml_types(self) -> dict[str, str]:
        """GGUF tensor name -> GGML type name, for every tensor in the file."""
        return {name: t.tensor_type.name for name, t in self._tensors.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> shape in elements, as GGUFReader orders it (HF's [out, in])."""
        return {name: tuple(int(x) for x in reversed(t.shape.tolist())) for name, t in self._tensors.items()}

    def has(self, name: str) -> bool:
        g = GLOBAL_TENSORS.get(name)
        return g is not None and g in self._tensors

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor outside the decoder layers by its HF name (embedding, final norm, output head)."""
        if name not in GLOBAL_TENSORS or GLOBAL_TENSORS[name] not in self._tensors:
            raise MoetraceError(f"tensor {name!r} not found in {str(self.path)!r}")
        try:
            return self._read(GLOBAL_TENSORS[name])
        finally:
            self._drop_pages()

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Every tensor of decoder layer ``layer`` under its HF name inside the layer."""
        if not 0 <= layer < self.num_layers:
            raise MoetraceError(f"layer {layer} is outside {str(self.path)!r} (layers 0..{self.num_layers - 1})")
        out = {}
        try:
            for hf, stem in LAYER_TENSORS.items():
                if isinstance(stem, tuple):  # gate_up: gate ++ up along the row axis
                    gate, up = (f"blk.{layer}.{s}.weight" for s in stem)
                    out[hf] = self._read_experts([gate, up])
                elif stem.endswith("_exps"):
                    out[hf] = self._read_experts([f"blk.{layer}.{stem}.weight"])
                else:
                    out[hf] = self._read(f"blk.{layer}.{stem}.weight")
        finally:
            self._drop_pages()
        return out

    def _get(self, name: str):
        if name not in self._tensors:
            raise MoetraceError(f"GGUF file {str(self.path)!r} has no tensor {name}")
        return self._tensors[name]

    def _read(self, name: str) -> torch.Tensor:
        t = self._get(name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        return _decode(self.path, t, np.asarray(t.data), shape)

    def _read_experts(self, names: list[str]) -> torch.Tensor:
        """3-D expert tensors (E, rows, cols), concatenated along rows, one expert at a time."""
        ts = [self._get(n) for n in names]
        shapes = [tuple(int(x) for x in reversed(t.shape.tolist())) for t in ts]
        if any(len(s) != 3 for s in shapes) or len({(s[0], s[2]) for s in shapes}) != 1:
            raise MoetraceError(
                f"GGUF file {str(self.path)!r}: expert tensors {', '.join(names)} have shapes {shapes}; "
                f"expected (experts, rows, cols) with equal experts and cols"
            )
        e, cols = shapes[0][0], shapes[0][2]
        rows = [s[1] for s in shapes]
        dtypes = {_float_dtype(t) for t in ts}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        out = torch.empty((e, sum(rows), cols), dtype=dtype)  # (E, rows, cols)
        for i in range(e):
            r0 = 0
            for t, r in zip(ts, rows):
                out[i, r0:r0 + r] = _decode(self.path, t, np.asarray(t.data[i]), (r, cols))
                r0 += r
        return out

    def _drop_pages(self) -> None:
        # The map stays open for the whole run; dropping the pages already copied out keeps
        # them from counting in resident memory (they come back from the page cache if needed).
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def check_matches(self, reference) -> None:
        """Check that this file's tensors have the reference model's names and shapes.

        Raises:
            MoetraceError: naming the first tensor (in model order) that is missing, extra or
                shaped differently, or the first hyperparameter that differs.
        """
        from moetrace.tracer.weights.derive import gguf_specs

        rc, fc = reference.config, self.config
        for key, what in (("num_experts_per_tok", "expert_used_count"), ("num_attention_heads", "attention.head_count"),
                          ("num_key_value_heads", "attention.head_count_kv"), ("head_dim", "attention.key_length")):
            if int(getattr(rc, key)) != int(getattr(fc, key)):
                raise MoetraceError(
                    f"GGUF file {str(self.path)!r} does not match the reference {reference.model_id}: "
                    f"{self.arch}.{what} is {getattr(fc, key)} in the file, the reference has {key}={getattr(rc, key)}"
                )
        want = gguf_specs(reference)
        have = self.shapes()
        for name, shape in want.items():
            if name not in have:
                raise MoetraceError(
                    f"GGUF file {str(self.path)!r} does not match the reference {reference.model_id}: "
                    f"tensor {name} {tuple(shape)} is missing from the file"
                )
            if tuple(have[name]) != tuple(shape):
                raise MoetraceError(
                    f"GGUF file {str(self.path)!r} does not match the reference {reference.model_id}: "
                    f"tensor {name} is {have[name]} in the file, the reference has {tuple(shape)}"
                )
        if "output.weight" in have and "output.weight" not in want:
            raise MoetraceError(
                f"GGUF file {str(self.path)!r} does not match the reference {reference.model_id}: the file has "
                f"output.weight, the reference ties its output head to the embedding"
            )


class _GGUFTokenizer:
    """The tokenizer stored in a GGUF file's metadata, converted by transformers (local file only).

    Loaded on first use, so a file whose tokenizer transformers cannot convert still serves as
    the weights of a gguf variant; tokenizing text with it then fails with the reason.
    """

    def __init__(self, path: Path):
        self.path = path
        self._tok = None

    def _load(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                          local_files_only=True)
            except Exception as e:
                raise MoetraceError(f"cannot read the tokenizer in GGUF file {str(self.path)!r}: {e}") from None
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._load().encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self._load().decode([token_id])


class _Truncated(Exception):
    pass


def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """GGUFReader that names the first tensor whose data runs past the end of the file."""

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                try:
                    _, name, _, dims, raw_dtype, offset = field.parts
                    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
                    need = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                except Exception:  # a layout this check does not know: leave it to GGUFReader
                    break
                if need > size:
                    raise _Truncated(f"it is truncated: tensor {bytes(name).decode(errors='replace')} needs bytes "
                                     f"up to {need}, the file has {size}")
            super()._build_tensors(start_offs, fields)

    return Reader


def _open_reader(path: Path):
    try:
        return _reader_class()(str(path))
    except _Truncated as e:
        raise MoetraceError(f"cannot read GGUF file {str(path)!r}: {e}") from None
    except Exception as e:  # bad magic, unsupported version, truncated header, bad tensor table
        what = str(e) or type(e).__name__
        if "magic" in what.lower():
            what = "it does not start with the GGUF magic bytes"
        else:
            what = f"its header is truncated or corrupted ({what})"
        raise MoetraceError(f"cannot read GGUF file {str(path)!r}: {what}") from None


def _f32(value) -> float:
    # GGUF stores these as float32: 1e-6 comes back as 9.99999997e-07. The shortest decimal
    # that rounds to the same float32 gives the value the checkpoint's config.json had.
    return float(str(np.float32(value)))


def _float_dtype(t) -> torch.dtype:
    name = t.tensor_type.name
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(name, torch.float32)


def _decode(path: Path, t, raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor (or one expert of it) from its stored bytes: floats as stored, quantized types dequantized to F32."""
    from moetrace.kernels import dequantize

    name = t.tensor_type.name
    if name in ("F32", "F16"):
        return torch.from_numpy(np.array(raw, copy=True)).reshape(shape)
    if name == "BF16":  # GGUFReader gives BF16 as raw bytes
        return torch.from_numpy(np.array(raw, copy=True).view(np.int16)).view(torch.bfloat16).reshape(shape)
    try:
        q = torch.from_numpy(np.array(raw, copy=True)).reshape(-1, raw.shape[-1])  # (rows, bytes per row)
        return dequantize(q, name, shape[-1]).reshape(shape)
    except MoetraceError as e:
        raise MoetraceError(f"GGUF file {str(path)!r}: cannot dequantize tensor {t.name} ({name}): {e}") from None


def open_gguf(path) -> GGUFSource:
    """Open a GGUF file as a model source (see :class:`GGUFSource`)."""
    return GGUFSource(path)
