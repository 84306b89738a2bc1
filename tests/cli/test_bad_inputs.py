"""Bad input, one case at a time: every one ends in exactly one line on stderr and exit status 2.

Each case names the fragment its message must contain, so a case that fails for another reason
(say, an internal error caught as one line, which exits 1) does not pass. The cases run through
click's test runner on the real command group (moetrace's own one-line error handling included),
which costs no interpreter start per case; a sample runs in real subprocesses as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli_runner import moetrace
from moetrace.cli.main import main

RUN = ["run", "--variant", "q8_0-bf16", "-q"]


def _files(tmp: Path) -> dict[str, str]:
    """The input files the cases name, written fresh for each test."""
    (tmp / "nonutf8.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp / "empty.txt").write_text("\n\n")
    (tmp / "badjsonl.txt").write_text('{"text": "a"\n')
    (tmp / "notext.jsonl").write_text('{"prompt": "a"}\n')
    (tmp / "folder").mkdir()
    (tmp / "ids_oov.jsonl").write_text(json.dumps({"ids": [1, 2, 999]}) + "\n")
    (tmp / "ids_neg.jsonl").write_text(json.dumps({"ids": [1, -2]}) + "\n")
    (tmp / "ids_bad.jsonl").write_text("{ids: [1, 2]}\n")
    (tmp / "ids_str.jsonl").write_text(json.dumps({"ids": ["a", "b"]}) + "\n")
    (tmp / "ids_empty.jsonl").write_text("\n")
    np.save(tmp / "ids_float.npy", np.array([1.5, 2.0]))
    np.save(tmp / "ids_3d.npy", np.zeros((2, 2, 2), np.int64))
    (tmp / "ids_garbage.npy").write_bytes(b"not an npy file at all")
    (tmp / "plainfile").write_text("x")
    (tmp / "long.txt").write_text("x" * 5000 + "\n")
    return {k: str(tmp / k) for k in ("nonutf8.txt", "empty.txt", "badjsonl.txt", "notext.jsonl", "folder",
                                      "ids_oov.jsonl", "ids_neg.jsonl", "ids_bad.jsonl", "ids_str.jsonl",
                                      "ids_empty.jsonl", "ids_float.npy", "ids_3d.npy", "ids_garbage.npy",
                                      "plainfile", "long.txt")}


TINY2 = "builtin:tiny:layers=2"
_MODEL_FILES: dict[str, str] = {}


def _model_files(base: Path) -> dict[str, str]:
    """Damaged model files, made once per test session from real files of builtin:tiny:layers=2.

    Each is what a user might hand moetrace: a checkpoint folder copied from the built-in model's
    and then edited (config, safetensors header, index, shards), or a GGUF written by moetrace's own
    writer and then edited in place (a tensor type, a block scale).
    """
    if _MODEL_FILES:
        return _MODEL_FILES
    import shutil
    import struct

    import gguf
    from safetensors.torch import load_file, save_file

    from moetrace.tracer.sources.checkpoint import open_source
    from moetrace.tracer.weights.gguf_writer import write_gguf

    ref = open_source(TINY2)
    out: dict[str, str] = {}

    def folder(name, edit_config=None):
        d = base / name
        d.mkdir()
        shutil.copyfile(ref.folder / "config.json", d / "config.json")
        shutil.copyfile(ref.folder / "model.safetensors", d / "model.safetensors")
        if edit_config:
            cfg = json.loads((d / "config.json").read_text())
            edit_config(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        out[name] = str(d)
        return d

    (folder("m_badjson") / "config.json").write_text('{"model_type": "qwen3_moe", "hidden_size": 256,')
    folder("m_topk", lambda c: c.update(num_experts_per_tok=c["num_experts"] + 1))
    folder("m_width", lambda c: c.update(moe_intermediate_size=128))
    st = folder("m_truncated") / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    st = folder("m_intweight") / "model.safetensors"
    data = st.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["model.layers.0.self_attn.q_proj.weight"]["dtype"] = "I16"  # same width as BF16: only the kind is wrong
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    st.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    # Sharded copies: globals and layer 0 in shard 1, layer 1 in shard 2.
    tensors = load_file(str(ref.folder / "model.safetensors"))
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    for name in ("m_index_missing", "m_shard_missing"):
        d = base / name
        d.mkdir()
        shutil.copyfile(ref.folder / "config.json", d / "config.json")
        wm = {}
        for i, shard in enumerate(shards):
            part = {k: v for k, v in tensors.items() if k.startswith("model.layers.1.") == (i == 1)}
            save_file(part, str(d / shard), metadata={"format": "pt"})
            wm.update({k: shard for k in part})
        out[name] = str(d)
        if name == "m_index_missing":  # the index names a tensor its shard does not hold
            wm["model.layers.1.mlp.gate.weight"] = shards[0]
        else:
            (d / shards[1]).unlink()
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    # GGUF files written by moetrace quantize's writer.
    g = base / "tiny2.gguf"
    write_gguf(ref, "q4_k_m", g, cache=False)
    layout = {t.name: t for t in gguf.GGUFReader(str(g)).tensors}

    def edited(name, offset, raw_bytes):
        p = base / name
        b = bytearray(g.read_bytes())
        b[offset:offset + len(raw_bytes)] = raw_bytes
        p.write_bytes(bytes(b))
        out[name] = str(p)

    norm = layout["blk.0.attn_norm.weight"].field
    type_at = norm.offset + sum(int(x.nbytes) for x in norm.parts[:4])
    edited("g_type.gguf", type_at, struct.pack("<I", gguf.GGMLQuantizationType.Q8_0))  # a norm as Q8_0
    gate = layout["blk.1.ffn_gate_exps.weight"]
    edited("g_nan.gguf", gate.data_offset + gate.n_bytes // 2 - (gate.n_bytes // 2) % 144,
           np.array([np.nan], np.float16).tobytes())  # a Q4_K block's scale d
    g3 = base / "g_layers3.gguf"
    write_gguf(open_source("builtin:tiny:layers=3"), "q8_0", g3, cache=False)
    out["g_layers3.gguf"] = str(g3)
    _MODEL_FILES.update(out)
    return _MODEL_FILES


GGUF_RUN = ["run", "--model", TINY2, "--variant", "gguf-bf16", "-q", "--gguf"]
# (case id, arguments with {file} placeholders, environment additions, fragment of the message)
CASES = [
    ("max-tokens-negative", RUN + ["--max-tokens", "-5"], {}, "not in the range x>=1"),
    ("max-tokens-zero", RUN + ["--max-tokens", "0"], {}, "not in the range x>=1"),
    ("max-tokens-text", RUN + ["--max-tokens", "many"], {}, "is not a valid integer"),
    ("seed-negative", RUN + ["--seed", "-1"], {}, "not in the range x>=0"),
    ("audit-top-negative", ["audit", "--variant", "q4_k_m", "--top", "-3"], {}, "not in the range x>=1"),
    ("audit-top-zero", ["audit", "--variant", "q4_k_m", "--top", "0"], {}, "not in the range x>=1"),
    ("audit-threshold-range", ["audit", "--variant", "q4_k_m", "--threshold", "2"], {}, "not in the range"),
    ("audit-unknown-file-type", ["audit", "--variant", "q9_k"], {}, "q9_k"),
    ("audit-imatrix-missing", ["audit", "--variant", "q4_k_m", "--imatrix", "{folder}/none.dat"], {}, "none.dat"),
    ("report-resamples-zero", ["report", "{folder}", "--resamples", "0"], {}, "not in the range x>=1"),
    ("cache-prune-negative", ["cache", "--prune", "-1G"], {}, "cannot read '-1G'"),
    ("cache-prune-text", ["cache", "--prune", "lots"], {}, "cannot read 'lots'"),
    ("cache-prune-nan", ["cache", "--prune", "nanG"], {}, "cannot read 'nanG'"),
    ("cache-prune-and-clear", ["cache", "--prune", "1G", "--clear"], {}, "exclude each other"),
    ("run-name-parent", RUN + ["--run", "../../x"], {}, "invalid run name '../../x'"),
    ("run-name-slash", RUN + ["--run", "a/b"], {}, "invalid run name 'a/b'"),
    ("run-name-dotdot", RUN + ["--run", ".."], {}, "invalid run name '..'"),
    ("run-name-absolute", RUN + ["--run", "/tmp/x"], {}, "invalid run name '/tmp/x'"),
    ("prompts-not-utf8", RUN + ["--prompts", "{nonutf8.txt}"], {}, "is not UTF-8 text"),
    ("prompts-missing", RUN + ["--prompts", "{folder}/none.txt"], {}, "does not exist"),
    ("prompts-folder", RUN + ["--prompts", "{folder}"], {}, "is not a file"),
    ("prompts-empty", RUN + ["--prompts", "{empty.txt}"], {}, "holds no prompts"),
    ("prompts-bad-jsonl", RUN + ["--prompts", "{badjsonl.txt}"], {}, "invalid JSON"),
    ("prompts-jsonl-no-text", RUN + ["--prompts", "{notext.jsonl}"], {}, "string 'text' field"),
    ("tokens-out-of-vocab", RUN + ["--tokens", "{ids_oov.jsonl}"], {}, "token id 999 is outside the vocabulary"),
    ("tokens-negative", RUN + ["--tokens", "{ids_neg.jsonl}"], {}, "token id -2 is outside the vocabulary"),
    ("tokens-bad-json", RUN + ["--tokens", "{ids_bad.jsonl}"], {}, "invalid JSON"),
    ("tokens-not-ints", RUN + ["--tokens", "{ids_str.jsonl}"], {}, "non-empty list of integers"),
    ("tokens-empty", RUN + ["--tokens", "{ids_empty.jsonl}"], {}, "holds no sequences"),
    ("tokens-npy-float", RUN + ["--tokens", "{ids_float.npy}"], {}, "integer array"),
    ("tokens-npy-3d", RUN + ["--tokens", "{ids_3d.npy}"], {}, "integer array"),
    ("tokens-npy-garbage", RUN + ["--tokens", "{ids_garbage.npy}"], {}, "not a readable .npy"),
    ("tokens-missing", RUN + ["--tokens", "{folder}/none.npy"], {}, "does not exist"),
    ("text-and-prompts", RUN + ["--text", "a", "--prompts", "{empty.txt}"], {}, "not several"),
    ("text-and-tokens", RUN + ["--text", "a", "--tokens", "{ids_oov.jsonl}"], {}, "not several"),
    ("text-empty", RUN + ["--text", "   "], {}, "--text is empty"),
    ("too-long-for-positions", RUN + ["--prompts", "{long.txt}"], {}, "beyond the model's max_position_embeddings"),
    ("variant-unknown-weights", ["run", "--variant", "q9_k-bf16"], {}, "unknown variant weights 'q9_k'"),
    ("variant-unknown-compute", ["run", "--variant", "q8_0-fp8"], {}, "fp8"),
    ("variant-no-compute", ["run", "--variant", "q8_0"], {}, "q8_0"),
    ("variant-missing", ["run"], {}, "Missing option '--variant'"),
    ("mode-unknown", RUN + ["--mode", "lazy"], {}, "'lazy' is not one of"),
    ("site-unknown", RUN + ["--sites", "resid,bogus"], {}, "unknown site 'bogus'"),
    ("gguf-missing", ["run", "--variant", "gguf-bf16", "--gguf", "{folder}/none.gguf"], {}, "does not exist"),
    ("gguf-without-variant", RUN + ["--gguf", "{plainfile}"], {}, "no variant uses it"),
    ("gguf-variant-without-file", ["run", "--variant", "gguf-bf16", "-q"], {}, "give --gguf FILE"),
    ("plant-outside", RUN + ["--plant", "99:0:down"], {}, "outside builtin:"),
    ("plant-garbage", RUN + ["--plant", "down"], {}, "down"),
    ("model-unknown-builtin", RUN + ["--model", "builtin:nosuch"], {}, "nosuch"),
    ("model-zero-layers", RUN + ["--model", "builtin:mini:layers=0"], {}, "layers must be at least 1"),
    ("model-bad-override", RUN + ["--model", "builtin:mini:layers=x"], {}, "must be an integer"),
    ("model-missing-folder", RUN + ["--model", "{folder}/nomodel"], {}, "nomodel"),
    ("resume-nothing", RUN + ["--resume", "--out", "{folder}", "--run", "fresh"], {}, "nothing to resume"),
    ("env-qcache-switch", RUN, {"MOETRACE_QCACHE": "maybe"}, "MOETRACE_QCACHE='maybe' is not a switch"),
    ("env-qcache-max-negative", RUN, {"MOETRACE_QCACHE_MAX": "-5G"}, "MOETRACE_QCACHE_MAX"),
    ("env-cache-is-file", RUN, {"MOETRACE_CACHE": "{plainfile}"}, "is a file, not a folder"),
    ("env-progress-style", RUN, {"MOETRACE_PROGRESS": "fancy"}, "MOETRACE_PROGRESS='fancy' is not one of"),
    ("env-debug-switch", RUN, {"MOETRACE_DEBUG": "loud"}, "MOETRACE_DEBUG='loud' is not a switch"),
    ("quantize-output-folder", ["quantize", "q8_0", "-o", "{folder}"], {}, "is a folder; give a file name"),
    ("quantize-output-under-file", ["quantize", "q8_0", "-o", "{plainfile}/x.gguf"], {}, "cannot write to the folder"),
    ("quantize-unknown-type", ["quantize", "q9_k", "-o", "{folder}/x.gguf"], {}, "valid file types"),
    ("recipe-unknown-type", ["recipe", "q9_k"], {}, "valid file types"),
    ("diff-missing-stores", ["diff", "{folder}/a.zarr", "{folder}/b.zarr"], {}, "does not exist"),
    ("model-config-corrupted", RUN + ["--model", "{m_badjson}"], {}, "is not valid JSON"),
    ("model-topk-over-experts", RUN + ["--model", "{m_topk}"], {}, "num_experts_per_tok is 9, more than the 8"),
    ("model-shapes-disagree", RUN + ["--model", "{m_width}"], {},
     "layer 0: tensor 'mlp.experts.down_proj' is (8, 256, 256), the config makes it (8, 256, 128)"),
    ("model-safetensors-truncated", RUN + ["--model", "{m_truncated}"], {}, "is truncated"),
    ("model-integer-weight", RUN + ["--model", "{m_intweight}"], {},
     "'model.layers.0.self_attn.q_proj.weight' is I16; weights must be one of"),
    ("model-index-missing-tensor", RUN + ["--model", "{m_index_missing}"], {},
     "'model.layers.1.mlp.gate.weight' is not in"),
    ("model-shard-missing", RUN + ["--model", "{m_shard_missing}"], {}, "model-00002-of-00002.safetensors' named in"),
    ("gguf-changed-type", GGUF_RUN + ["{g_type.gguf}"], {}, "tensor blk.0.attn_norm.weight is Q8_0"),
    ("gguf-extra-layer", GGUF_RUN + ["{g_layers3.gguf}"], {}, "the file has 3 layers"),
    ("gguf-as-model-changed-type", RUN + ["--model", "{g_type.gguf}"], {}, "must be one of F32, F16, BF16"),
    ("audit-gguf-nan-scale", ["audit", "--model", TINY2, "--variant", "gguf", "--gguf", "{g_nan.gguf}", "-q"], {},
     "tensor blk.1.ffn_gate_exps.weight expert 4 (Q4_K) holds"),
    ("unknown-command", ["nosuch"], {}, "No such command 'nosuch'"),
    ("unknown-option", ["run", "--frobnicate"], {}, "No such option"),
]


def _fill(value: str, files: dict[str, str]) -> str:
    for name, path in files.items():
        value = value.replace("{" + name + "}", path)
    assert "{" not in value, f"unknown placeholder in {value!r}"
    return value


def _check(exit_code: int, stderr: str, fragment: str, case: str) -> None:
    # Progress lines ("Opening model ...") may come first; the error is one line, the last.
    lines = stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("moetrace:")]
    assert exit_code == 2, f"{case}: exit {exit_code}, stderr {stderr!r}"
    assert "Traceback" not in stderr
    assert len(errors) == 1 and lines[-1] == errors[0], f"{case}: expected one error line last, got {lines!r}"
    assert errors[0].startswith("moetrace: error: "), errors[0]
    assert fragment in errors[0], f"{case}: {fragment!r} not in {errors[0]!r}"


def test_enough_distinct_cases():
    """The issue asks for at least 60 distinct bad-input cases."""
    assert len({c[0] for c in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize("case,args,env,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case, args, env, fragment, tmp_path, tmp_path_factory, monkeypatch):
    files = _files(tmp_path)
    if any("{m_" in a or "{g_" in a for a in args):
        files.update(_model_files(tmp_path_factory.mktemp("models")))
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, _fill(v, files))
    result = CliRunner().invoke(main, [_fill(a, files) for a in args])
    _check(result.exit_code, result.stderr, fragment, case)


SUBPROCESS_SAMPLE = ["run-name-parent", "prompts-not-utf8", "tokens-out-of-vocab", "variant-unknown-weights",
                     "quantize-output-folder", "env-cache-is-file", "max-tokens-negative"]


@pytest.mark.parametrize("case", SUBPROCESS_SAMPLE)
def test_bad_input_in_a_real_process(case, tmp_path):
    _, args, env, fragment = next(c for c in CASES if c[0] == case)
    files = _files(tmp_path)
    import os

    p = moetrace(*[_fill(a, files) for a in args], check=False,
                 env={**os.environ, **{k: _fill(v, files) for k, v in env.items()}})
    _check(p.returncode, p.stderr, fragment, case)


@pytest.mark.parametrize("args,code", [(["run", "--variant", "q9_k-bf16"], 2), (["variants"], 0), (["--help"], 0)])
def test_quick_answers_load_neither_torch_nor_xarray(args, code):
    """A typo's error, `moetrace variants` and `--help` answer before the heavy libraries load (the
    time to a one-line error is then the interpreter's start: benchmarks/bench_startup.py measures it)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom moetrace.cli.main import main\n"
             f"try:\n    main({args!r})\nexcept SystemExit as e:\n"
             "    print('RESULT', e.code, 'torch' in sys.modules, 'xarray' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert f"RESULT {code} False False" in p.stdout, (p.stdout[-500:], p.stderr[-500:])
