"""Build of moetrace's compiled block kernels; all metadata lives in setup.cfg.

The extension is optional: where no C compiler is present the install still succeeds and
moetrace.kernels falls back to its torch kernels (same bytes, slower). -ffp-contract=off keeps
the compiler from fusing a*b+c into one rounding, which would break bit-exactness with ggml.

kernels/csrc/layouts.h (block sizes and field offsets) is generated here from kernels/layouts.py,
the one table torch, Triton and C read; it is not committed, so it cannot drift from the table.
"""

import runpy
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "kernels" / "csrc"
KERNEL_SOURCES = ["module.c", "quant_kquant_qkx.c", "quant_qx.c", "dequant.c", "quant_mxfp4.c"]
ENGINE_SOURCES = ["engine_module.c", "engine_cpu.c", "engine_cuda.c"]


def write_layouts_header() -> None:
    """Write kernels/csrc/layouts.h from the table (only when its text changes, so make sees no new input)."""
    # Loaded by path: moetrace and torch need not be importable while building.
    text = runpy.run_path(str(ROOT / "kernels" / "layouts.py"))["c_header"]()
    header = CSRC / "layouts.h"
    if not header.exists() or header.read_text() != text:
        header.write_text(text)


class BuildExtWithLayouts(build_ext):
    """build_ext that generates the layout header first."""

    def run(self):
        write_layouts_header()
        super().run()


setup(
    cmdclass={"build_ext": BuildExtWithLayouts},
    ext_modules=[
        Extension(
            "moetrace.kernels._ckernels",
            sources=[f"kernels/csrc/{name}" for name in KERNEL_SOURCES],
            depends=[
                "kernels/layouts.py",
                "kernels/csrc/ckernels.h",
                "kernels/csrc/common.h",
                "kernels/csrc/quant_kquant_qkx_body.h",
            ],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        ),
        # llama.cpp CPU-backend emulation (moetrace.kernels.matmul): activation quantizers, integer dots;
        # and the CUDA backend's MMQ/MMVQ arithmetic on the CPU (moetrace.kernels.engine.cuda_q8_1).
        Extension(
            "moetrace.kernels._cengine",
            sources=[f"kernels/csrc/{name}" for name in ENGINE_SOURCES],
            depends=["kernels/layouts.py", "kernels/csrc/engine_cpu.h", "kernels/csrc/engine_cuda.h", "kernels/csrc/engine_decode.h", "kernels/csrc/common.h"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        ),
    ],
)
