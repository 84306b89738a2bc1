"""Scale searches shared by the K-quant formats (Q2_K, Q4_K, Q5_K), bit-exact with ggml-quants.c.

ggml chooses each sub-block's scale and min by a small search (``make_qkx2_quants``,
``make_qkx3_quants``) and, on the importance-matrix path, quantizes the super-block's
sub-block scales with ``make_qp_quants``. The functions here run those searches for many
sub-blocks at once. Every float operation is a float32 operation in the order ggml's C does
it (sums accumulate sequentially in element order, no fused multiply-add), so the chosen
candidates and all derived bytes match ggml bit for bit. The small helpers (``nearest_int``,
``rdiv``, ``div_by``, ``sqrt_f32``, ``seq_sum``) are the C expressions where torch's own
operators would round differently; ``split_over_threads`` spreads blocks over CPU threads.

Shape of the work: ggml's search steps depend on each other (a kept candidate's fitted min is
used by the steps after it), so the 16 to 37 steps run in order, each on all sub-blocks of a
chunk at once. The sequential sums walk the fixed 16 or 32 elements of a sub-block in Python,
so a sub-block's elements are stored element-major, ``(n, sub_blocks)``, and every loop step
touches contiguous memory. A step costs about sixteen passes over the chunk (codes, the three
weighted sums, the error), which bounds the speed of this eager formulation.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# ggml's GROUP_MAX_EPS: make_qp_quants treats a group whose largest value is below it as zero.
GROUP_MAX_EPS = 1e-15

# float32(1.5 * 2**23): ggml's nearest_int adds it and reads the low mantissa bits.
_MAGIC = 12582912.0

# The search runs on chunks of about this many elements (per CPU thread): on a CPU large
# enough that each torch op amortizes its dispatch, small enough that a step's working set
# (about ten arrays of the chunk's size) stays in the caches (measured best on 2-core Zen 4:
# 2**18 per thread); a GPU wants as much work per kernel as fits.
_CHUNK_ELEMS_PER_CPU_THREAD = 1 << 18
_CHUNK_ELEMS_GPU = 1 << 24

# Below this many super-blocks per part, splitting the work costs more than it saves.
MIN_BLOCKS_PER_PART = 1024


def split_over_threads(
    fn: Callable[..., torch.Tensor], *blocks: torch.Tensor | None, split: bool = True
) -> torch.Tensor:
    """Run a block function over ranges of blocks in parallel CPU threads, one torch thread each.

    The searches are long chains of small torch ops. Intra-op threading forks and joins at
    every op, which scales poorly and stalls outright whenever another process holds a core;
    independent block ranges in worker threads (torch releases the GIL inside ops) do not.
    Each worker sets its own torch thread count to 1 (a per-thread OpenMP setting); the
    caller's count is set again afterwards, which also restores the default new threads get.

    Args:
        fn: called as ``fn(*parts)`` on row ranges of ``blocks`` (None stays None); returns a
            tensor with one row per block.
        blocks: tensors with the same number of rows (blocks), or None.
        split: False runs everything as one part (still on one torch thread): for memory-bound
            work such as dequantization, where a second thread and the final concatenation
            cost more than they gain.

    Returns:
        The parts' results concatenated in order: the same as ``fn(*blocks)``, since every
        block is processed independently.
    """
    first = blocks[0]
    threads = torch.get_num_threads()
    nb = first.shape[0]
    if first.device.type != "cpu" or threads < 2:
        return fn(*blocks)
    # A few parts per thread so a thread slowed by another process does not hold up the rest;
    # a small input is one part, still run on one torch thread.
    parts = max(1, min(4 * threads, nb // MIN_BLOCKS_PER_PART)) if split else 1
    bounds = [nb * i // parts for i in range(parts + 1)]

    def work(i: int) -> torch.Tensor:
        torch.set_num_threads(1)
        a, b = bounds[i], bounds[i + 1]
        return fn(*(None if t is None else t[a:b] for t in blocks))

    try:
        with ThreadPoolExecutor(max_workers=min(threads, parts)) as pool:
            outs = list(pool.map(work, range(parts)))
    finally:
        torch.set_num_threads(threads)
    return outs[0] if parts == 1 else torch.cat(outs)


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``, reproduced bit for bit, as int32.

    For |f| < 2**22 it is round-half-to-even. Beyond that range, and for Inf and NaN, ggml's
    magic-number trick returns what its mantissa bits say (NaN and Inf give 0 or -2**22);
    ggml's release builds do not check the range, so neither does this.

    Args:
        f: float32 tensor of any shape.

    Returns:
        int32 tensor of the same shape.
    """
    v = (f + _MAGIC).view(torch.int32)
    return (v & 0x007FFFFF) - 0x00400000


