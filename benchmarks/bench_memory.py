"""Peak resident memory and seconds per layer of `moetrace run`, against the number of layers.

Writes the Qwen3-30B-A3B-width built-in preset (hidden 2048, 32/4 heads of 128, 128 experts of
width 768, top-8; about 623 M parameters and 1.25 GB of BF16 per layer) to disk as a safetensors
checkpoint folder with per-expert keys, one shard per layer (as Qwen3-30B-A3B ships them), then
runs `moetrace run` on it in a subprocess for each layer count and reads the subprocess's peak
RSS from the kernel (os.wait4's ru_maxrss). Bounded memory means the peak is flat in the layer
count: about one layer's weights per variant plus activations.

The layers are written once for the largest count; the smaller models are folders of symlinks
to the first N layer shards, with their own config.json and index.

    python benchmarks/bench_memory.py [--layers 2,4,8] [--variants orig-bf16] [--tokens 256]
                                      [--dir SCRATCH] [--keep] [--gguf-file-type q8_0 --variants gguf-bf16]

Quantized variants are quantized in every run (MOETRACE_QCACHE=0 unless set otherwise), as in a
first run on a model.

Disk: 1.25 GB per layer of the largest count (deleted at the end unless --keep). Memory: a few
GB per run (one layer in BF16 as read, fp32 for the reference, one copy per variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def write_layers(folder: Path, n_layers: int, preset: str = "qwen3-30b-a3b", experts: int | None = None) -> None:
    """Write the preset's tensors with per-expert keys: one shard per layer plus one for the rest.

    Each shard is streamed by the built-in writer (header first, then one tensor at a time), so
    memory holds one layer's float32 expert weights, not the shard.
    """
    import itertools

    from moetrace.tracer.sources import builtin as builtin

    shape = builtin.parse_builtin(f"builtin:{preset}:layers={n_layers}").shape
    if shape.expert_keys == "fused":  # as Qwen3-30B-A3B ships; a packed preset (gpt-oss-20b) stays as published
        shape = dataclasses.replace(shape, expert_keys="per_expert")
    shape = dataclasses.replace(shape, experts=experts or shape.experts)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "done.json").is_file() and json.loads((folder / "done.json").read_text())["layers"] >= n_layers:
        return
    t0 = time.perf_counter()
    glob = []  # embeddings, final norm, head: small, written last

    def layer_of(entry):
        m = re.match(r"model\.layers\.(\d+)\.", entry[0])
        return int(m[1]) if m else None

    for i, entries in itertools.groupby(builtin.checkpoint_plan(shape), key=layer_of):
        if i is None:
            glob += [(name, dims, make()) for name, dims, make in entries]  # generated now: the plan is one pass
            continue
        path = folder / f"layer-{i:05d}.safetensors"
        if path.is_file():  # written whole by an earlier, interrupted call (renamed into place when done)
            continue
        builtin.write_safetensors(path.with_suffix(".partial"), entries)
        path.with_suffix(".partial").rename(path)
        print(f"  wrote layer {i} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    builtin.write_safetensors(folder / "globals.safetensors", [(n, d, (lambda a=a: a)) for n, d, a in glob])
    (folder / "shape.json").write_text(json.dumps(dataclasses.asdict(shape)))
    (folder / "done.json").write_text(json.dumps({"layers": n_layers}))


def model_folder(layers_dir: Path, out: Path, n: int, preset: str = "qwen3-30b-a3b") -> Path:
    """A checkpoint folder of the first ``n`` layers: config.json, index, symlinked shards."""
    from safetensors import safe_open

    from moetrace.tracer.sources import builtin as builtin

    fields = json.loads((layers_dir / "shape.json").read_text())
    # JSON made the family's config pairs lists; the shape holds them as tuples (nested pairs: a dict entry)
    fields["config"] = tuple((k, tuple(map(tuple, v)) if isinstance(v, list) else v) for k, v in fields.get("config", ()))
    shape = builtin.BuiltinShape(**fields)
    folder = out / f"{preset}-{n}layers"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shards = ["globals.safetensors"] + [f"layer-{i:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for s in shards:
        (folder / s).symlink_to((layers_dir / s).resolve())
        with safe_open(str(folder / s), framework="pt") as h:
            weight_map.update({k: s for k in h.keys()})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = builtin.hf_config_dict(dataclasses.replace(shape, layers=n))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def write_gguf_file(folder: Path, file_type: str) -> Path:
    """The checkpoint as a GGUF file of ``file_type``, written by `moetrace quantize`'s library call."""
    from moetrace.tracer.weights.gguf_writer import write_gguf
    from moetrace.tracer.sources.checkpoint import open_source

    path = folder.with_suffix(f".{file_type}.gguf")
    t = time.perf_counter()
    write_gguf(open_source(str(folder)), file_type, path, cache=False)
    print(f"  wrote {path.name} ({path.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - t:.0f} s)",
          file=sys.stderr, flush=True)
    return path


