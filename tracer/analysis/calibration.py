"""Calibration figures of a reference trace: does the model behave like a trained LLM?

The built-in models are synthetic; their error figures mean something only if the quantities that
set how error shows at the output sit where a trained model's do. Measured on the reference's
free-running trace:

- ``entropy_mean``: mean entropy (nats) of the next-token distribution ``softmax(logits)``. A
  flat distribution over 256 bytes has ln 256 = 5.55 nats and any nudge flips its argmax; a
  trained byte- or small-vocabulary LM on text sits around 1-2.5 nats;
- ``top1_prob_mean`` and ``top1_peaked``: the mean top-1 probability and the share of tokens
  whose top-1 probability exceeds ``PEAKED`` (a trained LM is confident on many tokens);
- ``top1_margin_median``: the median logit gap between the first and second token (nats); the
  perturbation it takes to flip an argmax;
- ``resid_rms`` (layer,): RMS of the residual stream after each layer, token mean; real LLMs' grows
  with depth. ``massive_ratio`` (layer,): the largest channel's RMS over the median channel's, the
  "massive activations" of real residual streams (tens to thousands in trained models).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from moetrace.tracer.analysis.common import reference, require_sites
from moetrace.tracer.analysis.compare import log_softmax

PEAKED = 0.5  # a top-1 probability above one half: the model is more sure of one token than of all others


def calibration(ref: xr.Dataset) -> xr.Dataset:
    """The calibration figures of a reference trace (its free mode), see the module docstring.

    Returns:
        A Dataset of scalars ``entropy_mean``, ``entropy_median`` (nats), ``top1_prob_mean``,
        ``top1_peaked``, ``top1_margin_median`` (nats), ``resid_rms_growth`` (last layer's RMS over
        the first's) and (layer,) arrays ``resid_rms`` and ``massive_ratio``.
    """
    require_sites(ref, "reference", "logits", "resid")
    lp = log_softmax(np.asarray(reference(ref, "logits").values, dtype=np.float64))  # (token, vocab)
    p = np.exp(lp)
    entropy = -(p * lp).sum(-1)  # (token,)
    top2 = np.sort(lp, -1)[:, -2:]  # (token, 2): second, first
    resid = reference(ref, "resid").values.astype(np.float64)  # (layer, token, hidden)
    rms = np.sqrt((resid ** 2).mean(-1)).mean(-1)  # (layer,)
    ch = np.sqrt((resid ** 2).mean(1))  # (layer, hidden): each channel's RMS over tokens
    out = xr.Dataset(attrs={"model": ref.attrs.get("model", ""), "variant": ref.attrs.get("variant", "")})
    out["entropy_mean"] = entropy.mean()
    out["entropy_median"] = np.median(entropy)
    out["top1_prob_mean"] = np.exp(top2[:, 1]).mean()
    out["top1_peaked"] = (np.exp(top2[:, 1]) > PEAKED).mean()
    out["top1_margin_median"] = np.median(top2[:, 1] - top2[:, 0])
    out["resid_rms"] = ("layer", rms)
    out["resid_rms_growth"] = rms[-1] / rms[0]
    out["massive_ratio"] = ("layer", ch.max(-1) / np.median(ch, -1))
    return out


def format_calibration(cal: xr.Dataset) -> str:
    """Two lines: the output figures and the residual stream's RMS by layer."""
    rms = " ".join(f"{x:.3g}" for x in cal["resid_rms"].values)
    return (f"next-token entropy mean {float(cal['entropy_mean']):.2f} nats (median "
            f"{float(cal['entropy_median']):.2f}), top-1 p mean {float(cal['top1_prob_mean']):.2f}, "
            f"{100 * float(cal['top1_peaked']):.0f}% of tokens over {PEAKED}, top-1 margin median "
            f"{float(cal['top1_margin_median']):.2f} nats\n"
            f"residual RMS by layer: {rms} (x{float(cal['resid_rms_growth']):.1f}); massive channel / median "
            f"channel: {float(cal['massive_ratio'].min()):.1f}-{float(cal['massive_ratio'].max()):.1f}")