def nearest_int_clamped(f: torch.Tensor, lo: int | None, hi: int) -> torch.Tensor:
    """``MAX(lo, MIN(hi, nearest_int(f)))`` as float32 (``lo=None``: only the MIN)."""
    l = nearest_int(f)
    l = l.clamp(min=lo, max=hi) if lo is not None else l.clamp(max=hi)
    return l.to(torch.float32)


def rdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """``num / t`` as one IEEE float32 division (torch's ``number / tensor`` multiplies by a
    reciprocal, which rounds twice)."""
    return torch.div(torch.tensor(num, dtype=torch.float32, device=t.device), t)


def div_by(t: torch.Tensor, den: float) -> torch.Tensor:
    """``t / den`` for a float32 constant as one IEEE division on every device (torch's CUDA
    kernel multiplies by the reciprocal of a Python-number divisor)."""
    return torch.div(t, torch.tensor(den, dtype=torch.float32, device=t.device))


def sqrt_f32(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``sqrtf``.

    torch's float32 sqrt on some CPUs (AVX-512 builds) is off by an ulp for a sixth of inputs.
    The square root of a float32 lies at least 2**-50 relative from any float32 rounding
    midpoint, so a float64 root accurate to a few ulps rounds to the correct float32.
    """
    return torch.sqrt(t.to(torch.float64)).to(torch.float32)


def fp16_round(f: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f))``: round to nearest-even fp16, overflow to Inf."""
    return f.to(torch.float16).to(torch.float32)


def running_max_from_zero(v: torch.Tensor) -> torch.Tensor:
    """``m = 0; for j: if (v[j] > m) m = v[j];`` over the last dim: (..., n) -> (...)."""
    m = torch.zeros(v.shape[:-1], dtype=torch.float32, device=v.device)
    for j in range(v.shape[-1]):
        vj = v[..., j]
        m = torch.where(vj > m, vj, m)
    return m


def seq_sum(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` in index order in float32, as a C ``for`` loop does (``dim`` removed)."""
    rows = v.unbind(dim)
    acc = rows[0].clone()
    for r in rows[1:]:
        acc += r
    return acc


def _search_multipliers(nmax: int, rmin: float, rdelta: float, nstep: int) -> np.ndarray:
    # ggml evaluates `rmin + rdelta*is + nmax` in float32, left to right.
    steps = np.arange(nstep + 1, dtype=np.float32)
    return (np.float32(rmin) + np.float32(rdelta) * steps) + np.float32(nmax)


def make_qkx_quants(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted scale-and-min search of many sub-blocks.

    Mirrors ggml's ``make_qkx2_quants`` and ``make_qkx3_quants`` (with weights), which differ
    only in the all-equal test (``max == min`` vs ``max <= min``, the same once ``min`` is
    clamped to <= 0). Start from iscale = nmax / (max - min), then for is = 0..nstep try
    iscale = (rmin + rdelta*is + nmax) / (max - min), fit scale and min by weighted least
    squares, and keep a candidate only when its error is strictly smaller. As in ggml, a kept
    candidate's fitted min replaces ``min`` for the steps after it, so the steps run in order.

    Args:
        x: (sub_blocks, n) float32 values.
        w: (sub_blocks, n) float32 weights.
        nmax: largest code (3, 15 or 31).
        rmin, rdelta, nstep: the search grid, as ggml's arguments.
        use_mad: weigh |error| instead of error**2.

    Returns:
        scale: (sub_blocks,) float32, the function's return value.
        the_min: (sub_blocks,) float32, ggml's ``*the_min`` (minus the fitted offset).
        L: (sub_blocks, n) uint8 codes of the chosen candidate.
    """
    # (n, sub_blocks): element-major, see the module docstring
    scale, the_min, L = make_qkx_quants_t(x.t().contiguous(), w.t().contiguous(), nmax, rmin, rdelta, nstep, use_mad)
    return scale, the_min, L.t()


def make_qkx_quants_t(
    xt: torch.Tensor,
    wt: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`make_qkx_quants` on element-major input: xt, wt (n, sub_blocks); L comes back (n, sub_blocks)."""
    n, n_sub = xt.shape
    mults = [float(c) for c in _search_multipliers(nmax, rmin, rdelta, nstep)]
    if xt.device.type == "cpu":
        chunk = max(1, _CHUNK_ELEMS_PER_CPU_THREAD * torch.get_num_threads() // n)
    else:
        chunk = max(1, _CHUNK_ELEMS_GPU // n)
    scale = torch.empty(n_sub, dtype=torch.float32, device=xt.device)
    the_min = torch.empty_like(scale)
    L = torch.empty((n, n_sub), dtype=torch.uint8, device=xt.device)
    # Chunks of thousands of sub-blocks bound memory and keep the working set in cache;
    # within a chunk everything is vectorized.
    for a in range(0, n_sub, chunk):
        b = min(n_sub, a + chunk)
        s, m, l = _qkx_chunk(xt[:, a:b].contiguous(), wt[:, a:b].contiguous(), nmax, mults, use_mad)
        scale[a:b] = s
        the_min[a:b] = m
        L[:, a:b] = l
    return scale, the_min, L


class _Codes:
    """Codes MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))) of one chunk.

    A float round equals ggml's nearest_int while |iscale*(x - min)| < 2**22. The extreme
    products of a sub-block come from its smallest and largest value (float subtraction and
    multiplication are monotonic), so checking those two per sub-block decides whether the
    cheap path is exact; otherwise (tiny or overflowing ranges, a fitted min far outside the
    data) the integer emulation runs.
    """

    def __init__(self, xt: torch.Tensor, nmax: int):
        self.xt = xt  # (n, b)
        self.nmax = nmax
        self.ext = torch.stack([xt.amin(0), xt.amax(0)])  # (2, b): smallest, largest value

    def __call__(self, iscale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the (n, b) codes for per-sub-block iscale, mn (b,) into ``out`` (float32)."""
        torch.sub(self.xt, mn, out=out)
        out.mul_(iscale)
        lo, hi = torch.stack(torch.aminmax((self.ext - mn) * iscale)).tolist()
        if lo > -4.0e6 and hi < 4.0e6:  # False for NaN too
            out.round_()
            if lo < -0.5 or hi >= self.nmax + 0.5:  # else every code is already in range
                out.clamp_(0, self.nmax)
            return out
        out.copy_(nearest_int(out).clamp_(0, self.nmax))
        return out


def _qkx_chunk(xt, wt, nmax, mults, use_mad):
    """make_qkx_quants on one chunk; xt, wt are (n, b). Returns scale (b,), the_min (b,), L (n, b) uint8."""
    n, nb = xt.shape
    dev = xt.device
    f32 = dict(dtype=torch.float32, device=dev)
    codes = _Codes(xt, nmax)
    xlo, mx = codes.ext

    sum_w = wt[0].clone()
    sum_x = sum_w * xt[0]
    for i in range(1, n):
        sum_w += wt[i]
        sum_x += wt[i] * xt[i]
    mn0 = torch.where(xlo > 0, torch.zeros_like(xlo), xlo)  # the sign of a zero min never reaches the output
    flat = mx <= mn0  # every value equal: scale 0, L 0, the_min = -min

    # State of the search, one row each: best error, the iscale and min that produced the
    # best codes, the best scale, and the current min. `cand` holds a step's candidate
    # in the same rows so one masked copy applies a win.
    state = torch.empty((5, nb), **f32)
    cand = torch.empty((5, nb), **f32)
    best, gen_iscale, gen_min, scale, mn = state.unbind(0)
    err, c_iscale, c_min, this_scale, this_min = cand.unbind(0)

    l = torch.empty((n, nb), **f32)
    e = torch.empty((n, nb), **f32)
    terms = torch.empty((n, 3, nb), **f32)  # per element: w*l, (w*l)*l, (w*l)*x
    acc = torch.empty((3, nb), **f32)  # sum_l, sum_l2, sum_xl
    dn = torch.empty((3, nb), **f32)  # D, and the numerators of scale and min
    ysl = torch.empty((2, nb), **f32)  # sum_l, sum_x

    # The initial candidate: codes from nmax/(max - min), scale = 1/iscale, the clamped min.
    mn.copy_(mn0)
    torch.div(_f32(nmax, dev), mx - mn, out=gen_iscale)
    torch.div(_f32(1.0, dev), gen_iscale, out=scale)
    gen_min.copy_(mn)
    codes(gen_iscale, mn, l)
    _weighted_error(l, scale, mn, xt, wt, use_mad, e, best)

    ysl[1] = sum_x
    t_rows = terms.view(n, 3 * nb).unbind(0)  # views made once: indexing in the loop costs
    acc_flat = acc.view(-1)
    for c in [_f32(c, dev) for c in mults]:
        torch.div(c, mx - mn, out=c_iscale)
        c_min.copy_(mn)
        codes(c_iscale, mn, l)
        torch.mul(l, wt, out=terms[:, 0])
        torch.mul(terms[:, 0], l, out=terms[:, 1])
        torch.mul(terms[:, 0], xt, out=terms[:, 2])
        acc_flat.copy_(t_rows[0])
        for t in t_rows[1:]:  # ggml's sequential sums, all three at once
            acc_flat += t
        sum_l, sum_l2, sum_xl = acc.unbind(0)

        # D = sum_w*sum_l2 - sum_l*sum_l, scale numerator sum_w*sum_xl - sum_x*sum_l,
        # min numerator sum_l2*sum_x - sum_l*sum_xl, each as ggml rounds it.
        ysl[0] = sum_l
        torch.sub(acc[1:] * sum_w, ysl * sum_l, out=dn[:2])
        torch.sub(sum_l2 * sum_x, sum_l * sum_xl, out=dn[2])
        D = dn[0]
        torch.div(dn[1:], D, out=cand[3:])
        pos = this_min > 0
        this_min.clamp_(max=0.0)  # `if (this_min > 0) this_min = 0`; NaN stays NaN as in C
        torch.where(pos, sum_xl / sum_l2, this_scale, out=this_scale)

        _weighted_error(l, this_scale, this_min, xt, wt, use_mad, e, err)

        # Kept only when D > 0 and strictly better (NaN never wins); the kept min is used
        # by the following steps.
        better = (D > 0) & (err < best)
        torch.where(better, cand, state, out=state)

    L = codes(gen_iscale, gen_min, l)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = L.masked_fill_(flat, 0.0)
    return scale, -mn, L.to(torch.uint8)


def _f32(v: float, dev) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=dev)


def _weighted_error(l, scale, mn, xt, wt, use_mad, e, out):
    """out = sum_i w*f(scale*l + min - x) in element order: l, xt, wt, e (n, b); scale, mn, out (b,)."""
    torch.mul(l, scale, out=e)
    e += mn
    e -= xt
    if use_mad:
        e.abs_()
    else:
        e.mul_(e)
    e *= wt
    rows = e.unbind(0)
    out.copy_(rows[0])
    for r in rows[1:]:
        out += r
    return out


def make_qp_quants(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the non-negative sub-block scales of many super-blocks to codes 0..nmax.

    Mirrors ggml's ``make_qp_quants``: a scale search over iscale = (0.1*is + nmax)/max for
    is = -4..4, then up to five passes that move single codes while that raises
    sumlx**2/suml2. Codes are kept as ggml's uint8 array keeps them (wrapped to 8 bits).

    Args:
        x: (groups, n) float32 values to quantize (sub-block scales or mins).
        w: (groups, n) float32 weights.
        nmax: largest code.

    Returns:
        scale: (groups,) float32 super-block scale (``sumlx / suml2``).
        L: (groups, n) int32 codes in 0..255.
    """
    ng, n = x.shape
    mx = torch.zeros(ng, dtype=torch.float32, device=x.device)
    for i in range(n):  # MAX(max, x[i]) from 0, in order
        mx = torch.where(mx > x[:, i], mx, x[:, i])
    zero = mx < GROUP_MAX_EPS
    iscale = rdiv(nmax, mx)  # (groups,)
    iscale_col = iscale[:, None]
    L = nearest_int(iscale_col * x) & 0xFF
    scale = rdiv(1.0, iscale)
    best = _qp_error(x, w, scale[:, None], L.to(torch.float32))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        c = float(np.float32(0.1) * np.float32(step) + np.float32(nmax))
        iscale_is = rdiv(c, mx)
        scale_is = rdiv(1.0, iscale_is)
        l = nearest_int_clamped(iscale_is[:, None] * x, None, nmax)
        mse = _qp_error(x, w, scale_is[:, None], l)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)

    li = nearest_int(iscale[:, None] * x).clamp(max=nmax)  # (groups, n) int32, may be negative
    lf = li.to(torch.float32)
    L = li & 0xFF
    sumlx = seq_sum(w * x * lf)
    suml2 = seq_sum(w * lf * lf)
    wx = w * x
    for _ in range(5):
        changed = torch.zeros(ng, dtype=torch.bool, device=x.device)
        for i in range(n):
            Li = L[:, i]
            Lf = Li.to(torch.float32)
            wi = w[:, i]
            slx = sumlx - wx[:, i] * Lf
            sl2 = suml2 - wi * Lf * Lf
            ok = (slx > 0) & (sl2 > 0)
            new_l = nearest_int(x[:, i] * sl2 / slx).clamp(max=nmax)
            ok &= new_l != Li
            nf = new_l.to(torch.float32)
            slx = slx + wx[:, i] * nf
            sl2 = sl2 + wi * nf * nf
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            L[:, i] = torch.where(ok, new_l & 0xFF, Li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
            changed |= ok
        # A group with no change in a pass would repeat it exactly, so ggml's per-group
        # early exit changes nothing; stop once no group changes.
        if not bool(changed.any()):
            break
    out = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    out = torch.where(zero, torch.zeros_like(out), out)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    return out, L


def _qp_error(x, w, scale, l):
    """sum_i w*diff*diff with diff = x - scale*l, in element order: (groups, n) -> (groups,)."""
    diff = x - scale * l
    return seq_sum(w * diff * diff)
