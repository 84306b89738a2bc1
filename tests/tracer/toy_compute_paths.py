"""Two compute paths defined outside the moetrace package, as a user's plug-in file would be.

Loaded by tests/tracer/test_compute_paths.py, in process (``compute.load_file``) and through
``MOETRACE_COMPUTE_PATHS`` in a real ``moetrace run`` subprocess.
"""

from __future__ import annotations

import torch

from moetrace.kernels import dequantize
from moetrace.kernels.compute import BlockWeight, ComputePath, WeightForm


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16 and back: what a linear that takes fp16 inputs sees."""
    return x.to(torch.float16).to(x.dtype)


class Fp16InputsPath(ComputePath):
    """Weights rounded to fp16, arithmetic in fp32, and every nn.Linear (and the output head)
    fed its input rounded to fp16: a module-level change made in ``prepare``."""

    name = "toy_fp16in"
    summary = "test path: fp16 weights, fp32 arithmetic, fp16-rounded linear inputs"
    dtype = torch.float32
    dequants = ("fp16",)
    default_dequant = "fp16"

    def prepare(self, layer):
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(lambda mod, args: (round_fp16(args[0]), *args[1:]))

    def head(self, norm, weight, hidden):
        return torch.nn.functional.linear(round_fp16(norm(hidden)), weight)[0]


class ExpertBlocksPath(ComputePath):
    """fp32 arithmetic that takes the experts as GGUF block bytes and dequantizes them itself in
    ``load``: the plumbing an engine path computing from block bytes uses."""

    name = "toy_blocks"
    summary = "test path: experts from GGUF block bytes, dequantized in load, fp32 arithmetic"
    dtype = torch.float32
    default_dequant = "fp32"
    seen: list = []  # (name, GGML type) of every block weight loaded, for the test

    def weight_form(self, role):
        return WeightForm(blocks=True) if role == "experts" else super().weight_form(role)

    def load(self, layer, state):
        dense = type(state)(state)
        dense.roles = getattr(state, "roles", {})
        for k, v in state.items():
            if isinstance(v, tuple):  # fused gate/up: gate then up, each (E, F, H)
                dense[k] = torch.cat([_dense(b) for b in v], dim=1)
                ExpertBlocksPath.seen.extend((k, b.ggml_type) for b in v)
            elif isinstance(v, BlockWeight):
                dense[k] = _dense(v)
                ExpertBlocksPath.seen.append((k, v.ggml_type))
        super().load(layer, dense)


def _dense(b: BlockWeight) -> torch.Tensor:
    q = torch.from_numpy(b.data.reshape(-1, b.data.shape[-1]))  # (n_mat * rows, bytes_per_row)
    return dequantize(q, b.ggml_type, b.shape[-1]).reshape(b.shape)
