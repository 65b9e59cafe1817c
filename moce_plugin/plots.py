"""PNG plots of routing: expert usage per layer (from ``moce_routing.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROUTING_LOG_NAME = "moce_routing.jsonl"
EXPERT_USAGE_PNG = "moce_expert_usage.png"


def plot_routing_log(output_dir: str | Path) -> Path | None:
    """Heatmap of expert load (layers x group/expert) averaged over the whole run, plus the
    aux loss over steps. Returns the PNG path, or None when nothing was logged."""
    path = Path(output_dir) / ROUTING_LOG_NAME
    if not path.is_file():
        return None
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(entries[-1]["layers"], key=int)
    rows, labels = [], None
    for layer in layers:
        seen = [e["layers"][layer] for e in entries if layer in e["layers"]]
        loads = [np.asarray(s["expert_load"]) for s in seen]
        tokens = [np.asarray(s["group_tokens"]) for s in seen]
        weighted = sum(load * tok[:, None] for load, tok in zip(loads, tokens))
        total = np.maximum(sum(tokens), 1)[:, None]
        mean_load = weighted / total  # [C, E]
        rows.append(mean_load.reshape(-1))
        if labels is None:
            groups, experts = mean_load.shape
            labels = [f"g{g}e{e}" for g in range(groups) for e in range(experts)]
    matrix = np.stack(rows)
    size = (max(8, 0.4 * matrix.shape[1] + 5), 4 + 0.15 * len(rows))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=size, gridspec_kw={"width_ratios": [3, 2]})
    im = ax0.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    ax0.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax0.set_yticks(range(len(layers)), [f"layer {i}" for i in layers], fontsize=7)
    ax0.set_title("share of each group's routing slots per expert")
    fig.colorbar(im, ax=ax0)
    steps = [e["step"] for e in entries]
    ax1.plot(steps, [e.get("aux_loss") for e in entries], marker="o")
    ax1.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax1.set_xlabel("step")
    ax1.set_title("load-balancing loss (1 = balanced)")
    fig.tight_layout()
    out = Path(output_dir) / EXPERT_USAGE_PNG
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
