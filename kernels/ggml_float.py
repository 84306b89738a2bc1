"""ggml's float32 arithmetic in torch: the C expressions where torch's own operators round differently.

Every torch search and quantizer of moetrace (search_qkx, search_qp, search_qx, formats_*) builds on
these helpers, so that each float operation is the float32 operation ggml-quants.c performs, in the
same order: sums accumulate from ``0.0f`` in index order (float addition does not reassociate),
divisions and square roots are correctly rounded, and rounding to integers follows ggml's
``nearest_int`` (half to even) or C's ``roundf`` (half away from zero) as the C code says.
"""

from __future__ import annotations

import numpy as np
import torch

# ggml's GROUP_MAX_EPS: a group whose largest magnitude is below it quantizes to zero.
GROUP_MAX_EPS = 1e-15

# float32(1.5 * 2**23): ggml's nearest_int adds it and reads the low mantissa bits.
_MAGIC = 12582912.0


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``, bit for bit, as int32.

    For |f| < 2**22 it is round-half-to-even. Beyond that range, and for Inf and NaN, ggml's
    magic-number trick returns what its mantissa bits say (NaN and Inf give 0 or -2**22); ggml's
    release builds do not check the range, so neither does this, and out-of-range corner cases
    still match after clamping.
    """
    return ((f + _MAGIC).view(torch.int32) & 0x007FFFFF) - 0x00400000


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero) on float32, exact for |v| < 2**31: trunc, then step if the fraction is >= 0.5."""
    r = v.to(torch.int32).to(torch.float32)  # truncation toward zero (torch.trunc is much slower on CPU)
    frac = v - r  # exact: the fraction of a float is representable
    return r + torch.where(frac.abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def fdiv(num: float, den: torch.Tensor) -> torch.Tensor:
    """C's ``num / den`` for a float32 constant ``num``: one IEEE float32 division.

    ``python_scalar / tensor`` in torch is ``tensor.reciprocal() * scalar``, which rounds twice and
    differs from the C quotient in about a quarter of cases (e.g. ``15.0 / t``); a 0-d tensor
    numerator takes the correctly rounded division kernel.
    """
    return torch.div(torch.tensor(num, dtype=torch.float32, device=den.device), den)


def fdiv_by(num: torch.Tensor, den: float) -> torch.Tensor:
    """C's ``num / den`` for a float32 constant ``den``: one IEEE division on every device.

    On CUDA, ``tensor / python_scalar`` multiplies by the scalar's reciprocal (one rounding too
    many unless ``den`` is a power of two); a 0-d tensor on the same device divides.
    """
    return torch.div(num, torch.tensor(den, dtype=torch.float32, device=num.device))


def sqrtf(v: torch.Tensor) -> torch.Tensor:
    """C ``sqrtf``: the correctly rounded float32 square root.

    ``torch.sqrt`` on float32 CPU tensors is not correctly rounded on some builds (about one result
    in six is off by an ulp with AVX-512), which flips ggml's exact-tie comparisons downstream. The
    float64 root, correctly rounded and then rounded to float32, equals the correctly rounded
    float32 root (53 >= 2*24 + 2 bits, so the double rounding is innocuous).
    """
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def fp16_round(f: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f))``: round to nearest-even fp16, overflow to Inf."""
    return f.to(torch.float16).to(torch.float32)


def f32(v: float) -> np.float32:
    """A C float literal (``0.1f``): the float32 nearest ``v``, for constants computed in float32."""
    return np.float32(v)


def f32_tensor(v: float, device) -> torch.Tensor:
    """A 0-d float32 tensor: as an operand it keeps torch from rewriting a division as a reciprocal multiply."""
    return torch.tensor(v, dtype=torch.float32, device=device)


def seq_sum(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``float s = 0; for (i) s += t[i];`` along ``dim``: float32, index order, from ``+0.0`` (``dim`` removed).

    Starting from ``+0.0`` (not from ``t[0]``) matters when every term is ``-0.0``: C then sums to ``+0.0``.
    """
    rows = t.unbind(dim)
    acc = torch.zeros_like(rows[0])
    for r in rows:
        acc += r
    return acc


def running_max_from_zero(v: torch.Tensor) -> torch.Tensor:
    """``m = 0; for j: if (v[j] > m) m = v[j];`` over the last dim: (..., n) -> (...)."""
    m = torch.zeros(v.shape[:-1], dtype=torch.float32, device=v.device)
    for j in range(v.shape[-1]):
        vj = v[..., j]
        m = torch.where(vj > m, vj, m)
    return m


def first_absmax(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed value and magnitude of the first element of largest magnitude along ``dim``.

    Mirrors ggml's ``if (ax > amax) { amax = ax; max = x[i]; }`` loop started from zero:
    ``argmax`` returns the first maximal index, as the strict comparison keeps the first,
    and an all-zero column keeps the initial ``+0.0``.

    Args:
        x: (n, G) float32 (or (G, n) with ``dim=1``).

    Returns:
        max: (G,) signed value; amax: (G,) its magnitude.
    """
    ax = x.abs()
    if dim == 0:
        # ggml's loop itself, vectorized across columns: cheaper than argmax along dim 0.
        amax, mx = torch.zeros_like(ax[0]), torch.zeros_like(x[0])
        for i in range(x.shape[0]):
            take = ax[i] > amax
            amax = torch.where(take, ax[i], amax)
            mx = torch.where(take, x[i], mx)
        return mx, amax
    idx = ax.argmax(dim, keepdim=True)
    mx, amax = x.gather(dim, idx).squeeze(dim), ax.gather(dim, idx).squeeze(dim)
    # ggml never updates max when every |x| is 0: it stays +0.0 even if the first element is -0.0.
    return torch.where(amax > 0, mx, torch.zeros_like(mx)), amax


def first_extreme(x: torch.Tensor, largest: bool, dim: int = 0) -> torch.Tensor:
    """min (or max) along ``dim``, choosing the first of equal values (-0.0 vs 0.0) like ggml's ``v < min`` loop.

    Args:
        x: (n, G) float32 (or (G, n) with ``dim=1``).

    Returns:
        (G,) float32.
    """
    m = x.amax(dim, keepdim=True) if largest else x.amin(dim, keepdim=True)
    idx = (x == m).to(torch.uint8).argmax(dim, keepdim=True)  # first index equal to the extreme
    return x.gather(dim, idx).squeeze(dim)
