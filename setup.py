"""Build of moetrace's compiled block kernels; all metadata lives in setup.cfg.

The extension is optional: where no C compiler is present the install still succeeds and
moetrace.kernels falls back to its torch kernels (same bytes, slower). -ffp-contract=off keeps
the compiler from fusing a*b+c into one rounding, which would break bit-exactness with ggml.
"""

from setuptools import Extension, setup

KERNEL_SOURCES = ["module.c", "quant_kquant_qkx.c", "quant_qx.c", "dequant.c"]

setup(
    ext_modules=[
        Extension(
            "moetrace.kernels._ckernels",
            sources=[f"kernels/csrc/{name}" for name in KERNEL_SOURCES],
            depends=["kernels/csrc/ckernels.h", "kernels/csrc/common.h", "kernels/csrc/quant_kquant_qkx_body.h"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        )
    ]
)
