"""The device a run computes on (``--device``): ``cpu``, ``cuda`` or ``cuda:N``.

The executor builds every layer's tensors, the activations, masks and position embeddings on it;
weights are read and derived on the CPU (memory-mapped checkpoints, the C quantizers) and copied
into each layer's tensors there. Engine paths emulate their arithmetic on whatever device the
activations are on (the integer dots as exact float32 batched matmuls, Marlin's and cuBLAS's
products in torch); the ``llamacpp_cpu`` path's dots stay in the CPU kernels, whose results it
copies back. Trace stores are always written from host memory.
"""

from __future__ import annotations

import re

from moetrace.errors import MoetraceError

_SYNTAX = re.compile(r"cpu|cuda(:\d+)?")
VALID = "cpu, cuda, cuda:N"


def check_name(name: str) -> str:
    """The device name, checked for syntax only (no torch import): raises MoetraceError for another word."""
    if not isinstance(name, str) or not _SYNTAX.fullmatch(name):
        raise MoetraceError(f"unknown device {name!r}; valid devices: {VALID}")
    return name


def resolve(name: str):
    """The torch device of ``name``, checked against what this machine has.

    Raises:
        MoetraceError: a bad name, CUDA asked for where torch has none, or an index past the
            visible devices (one line, naming the valid choices).
    """
    import torch

    check_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise MoetraceError(f"--device {name}: {why} (torch {torch.__version__}); valid here: cpu")
    dev = torch.device(name)
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise MoetraceError(f"--device {name}: this machine has {count} CUDA device(s); valid: cpu, cuda, "
                            f"{', '.join(f'cuda:{i}' for i in range(count))}")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
