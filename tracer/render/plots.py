"""The report's PNG plots, drawn with matplotlib's Agg backend (no display needed).

Each function takes the analysis (:mod:`moetrace.tracer.analysis.summary`), writes one PNG and returns
its path. The noise-floor variant is drawn dashed and grey, so the other curves read against it;
a planted fault's layer is shaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moetrace.tracer.analysis.summary import FLOOR_VARIANT, RunAnalysis, VariantAnalysis

DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never a window, also on a desktop
    import matplotlib.pyplot as plt

    return plt


def _plant_layer(plant: str) -> int | None:
    try:
        return int(plant.split(":")[0]) if plant else None
    except ValueError:
        return None


def _shade_plant(ax, plant: str) -> None:
    layer = _plant_layer(plant)
    if layer is not None:
        ax.axvspan(layer - 0.4, layer + 0.4, color="tab:red", alpha=0.12, lw=0, label=f"planted fault ({plant})")


def _style(name: str, i: int) -> dict:
    if name == FLOOR_VARIANT:
        return {"color": "0.45", "ls": "--", "marker": "", "lw": 1.5}
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    # Distinct markers and sizes too: close variants (bf16 vs fp32 dequantization) overlap in colour.
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    return {"color": colors[i % len(colors)], "ls": "-", "marker": markers[i % len(markers)],
            "ms": 7 - 1.5 * (i % 3), "mfc": "none", "lw": 1.4}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _layer_ticks(ax, layers) -> None:
    step = max(1, int(np.ceil(len(layers) / 16)))
    ax.set_xticks(layers[::step])
    ax.set_xlabel("layer")


def plot_divergence(run: RunAnalysis, path) -> Path:
    """Propagated (free-mode) relative L2 error of the residual stream per layer, every variant."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    layers = None
    for i, a in enumerate(run.variants.values()):
        if "resid_rel_l2_mean" not in a.diff:
            continue
        layers = a.diff["layer"].values
        ax.plot(layers, a.diff["resid_rel_l2_mean"].values, label=a.name, **_style(a.name, i))
    _shade_plant(ax, run.plant)
    ax.set_yscale("log")
    ax.set_ylabel("relative L2 error (token mean)")
    ax.set_title(f"Divergence from {run.reference}, free-running\n{run.model}", fontsize=10)
    if layers is not None:
        _layer_ticks(ax, layers)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_decomposition(a: VariantAnalysis, run: RunAnalysis, path) -> Path:
    """Local, propagated and inherited error (top) and gain (bottom) per layer of one variant."""
    plt = _plt()
    dec = a.decomposition
    layers = dec["layer"].values
    fig, (ax, axg) = plt.subplots(2, 1, figsize=(9.5, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    i = int(np.nanargmax(dec["local"].values))
    colors = ["tab:red"] * len(layers)
    colors[i] = "darkred"  # the layer that injects the most error by itself
    ax.bar(layers, dec["local"].values, width=0.6, color=colors, alpha=0.6,
           label=f"local (teacher-forced); max at layer {layers[i]}")
    ax.plot(layers, dec["local_p99"].values, "_", color="darkred", ms=14, mew=2, ls="none",
            label="local, p99 over tokens")
    ax.plot(layers, dec["propagated"].values, "o-", color="tab:blue", ms=3, label="propagated (free)")
    ax.plot(layers, dec["inherited"].values, "s:", color="tab:green", ms=3, label="inherited (passed on)")
    if "routing_forced" in dec:
        ax.plot(layers, dec["routing_forced"].values, "^--", color="tab:purple", ms=3, lw=1,
                label="propagated, reference routing")
    if run.floor is not None and run.floor.decomposition is not None and a.name != FLOOR_VARIANT:
        ax.plot(layers, run.floor.decomposition["local"].values, color="0.45", ls="--", lw=1,
                label=f"local of {FLOOR_VARIANT} (noise floor)")
    _shade_plant(ax, run.plant)
    _shade_plant(axg, run.plant)
    ax.set_yscale("log")
    ax.set_ylabel("relative L2 error")
    ax.set_title(f"{a.name}: where the error is injected and where it grows", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axg.axhline(1.0, color="0.3", lw=0.8, label="gain 1: passed on unchanged")
    axg.plot(layers, dec["gain"].values, "o-", color="tab:orange", ms=3, label="gain")
    axg.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axg.set_ylabel("gain (inherited / incoming)")
    axg.grid(True, alpha=0.3)
    _layer_ticks(axg, layers)
    return _save(fig, Path(path))


def plot_routing(run: RunAnalysis, path) -> Path:
    """Set-flip and top-1 flip rates per layer (left, centre) and set-flip rate by margin (right)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for i, a in enumerate(run.variants.values()):
        rd = a.routing
        if rd is None:
            continue
        layers = rd["layer"].values
        st = _style(a.name, i)
        axes[0].plot(layers, rd["any_flip"].values, label=a.name, **st)
        axes[1].plot(layers, rd["top1_flip"].values, label=a.name, **st)
        ok = rd["bin_count"].values > 0
        centers = np.arange(rd.sizes["margin_bin"])
        axes[2].plot(centers[ok], rd["bin_flip_rate"].values[ok], label=a.name, **st)
        for ax in axes[:2]:
            _layer_ticks(ax, layers)
        labels = [f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">{lo:g}"
                  for lo, hi in zip(rd.margin_lo.values, rd.margin_hi.values)]
        axes[2].set_xticks(centers, labels, rotation=35, fontsize=7)
    for ax in axes[:2]:
        _shade_plant(ax, run.plant)
    axes[0].set_title("expert set changed (any flip)", fontsize=10)
    axes[1].set_title("top-1 expert changed", fontsize=10)
    axes[2].set_title("set flips by reference k/(k+1) margin", fontsize=10)
    axes[2].set_xlabel("router logit margin")
    for ax in axes:
        ax.set_ylabel("fraction of tokens")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, Path(path))


def plot_expert_load(a: VariantAnalysis, run: RunAnalysis, path) -> Path:
    """Heat map (layer x expert) of the tokens each expert gained (red) or lost (blue)."""
    plt = _plt()
    rd = a.routing
    ch = rd["load_change"].transpose("layer", "expert").values  # (layer, expert)
    lim = max(1, int(np.abs(ch).max()))
    n_layer, n_expert = ch.shape
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.22 * n_expert), min(10, 1.8 + 0.28 * n_layer)))
    im = ax.imshow(ch, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(np.arange(n_layer)[:: max(1, n_layer // 16)], rd["layer"].values[:: max(1, n_layer // 16)])
    ax.set_xticks(np.arange(n_expert)[:: max(1, n_expert // 32)], rd["expert"].values[:: max(1, n_expert // 32)])
    layer = _plant_layer(run.plant)
    if layer is not None and layer in rd["layer"].values:
        li = int(np.where(rd["layer"].values == layer)[0][0])
        ax.add_patch(plt.Rectangle((-0.5, li - 0.5), n_expert, 1, fill=False, ec="k", lw=1.2))
    fig.colorbar(im, ax=ax, label="tokens routed: variant - reference")
    boxed = "; box: planted layer" if layer is not None and layer in rd["layer"].values else ""
    ax.set_title(f"{a.name}: expert load change vs {run.reference} ({rd.attrs['mode']} mode{boxed})", fontsize=10)
    return _save(fig, Path(path))


def plot_kl_histogram(run: RunAnalysis, path) -> Path:
    """Histogram of KL(ref || variant) per token, log-spaced bins, every variant."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    kls = {a.name: a.kl_tokens for a in run.variants.values() if a.kl_tokens is not None}
    pos = np.concatenate([k[k > 0] for k in kls.values()]) if kls else np.array([])
    if pos.size:
        bins = np.logspace(np.log10(max(pos.min(), 1e-9)), np.log10(pos.max()) + 1e-9, 40)
        for i, (name, k) in enumerate(kls.items()):
            st = _style(name, i)
            ax.hist(np.clip(k, bins[0], None), bins=bins, histtype="step", lw=1.6, color=st["color"], ls=st["ls"],
                    label=f"{name} (mean {k.mean():.2e})")
            ax.axvline(k.mean(), color=st["color"], ls=":", lw=1)
        ax.set_xscale("log")
    ax.set_xlabel("KL(reference || variant) per token, nats")
    ax.set_ylabel("tokens")
    ax.set_title(f"Output divergence per token vs {run.reference} (dotted: means)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))