def run_once(folder: Path, variants: list[str], tokens: int, out: Path, gguf: Path | None = None,
             python: str = sys.executable) -> dict:
    """One `moetrace run` in a subprocess (of interpreter ``python``): peak RSS (bytes), wall time, per-layer seconds."""
    from moetrace.tracer.sources.prompts import DEMO_TEXT

    text = ((DEMO_TEXT + " ") * (tokens // len(DEMO_TEXT) + 2))[:tokens]  # byte-level vocabulary: 1 char = 1 token
    cmd = [python, "-m", "moetrace", "run", "--model", str(folder), "--text", text,
           "--max-tokens", str(tokens), "--out", str(out), "--run", folder.name]
    for v in variants:
        cmd += ["--variant", v]
    if gguf is not None:
        cmd += ["--gguf", str(gguf)]
    t = time.perf_counter()
    # Without the quantized-weight cache, so every run quantizes (as a first run on a model does).
    # A progress line per layer (MOETRACE_PROGRESS=lines) though stderr is a pipe: the per-layer seconds come from it.
    env = {**os.environ, "MOETRACE_QCACHE": os.environ.get("MOETRACE_QCACHE", "0"), "MOETRACE_PROGRESS": "lines"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    sampler = RssSampler(proc.pid)
    sampler.start()
    lines = []
    for line in proc.stderr:
        lines.append(line)
    sampler.stop()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"moetrace run failed ({proc.returncode}):\n{''.join(lines[-20:])}")
    per_layer = [float(m[1]) for m in (re.search(r"traced \(([\d.]+) s", ln) for ln in lines) if m]
    return {"peak_rss": usage.ru_maxrss * 1024, "wall": wall, "per_layer": per_layer, **sampler.peaks}


def layer_params(preset: str) -> int:
    """Parameters of the preset's largest decoder layer, from its family's shapes (DeepSeek's dense lead
    layer is smaller than its MoE layers)."""
    from types import SimpleNamespace

    import numpy as np

    from moetrace.tracer.sources import builtin as builtin

    shape = builtin.parse_builtin(f"builtin:{preset}").shape
    config = SimpleNamespace(**builtin.hf_config_dict(shape))
    fam = builtin.family(shape)
    return max(int(sum(np.prod(s) for s in fam.hf_layer_shapes(config, i).values()))
               for i in range(int(config.num_hidden_layers)))


class RssSampler(threading.Thread):
    """Samples a process's RssFile and RssAnon (/proc/PID/status) every ``interval`` seconds; keeps the peaks.

    The kernel keeps only the total's peak (VmHWM, ru_maxrss); its file-backed part (mapped
    checkpoint pages) and anonymous part (tensors) are sampled, so their peaks can miss a
    shorter spike than ``interval``.
    """

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peaks = {"peak_rss_file": 0, "peak_rss_anon": 0}
        self._halt = threading.Event()  # not _stop: Thread.join calls its own _stop()

    def run(self):
        while not self._halt.wait(self.interval):
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if line.startswith(("RssFile", "RssAnon")))
            except OSError:
                return
            for key, name in (("RssFile", "peak_rss_file"), ("RssAnon", "peak_rss_anon")):
                if key in fields:
                    self.peaks[name] = max(self.peaks[name], int(fields[key].split()[0]) * 1024)

    def stop(self):
        self._halt.set()
        self.join()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4,8", help="comma-separated layer counts")
    ap.add_argument("--model", default="qwen3-30b-a3b", help="the built-in preset whose widths to write "
                    "(qwen3-30b-a3b; moonlight-16b-a3b; gpt-oss-20b: MXFP4 experts, as published)")
    ap.add_argument("--variants", default="orig-bf16", help="comma-separated variants (reference orig-fp32 always)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a new temporary one; deleted unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the written layers for another run")
    ap.add_argument("--gguf-file-type", default=None,
                    help="also write each model as a GGUF file of this llama.cpp file type (e.g. q8_0) and trace "
                         "its gguf-* variants (give them in --variants, e.g. gguf-bf16)")
    ap.add_argument("--experts", type=int, default=None,
                    help="fewer experts than the preset's (same widths): a smaller layer for a quick probe; "
                         "give it a --dir of its own (written layers are reused)")
    ap.add_argument("--baseline-python", default=None, metavar="PYTHON",
                    help="also run each layer count with this interpreter (e.g. another checkout's .venv/bin/python, "
                         "whose moetrace is the baseline), interleaved, and report the ratios")
    args = ap.parse_args()

    if args.experts is not None and args.experts < 8:
        ap.error("--experts must be at least 8 (Qwen3-30B-A3B's top-k)")
    counts = sorted(int(x) for x in args.layers.split(","))
    variants = [v for v in args.variants.split(",") if v]
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-memory-"))
    layers_dir = root / ("layers" if args.model == "qwen3-30b-a3b" else f"layers-{args.model}")
    print(f"Writing {counts[-1]} {args.model}-width layers to {layers_dir} ...", file=sys.stderr)
    write_layers(layers_dir, counts[-1], args.model, args.experts)
    # the largest layer file: a family's dense lead layers (DeepSeek's layer 0) are smaller than its MoE layers
    layer_bytes = max(p.stat().st_size for p in layers_dir.glob("layer-*.safetensors"))
    results, baseline = {}, {}
    try:
        for n in counts:
            folder = model_folder(layers_dir, root / "models", n, args.model)
            gguf = write_gguf_file(folder, args.gguf_file_type) if args.gguf_file_type else None
            print(f"moetrace run: {n} layers, variants {', '.join(variants)}, {args.tokens} tokens ...",
                  file=sys.stderr, flush=True)
            if args.baseline_python:
                baseline[n] = b = run_once(folder, variants, args.tokens, root / "traces", gguf, args.baseline_python)
                shutil.rmtree(root / "traces", ignore_errors=True)
                print(f"  baseline: peak RSS {b['peak_rss'] / 2**30:.2f} GiB, {b['wall']:.1f} s", file=sys.stderr,
                      flush=True)
            results[n] = r = run_once(folder, variants, args.tokens, root / "traces", gguf)
            if gguf is not None:
                gguf.unlink()
            shutil.rmtree(root / "traces", ignore_errors=True)
            print(f"  peak RSS {r['peak_rss'] / 2**30:.2f} GiB, {r['wall']:.1f} s, per layer "
                  + " ".join(f"{x:.1f}" for x in r["per_layer"]), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    fp32_layer = 4 * layer_params(args.model)  # from the shapes: on disk a layer is BF16, or MXFP4 experts
    print(f"\n{args.model} widths, one layer = {layer_bytes / 2**30:.2f} GiB on disk "
          f"({fp32_layer / 2**30:.2f} GiB in fp32); reference orig-fp32, variants {', '.join(variants)}, "
          f"{args.tokens} tokens, all sites, torch threads from the default")
    print("peak RSS from the kernel (ru_maxrss); its file-backed (RssFile) and anonymous (RssAnon) parts sampled "
          "every 50 ms from /proc/PID/status")
    print(f"{'layers':>6} {'peak RSS GiB':>13} {'RssFile GiB':>12} {'RssAnon GiB':>12} {'x fp32 layer':>13} "
          f"{'x first':>8} {'wall s':>8} {'s/layer (median)':>17}")
    medians = []
    first = next(iter(results.values()))["peak_rss"]
    for n, r in results.items():
        pl = sorted(r["per_layer"])
        med = pl[len(pl) // 2] if pl else float("nan")
        medians += r["per_layer"]
        print(f"{n:>6} {r['peak_rss'] / 2**30:>13.2f} {r['peak_rss_file'] / 2**30:>12.2f} "
              f"{r['peak_rss_anon'] / 2**30:>12.2f} {r['peak_rss'] / fp32_layer:>13.2f} "
              f"{r['peak_rss'] / first:>8.3f} {r['wall']:>8.1f} {med:>17.2f}")
    if baseline:
        print(f"baseline ({args.baseline_python}), same runs interleaved:")
        for n, b in baseline.items():
            r = results[n]
            print(f"{n:>6} {b['peak_rss'] / 2**30:>13.2f} {b['peak_rss_file'] / 2**30:>12.2f} "
                  f"{b['peak_rss_anon'] / 2**30:>12.2f} {b['peak_rss'] / fp32_layer:>13.2f} "
                  f"{'':>8} {b['wall']:>8.1f}   this / baseline: peak RSS {r['peak_rss'] / b['peak_rss']:.2f}x, "
                  f"wall {r['wall'] / b['wall']:.2f}x")
    peaks = [r["peak_rss"] for r in results.values()]
    medians.sort()
    per = medians[len(medians) // 2] if medians else float("nan")
    print(f"peak RSS spread over layer counts: {(max(peaks) - min(peaks)) / 2**30:.2f} GiB "
          f"({(max(peaks) / min(peaks) - 1) * 100:.1f}%); target: within 10%, and under 3x one fp32 layer "
          f"plus activations")
    print(f"estimate for 48 layers: {48 * per:.0f} s ({48 * per / 60:.1f} min) of layers at {per:.2f} s/layer, "
          f"peak RSS about {max(peaks) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
