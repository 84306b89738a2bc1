"""Checkpoint folders as users bring them: per-expert keys, shards with an index, their own tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import moetrace
from moetrace.errors import MoetraceError
from moetrace.tracer.sources.checkpoint import CheckpointSource, HFTokenizer, open_source


def write_per_expert_folder(source, folder, shards: int = 3) -> None:
    """Write ``source`` with per-expert keys (as Qwen3-30B-A3B ships), sharded with an index file."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: source.tensor(k) for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    for L in range(source.num_layers):
        p = f"model.layers.{L}."
        for k, t in source.layer_state(L).items():
            if k == "mlp.experts.gate_up_proj":  # (E, 2I, H)
                half = t.shape[1] // 2
                for e in range(t.shape[0]):
                    tensors[f"{p}mlp.experts.{e}.gate_proj.weight"] = t[e, :half].clone()
                    tensors[f"{p}mlp.experts.{e}.up_proj.weight"] = t[e, half:].clone()
            elif k == "mlp.experts.down_proj":  # (E, H, I)
                for e in range(t.shape[0]):
                    tensors[f"{p}mlp.experts.{e}.down_proj.weight"] = t[e].clone()
            else:
                tensors[p + k] = t
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]  # tensors of one layer spread over every shard
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(source.folder / "config.json", folder / "config.json")


@pytest.fixture(scope="module")
def per_expert_folder(tmp_path_factory, tiny_source):
    folder = tmp_path_factory.mktemp("ckpt") / "per-expert"
    write_per_expert_folder(tiny_source, folder)
    return folder


def test_per_expert_keys_fuse_to_the_same_layer_state(per_expert_folder, tiny_source):
    src = CheckpointSource(per_expert_folder)
    assert any(".experts.0.gate_proj." in k for k in src._index)
    for L in range(src.num_layers):
        got, want = src.layer_state(L), tiny_source.layer_state(L)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"layer {L} {k}"


def test_per_expert_sharded_folder_matches_transformers_forward(per_expert_folder, tiny_tokens, tmp_path):
    """Reference logits of a per-expert, sharded folder equal transformers' own from_pretrained forward, bit for bit.

    transformers fuses the per-expert keys through its conversion mapping (stack + concatenate,
    exact in BF16) and runs the same decoder-layer modules in fp32, so no tolerance is needed.
    """
    from transformers import AutoModelForCausalLM

    from moetrace.tracer.execution.executor import RunConfig, run_trace

    src = open_source(str(per_expert_folder))
    stores = run_trace(src, RunConfig(model=str(per_expert_folder), variants=[], sites=["logits"]), tiny_tokens,
                       tmp_path / "run")
    logits = moetrace.open_trace(stores["orig-fp32"]).logits.sel(mode="free").values
    model = AutoModelForCausalLM.from_pretrained(str(per_expert_folder), dtype=torch.float32).eval()
    for s, ids in enumerate(tiny_tokens.sequences()):
        with torch.no_grad():
            expect = model(torch.from_numpy(ids).unsqueeze(0)).logits[0].numpy()
        got = logits[tiny_tokens.seq == s]
        assert np.array_equal(got, expect), f"sequence {s}: max abs diff {np.abs(got - expect).max()}"


