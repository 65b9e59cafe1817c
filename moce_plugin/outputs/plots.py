"""PNG plots of routing: expert usage per layer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import FileFormatError, pyplot, read_jsonl
from .folder import EXPERT_USAGE_PNG, ROUTING_LOG_NAME


def mean_group_load(stats: list[dict]) -> np.ndarray:
    """Token-weighted mean of per-step ``expert_load`` [C, E] over ``group_tokens`` [C]."""
    loads = [np.asarray(s["expert_load"], dtype=float) for s in stats]
    tokens = [np.asarray(s["group_tokens"], dtype=float) for s in stats]
    weighted = sum(load * tok[:, None] for load, tok in zip(loads, tokens))
    return weighted / np.maximum(sum(tokens), 1)[:, None]


def draw_load_heatmap(ax: Any, fig: Any, loads: dict[str, np.ndarray], title: str) -> None:
    """Rows: layers; columns: group g / expert e; value: share of group g's slots on e."""
    layers = sorted(loads, key=int)
    matrix = np.stack([loads[i].reshape(-1) for i in layers])
    groups, experts = loads[layers[0]].shape
    labels = [f"g{g}e{e}" for g in range(groups) for e in range(experts)]
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers], fontsize=7)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)


def _figure_size(loads: dict[str, np.ndarray]) -> tuple[float, float]:
    first = next(iter(loads.values()))
    return max(8, 0.4 * first.size + 5), 4 + 0.15 * len(loads)


def plot_routing_log(output_dir: str | Path) -> Path | None:
    """Training-time expert load (averaged over the run) and the aux loss over steps, from
    ``moce_routing.jsonl``. Returns the PNG path, or None when nothing was logged."""
    path = Path(output_dir) / ROUTING_LOG_NAME
    if not path.is_file():
        return None
    try:
        entries = read_jsonl(path, "routing log")
    except FileFormatError as exc:  # e.g. a line cut by a killed run: no plot, no crash
        warnings.warn(f"{exc} No expert-usage plot.", stacklevel=2)
        return None
    if not entries:
        return None
    layers = sorted(entries[-1]["layers"], key=int)
    loads = {i: mean_group_load([e["layers"][i] for e in entries if i in e["layers"]])
             for i in layers}
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=_figure_size(loads),
                                   gridspec_kw={"width_ratios": [3, 2]})
    draw_load_heatmap(ax0, fig, loads, "share of each group's routing slots per expert")
    ax1.plot([e["step"] for e in entries], [e.get("aux_loss") for e in entries], marker="o")
    ax1.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax1.set_xlabel("step")
    ax1.set_title("load-balancing loss (1 = balanced)")
    fig.tight_layout()
    out = Path(output_dir) / EXPERT_USAGE_PNG
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_usage(loads: dict[str, np.ndarray], cluster_tokens: np.ndarray,
               source_by_cluster: dict[str, list[int]] | None, path: str | Path) -> Path:
    """Expert usage measured on a dataset: per-layer heatmap, tokens per cluster/group and,
    when the rows have a source, the cluster x source table."""
    plt = pyplot()
    ncols = 3 if source_by_cluster else 2
    width, height = _figure_size(loads)
    fig, axes = plt.subplots(1, ncols, figsize=(width + 4 * (ncols - 1), height),
                             gridspec_kw={"width_ratios": [3] + [2] * (ncols - 1)})
    draw_load_heatmap(axes[0], fig, loads, "expert usage: share of each group's slots")
    axes[1].bar(range(len(cluster_tokens)), cluster_tokens)
    axes[1].set_xlabel("cluster / expert group")
    axes[1].set_title("tokens per group")
    if source_by_cluster:
        sources = sorted(source_by_cluster)
        table = np.array([source_by_cluster[s] for s in sources], dtype=float)
        table = table / np.maximum(table.sum(1, keepdims=True), 1)
        im = axes[2].imshow(table, aspect="auto", cmap="magma", vmin=0, vmax=1)
        axes[2].set_yticks(range(len(sources)), sources, fontsize=7)
        axes[2].set_xlabel("cluster")
        axes[2].set_title("rows of each source per cluster")
        fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
