"""Mapped checkpoint pages leave the resident set once their layer is done (memory flat in depth)."""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")


def mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of file ``path`` (from /proc/self/smaps)."""
    real = os.path.realpath(path)
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's first line
                inside = len(head) >= 6 and os.path.realpath(head[5]) == real
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def layer_bytes(source, layer: int) -> int:
    prefix = source.family.layer_prefix(layer)
    return sum(source.tensor(k).nbytes for k in source._index if k.startswith(prefix))


def test_release_layer_drops_the_layers_mapped_pages(tiny_source):
    shard = tiny_source.folder / "model.safetensors"
    one = layer_bytes(tiny_source, 1)
    # Page faults map up to fault_around_bytes (64 KiB) around the faulting page, so a neighbouring
    # layer's first and last pages can be resident without being read.
    slack = 2 * 65536 + 4 * os.sysconf("SC_PAGE_SIZE")
    with tiny_source.mapped():
        before = mapped_rss(shard)
        state = tiny_source.layer_state(1)
        for t in state.values():
            t.float().sum()  # touch every page
        held = mapped_rss(shard)
        assert held - before >= 0.9 * one, f"reading layer 1 mapped {held - before} bytes of {one}"
        del state
        advised = tiny_source.release_layer(1)
        assert advised >= one - slack
        after = mapped_rss(shard)
        assert after - before <= slack, f"{after - before} bytes of layer 1 still resident after release"


def test_release_outside_mapped_does_nothing(tiny_source):
    assert tiny_source.release_layer(0) == 0


def test_run_releases_every_layer(tmp_path, tiny_source, tiny_tokens, monkeypatch):
    """run_trace releases each layer once it is done, and the mapped pages never hold two layers."""
    from moetrace.tracer.execution.executor import RunConfig, run_trace

    shard = tiny_source.folder / "model.safetensors"
    one = layer_bytes(tiny_source, 0)
    seen, original = [], type(tiny_source).release_layer

    def spy(self, layer):
        seen.append((layer, mapped_rss(shard)))  # before this layer's release: at most this layer + globals
        return original(self, layer)

    monkeypatch.setattr(type(tiny_source), "release_layer", spy)
    run_trace(tiny_source, RunConfig(model="builtin:tiny", variants=["orig-bf16"]), tiny_tokens, tmp_path / "r",
              prefetch=False)
    assert [L for L, _ in seen] == list(range(tiny_source.num_layers))
    glob = sum(tiny_source.tensor(k).nbytes for k in tiny_source._index if not k.startswith("model.layers."))
    for L, rss in seen:
        assert rss <= one + glob + 2 * 65536 + 8 * os.sysconf("SC_PAGE_SIZE"), f"layer {L}: {rss} bytes mapped, one layer {one}"
