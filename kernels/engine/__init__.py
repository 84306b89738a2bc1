"""Engine arithmetic: what inference engines compute with GGUF weights (see :func:`moetrace.kernels.matmul`).

- :mod:`.activations`: the activation quantizers (Q8_0, Q8_1, Q8_K), compiled and torch.
- :mod:`.cpu_torch`: ggml's generic vec_dot in torch, the fallback of the compiled integer dots.
- :mod:`.float_dots`: F32/F16/BF16 weights, which ggml dots in their own type.
"""