def test_missing_expert_key_is_named(per_expert_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(per_expert_folder, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    victim = "model.layers.2.mlp.experts.5.up_proj.weight"
    shard = index["weight_map"].pop(victim)
    tensors = load_file(str(bad / shard))
    del tensors[victim]
    save_file(tensors, str(bad / shard))
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    src = CheckpointSource(bad)
    src.layer_state(1)
    with pytest.raises(MoetraceError, match=r"lacks model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        src.layer_state(2)


def test_shard_missing_from_index(per_expert_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(per_expert_folder, bad)
    (bad / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MoetraceError, match=r"shard 'model-00002-of-00003\.safetensors' named in .* is missing"):
        CheckpointSource(bad)


def test_folder_without_config(tmp_path, tiny_source):
    (tmp_path / "m").mkdir()
    shutil.copy(tiny_source.folder / "model.safetensors", tmp_path / "m")
    with pytest.raises(MoetraceError, match="has no config.json"):
        open_source(str(tmp_path / "m"))
    with pytest.raises(MoetraceError, match="does not exist"):
        open_source(str(tmp_path / "nowhere"))


def _local_tokenizer_files(folder):
    """A small word-level tokenizer built here with the `tokenizers` package (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "experts", "route", "tokens", ",", "quantization", "error", "grows", "layer", "by", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))
    return {w: i for i, w in enumerate(words)}


def test_checkpoint_tokenizer_from_local_files(tmp_path, tiny_source):
    """A folder with its own tokenizer files is tokenized with them, and their token texts are recorded."""
    from moetrace.tracer import api

    folder = tmp_path / "with-tokenizer"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        (folder / f).symlink_to(tiny_source.folder / f)
    vocab = _local_tokenizer_files(folder)
    src = open_source(str(folder))
    assert isinstance(src.tokenizer, HFTokenizer)
    assert src.tokenizer.encode("experts route tokens, error grows.") == [
        vocab[w] for w in ("experts", "route", "tokens", ",", "error", "grows", ".")]
    assert src.tokenizer.encode("unknown words") == [0, 0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "quantization error grows layer by layer ."}\nexperts route tokens\n')
    result = api.run(model=str(folder), variants=["orig-bf16"], prompts_file=str(prompts), out_dir=str(tmp_path),
                     run_name="tok", sites=["resid", "logits"])
    ds = moetrace.open_trace(result.stores["orig-fp32"])
    assert list(ds.token_text.values) == ["quantization", "error", "grows", "layer", "by", "layer", ".",
                                          "experts", "route", "tokens"]
    assert list(ds.seq.values) == [0] * 7 + [1] * 3 and list(ds.pos.values) == list(range(7)) + [0, 1, 2]
    assert list(ds.token_id.values[:3]) == [vocab["quantization"], vocab["error"], vocab["grows"]]


def test_mapped_tensors_equal_safetensors_own_reads_and_writes_stay_private(tiny_source):
    """Layer tensors are views of a copy-on-write map of the shard: equal to what safetensors itself
    reads, and writing to one changes neither the file nor the next read."""
    from safetensors import safe_open

    import torch

    folder = tiny_source.folder
    for L in range(tiny_source.num_layers):
        state = tiny_source.layer_state(L)
        for key, t in state.items():
            name = f"model.layers.{L}.{key}"
            shard = tiny_source._index[name]
            with safe_open(str(folder / shard), framework="pt") as h:
                want = h.get_tensor(name)
            assert t.dtype == want.dtype and torch.equal(t, want), name
    before = {p: p.read_bytes() for p in folder.glob("*.safetensors")}
    t = tiny_source.layer_state(0)["input_layernorm.weight"]
    original = t.clone()
    t.add_(1.0)
    assert torch.equal(tiny_source.layer_state(0)["input_layernorm.weight"], original)
    assert {p: p.read_bytes() for p in folder.glob("*.safetensors")} == before


def test_mapped_block_keeps_one_map_per_shard_and_reads_the_same_values(tiny_source):
    """Inside ``mapped()`` every read of a shard views one map (the executor's runs); the values equal
    the reads outside it, a nested block shares the outer maps, and after the block reads are again
    private maps of their own."""
    import torch

    outside = [tiny_source.layer_state(L) for L in range(2)]
    with tiny_source.mapped():
        inside = [tiny_source.layer_state(L) for L in range(2)]
        maps = dict(tiny_source._session_maps)
        with tiny_source.mapped():
            tiny_source.layer_state(0)
            assert tiny_source._session_maps == maps  # the outer block owns them
        shards = {tiny_source._index[f"model.layers.{L}.{k}"] for L in range(2) for k in inside[L]}
        assert set(maps) == shards and all(m.mm is not None for m in maps.values())
    assert tiny_source._session_maps is None
    for a, b in zip(outside, inside):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t = tiny_source.layer_state(0)["input_layernorm.weight"]
    original = t.clone()
    t.add_(1.0)
    assert torch.equal(tiny_source.layer_state(0)["input_layernorm.weight"], original)
