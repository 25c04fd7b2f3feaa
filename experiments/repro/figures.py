"""The report's PNGs, after the papers' figures: validation curves (Fig. 2), test BPC against the
experts activated at evaluation (Fig. 3), router entropy per layer (Figs. 4-5) and the similarity of
the experts' outputs (representation collapse)."""

from __future__ import annotations

import math
from pathlib import Path

from competesmoe.common.errors import UserError
from competesmoe.experiments.repro.grid import label

Groups = dict[tuple[str, str], list[dict]]
"""Finished results by (method, variant), in grid order."""


def all_ks(groups: Groups) -> list[int]:
    """Every K of the runs' K sweeps."""
    return sorted({int(k) for v in groups.values() for r in v for k in r["k_sweep"]})


def write_figures(groups: Groups, out_dir: Path) -> list[str]:
    """Draw the figures into out_dir; their names (fig*.png without the suffix)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("the figures need matplotlib: pip install 'matplotlib>=3.7' (a dependency of the "
                        "package; then competesmoe repro --report-only draws them from the finished runs)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "figure.dpi": 100})
    style = _Style(groups, plt)
    names = [_save(_validation(groups, style), out_dir, "fig2_validation"),
             _save(_experts_at_eval(groups, style), out_dir, "fig3_experts_at_eval")]
    moe_keys = [k for k in groups if groups[k][0]["layers"]]
    if moe_keys:
        n_layers = max(len(groups[k][0]["layers"]) for k in moe_keys)
        names.append(_save(_router_entropy(groups, moe_keys, n_layers, style), out_dir, "fig4_router_entropy"))
        names.append(_save(_expert_similarity(groups, moe_keys, n_layers, style), out_dir, "fig5_expert_similarity"))
    return names


class _Style:
    """One colour per (method, variant); CompeteSMoE drawn thicker, the dense model dashed."""

    def __init__(self, groups: Groups, plt):
        keys = list(groups)
        self.plt = plt
        self.colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(keys)}
        self.styles = {k: "-" if k[0] == "competesmoe" else "--" if k[0] == "dense" else "-" for k in keys}
        self.widths = {k: 2.2 if k[0] == "competesmoe" else 1.2 for k in keys}


def _validation(groups: Groups, style: _Style):
    import numpy as np

    fig, ax = style.plt.subplots(figsize=(6.4, 4.0))
    for key in groups:
        curves = [dict(map(tuple, r["valid"])) for r in groups[key]]
        steps = sorted(set.intersection(*[set(c) for c in curves]))
        values = np.array([[c[s] for s in steps] for c in curves])
        ax.plot(steps, values.mean(0), style.styles[key], color=style.colors[key], lw=style.widths[key],
                label=label(key))
        if len(curves) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=style.colors[key], alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation BPC")
    last = [np.mean([r["valid_bpc"] for r in groups[k]]) for k in groups]
    ax.set_ylim(min(last) - 0.15, min(last) + 1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Validation BPC during training (mean over seeds, band min-max)")
    return fig


def _experts_at_eval(groups: Groups, style: _Style):
    import numpy as np

    fig, ax = style.plt.subplots(figsize=(6.4, 4.0))
    for key, results in groups.items():
        ks = sorted({int(k) for r in results for k in r["k_sweep"]})
        means = [np.mean([r["k_sweep"][str(k)] for r in results]) for k in ks]
        stds = [np.std([r["k_sweep"][str(k)] for r in results], ddof=1) if len(results) > 1 else 0 for k in ks]
        if key[0] == "dense":
            ax.axhline(means[0], ls="--", color=style.colors[key], lw=1.2, label=label(key))
            continue
        ax.errorbar(ks, means, yerr=stds, marker="o", ms=3, capsize=2, color=style.colors[key], lw=style.widths[key],
                    label=label(key))
    ax.set_xscale("log", base=2)
    ks = all_ks(groups)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("experts activated per token at evaluation (K)")
    ax.set_ylabel("test BPC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Test BPC vs experts at evaluation (trained with K = top_k)")
    return fig


def _router_entropy(groups: Groups, moe_keys: list, n_layers: int, style: _Style):
    import numpy as np

    fig, axes = style.plt.subplots(1, n_layers + 1, figsize=(3.0 * (n_layers + 1), 3.0))
    for key in moe_keys:
        results = groups[key]
        for li in range(n_layers):
            hist = np.sum([r["layers"][li]["entropy_hist"] for r in results], axis=0)
            max_ent = results[0]["layers"][li]["max_entropy"]
            edges = np.linspace(0, max_ent, len(hist) + 1)
            axes[li].stairs(hist / hist.sum(), edges, color=style.colors[key], lw=style.widths[key] * 0.8,
                            label=label(key))
            axes[li].set_title(f"MoE layer {li}: per-token entropy")
            axes[li].set_xlabel(f"router entropy (nats; max ln E = {max_ent:.2f})")
        means = [np.mean([r["layers"][li]["entropy_mean"] for r in results]) for li in range(n_layers)]
        axes[-1].plot(range(n_layers), means, marker="o", color=style.colors[key], lw=style.widths[key],
                      label=label(key))
    axes[0].set_ylabel("share of tokens")
    axes[-1].set_title("mean router entropy per layer")
    axes[-1].set_xlabel("MoE layer")
    axes[-1].set_xticks(range(n_layers))
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def _expert_similarity(groups: Groups, moe_keys: list, n_layers: int, style: _Style):
    import numpy as np

    cols = math.ceil(len(moe_keys) / 2)
    fig = style.plt.figure(figsize=(4.2 + 2.0 * cols, 4.4))
    spec = fig.add_gridspec(2, cols + 1, width_ratios=[2.2] + [1] * cols, wspace=0.35, hspace=0.45)
    line = fig.add_subplot(spec[:, 0])
    for key in moe_keys:
        results = groups[key]
        means = [np.mean([r["layers"][li]["similarity_mean"] for r in results]) for li in range(n_layers)]
        line.plot(range(n_layers), means, marker="o", color=style.colors[key], lw=style.widths[key], label=label(key))
    line.set_title("mean cosine between two experts' outputs")
    line.set_xlabel("MoE layer")
    line.set_xticks(range(n_layers))
    line.legend(fontsize=6)
    line.grid(alpha=0.3)
    heat = []
    for i, key in enumerate(moe_keys):
        ax = fig.add_subplot(spec[i % 2, 1 + i // 2])
        sim = np.array(groups[key][0]["layers"][-1]["similarity"])
        image = ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(f"{label(key)}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        heat.append(ax)
    fig.colorbar(image, ax=heat, shrink=0.7, label="cosine (last MoE layer, first seed)")
    return fig


def _save(fig, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / f"{name}.png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name
