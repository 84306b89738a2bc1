"""Token statistics: bootstrap confidence intervals over tokens.

The headline figures of a trace (mean KL, top-1 agreement, ...) are averages over a few hundred
to a few thousand tokens, so two variants can differ by chance in the text that was traced. A
percentile bootstrap over tokens says how much: resample the tokens with replacement, recompute
the figure, and take the central ``level`` interval of the resampled figures. It is seeded, so a
report is reproducible.

Tokens of one sequence are not independent (a derailed generation stays derailed), so these
intervals are somewhat too narrow on short texts; they are still the right scale for telling
a real difference from noise, and they shrink as ``1/sqrt(tokens)`` when more text is traced.
"""

from __future__ import annotations

import numpy as np

from moetrace.errors import MoetraceError

N_RESAMPLES = 1000
LEVEL = 0.95
# Resample in batches of at most this many drawn values, so memory stays bounded on long traces.
_BATCH_VALUES = 4_000_000

_STATS = {
    "mean": np.mean,
    "median": np.median,
    "p99": lambda a, axis: np.quantile(a, 0.99, axis=axis),
    "max": np.max,
}


def bootstrap_ci(values, stat="mean", n_resamples: int = N_RESAMPLES, seed: int = 0,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``stat`` over tokens.

    Args:
        values: (token,) per-token values; NaN entries (tokens without a value, such as the
            last token of a sequence for next-token figures) are dropped first.
        stat: ``"mean"``, ``"median"``, ``"p99"``, ``"max"``, or a callable ``f(array, axis)``.
        n_resamples: number of bootstrap resamples.
        seed: seed of the resampling (numpy's PCG64), so the interval is reproducible.
        level: the interval's coverage, e.g. 0.95.

    Returns:
        (low, high); (nan, nan) when no finite value is left.
    """
    fn = _STATS[stat] if isinstance(stat, str) else stat
    if not 0 < level < 1:
        raise MoetraceError(f"confidence level {level} must be between 0 and 1 (e.g. 0.95)")
    if n_resamples < 1:
        raise MoetraceError(f"n_resamples {n_resamples} must be at least 1 (e.g. 1000)")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    n = v.size
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    per_batch = max(1, _BATCH_VALUES // n)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, per_batch):
        stop = min(start + per_batch, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))  # (resamples, token)
        out[start:stop] = fn(v[idx], axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(out, [alpha, 1 - alpha])
    return float(lo), float(hi)


def with_ci(values, stat="mean", n_resamples: int = N_RESAMPLES, seed: int = 0,
            level: float = LEVEL) -> tuple[float, float, float]:
    """(point estimate, low, high) of ``stat`` over the finite entries of ``values``."""
    fn = _STATS[stat] if isinstance(stat, str) else stat
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    point = float(fn(v, axis=0)) if v.size else float("nan")
    lo, hi = bootstrap_ci(v, stat, n_resamples, seed, level)
    return point, lo, hi
