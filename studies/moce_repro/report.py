"""Build docs/results.md from the reproduction runs' metrics.

    python -m studies.moce_repro.report

Regenerates the parts of docs/results.md between the ``generated`` markers (the
single-seed tables and figures; left as they are when none of those runs is here) and the
``study`` markers (the seeded study: verdict, intervals, longer runs, hypothesis; or its
commands and estimated time while its runs are pending), and leaves the hand-written
reading around them alone. Figures go to docs/img/reproduce/, the metrics of every run to
docs/results/metrics.json (merged with the runs recorded there before).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .repro_config import (
    CLUSTERS,
    DOMAIN_NAMES,
    DOMAINS,
    ROOT,
    RUNS,
    RUNS_DIR,
    SETTINGS_FILE,
    TRAIN_FILE,
    Settings,
    read_jsonl,
)

DOC = ROOT / "docs" / "results.md"
START, END = "<!-- generated:start -->", "<!-- generated:end -->"

MAIN = ["base", "lora", "lora_mlp", "pesc", "moce", "moce_v", "moce_acmoe"]
ABLATIONS = {
    "Token routing inside a group (Table 4 direction)": ["moce_top1", "moce", "moce_soft"],
    "Experts per group (Table 3 direction)": ["moce_e1", "moce_e2", "moce"],
    "Clustering and token routing": ["pesc", "moce_e1", "moce"],
    "Router": ["moce", "moce_acmoe"],
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rounded(value: Any) -> Any:
    """Floats to 5 significant digits: the committed metrics stay small."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def load_metrics() -> dict[str, dict[str, Any]]:
    """Every run with metrics: the single-seed runs and the seeded ones (name@sN)."""
    found = {}
    for path in sorted(RUNS_DIR.glob("*/metrics.json")):
        found[path.parent.name] = json.loads(path.read_text())
    return found


def recorded_seeded_runs(raw: Path) -> dict[str, dict[str, Any]]:
    """Seeded runs already recorded in the committed metrics (outputs/ is not in git): a
    report from a checkout that ran only some of them keeps the others."""
    if not raw.is_file():
        return {}
    return {n: r for n, r in json.loads(raw.read_text()).items() if "@s" in n}


def legacy_runs(m: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: r for n, r in m.items() if n in RUNS}


def fmt_params(n: int | None) -> str:
    return "-" if not n else f"{n / 1e6:.1f} M"


def metric_table(names: list[str], m: dict[str, dict]) -> list[str]:
    head = ("| run | " + " | ".join(f"{DOMAIN_NAMES[d]} loss" for d in DOMAINS)
            + " | mean loss | GSM8K EM | trainable | train time |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    present = [n for n in names if n in m]
    best = {d: min(m[n]["loss"][d]["loss"] for n in present) for d in DOMAINS} if present else {}
    for name in names:
        if name not in m:
            lines.append(f"| {RUNS[name].label} | " + " | ".join(["not run"] * 7) + " |")
            continue
        r = m[name]
        cells = []
        for d in DOMAINS:
            v = r["loss"][d]["loss"]
            cells.append(f"**{v:.4f}**" if abs(v - best[d]) < 5e-5 else f"{v:.4f}")
        mean = np.mean([r["loss"][d]["loss"] for d in DOMAINS])
        em = r["gsm8k"]
        t = r.get("train_seconds")
        lines.append(
            f"| {RUNS[name].label} | " + " | ".join(cells) + f" | {mean:.4f} | "
            f"{em['exact_match'] * 100:.1f}% ({round(em['exact_match'] * em['n'])}/{em['n']}) | "
            f"{fmt_params(r.get('trainable_params'))} | "
            + (f"{t / 60:.1f} min" if t else "-") + " |")
    return lines


def expert_balance(per_domain: dict[str, Any]) -> float:
    """Normalised entropy of expert use inside the domain's main group, mean over layers
    (1 = all experts used equally, 0 = one expert takes every slot); comparable across E."""
    own = per_domain["main_group"]
    values = []
    for load in per_domain["expert_load_by_layer"].values():
        row = np.asarray(load)[own]
        if row.size < 2 or row.sum() <= 0:
            return float("nan")
        p = row / row.sum()
        values.append(float(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(row.size)))
    return float(np.mean(values))


def usage_table(names: list[str], m: dict[str, dict]) -> list[str]:
    lines = ["| run | groups | " + " | ".join(
        f"{DOMAIN_NAMES[d]}: rows per group / balance" for d in DOMAINS)
        + " | expert overlap between domains (JS, bits) |",
        "| --- | --- |" + " --- |" * len(DOMAINS) + " --- |"]
    for name in names:
        if name not in m or "usage" not in m[name]:
            continue
        u = m[name]["usage"]
        cells = []
        for d in DOMAINS:
            per = u["per_domain"][d]
            balance = expert_balance(per)
            cells.append("/".join(map(str, per["rows_per_group"])) + " / "
                         + ("-" if np.isnan(balance) else f"{balance:.2f}"))
        js = " ".join(f"{v:.2f}" for v in u["domain_js"].values())
        lines.append(f"| {RUNS[name].label} | {m[name]['groups']} | " + " | ".join(cells)
                     + f" | {js} |")
    return lines


def plot_losses(m: dict[str, dict], img: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in legacy_runs(m).items():
        hist = r.get("history")
        if not hist:
            continue
        steps = [h["step"] for h in hist]
        raw = [h["loss"] for h in hist]
        loss = np.convolve(raw, np.ones(5) / 5, mode="valid") if len(raw) >= 5 else raw
        ax.plot(steps[len(steps) - len(loss):], loss, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (5-step mean)")
    ax.set_title("Training loss, same data and steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = img / "train_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_usage(m: dict[str, dict], names: list[str], img: Path) -> Path | None:
    """Per domain, the share of routing slots each expert gets (mean over layers)."""
    names = [n for n in names if n in m and "usage" in m[n]]
    if not names:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.9 * len(names) + 0.6), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        per = m[name]["usage"]["per_domain"]
        grid = np.stack([np.mean([np.asarray(v).ravel() for v in
                                  per[d]["expert_load_by_layer"].values()], axis=0)
                         for d in DOMAINS])
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(DOMAINS)), [DOMAIN_NAMES[d] for d in DOMAINS], fontsize=8)
        groups = m[name]["groups"]
        per_group = grid.shape[1] // groups
        ax.set_xticks(range(grid.shape[1]), [f"g{i // per_group}e{i % per_group}"
                                             for i in range(grid.shape[1])], fontsize=6,
                      rotation=90)
        ax.set_title(f"{RUNS[name].label}: share of each domain's routing slots", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    path = img / "expert_usage_by_domain.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cluster_section(img: Path) -> list[str]:
    meta_path = CLUSTERS / "metadata.json"
    if not meta_path.is_file():
        return ["Clusters not built yet (run prepare.py)."]
    meta = json.loads(meta_path.read_text())
    for name in ("elbow.png", "cluster_map.png", "cluster_by_source.png"):
        if (CLUSTERS / name).is_file():
            shutil.copy(CLUSTERS / name, img / name)
    sel = meta["k_selection"]
    lines = [f"- encoder `{Path(meta['embedding']['model']).name}`, k = "
             f"**{meta['num_clusters']}** by {sel['method']}; purity against the source data "
             f"set {meta['purity_vs_source']:.3f}", ""]
    from moce_plugin.clustering import ClusterModel

    model = ClusterModel.load(CLUSTERS)
    by_source: dict[str, list[int]] = {}
    for row in read_jsonl(TRAIN_FILE):
        cluster = model.assignments.get(model.key_of(row))
        if cluster is not None:
            by_source.setdefault(row["source"], [0] * meta["num_clusters"])[cluster] += 1
    if by_source:
        k = meta["num_clusters"]
        lines += ["Training rows per cluster and domain:", "",
                  "| domain | " + " | ".join(f"cluster {c}" for c in range(k)) + " |",
                  "| --- |" + " --- |" * k]
        lines += [f"| {DOMAIN_NAMES[d]} | " + " | ".join(map(str, by_source[d])) + " |"
                  for d in DOMAINS if d in by_source]
        lines.append("")
    lines += ["![elbow](img/reproduce/elbow.png)", "",
              "![cluster map](img/reproduce/cluster_map.png)", "",
              "![clusters by domain](img/reproduce/cluster_by_source.png)"]
    return lines


def write_raw(m: dict[str, dict[str, Any]], raw: Path) -> None:
    """Runs found here replace their entries; runs measured elsewhere stay recorded."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(raw.read_text()) if raw.is_file() else {}
    slim = {name: {**r, "history": [{k: v for k, v in h.items() if "/layer_" not in k}
                                     for h in r.get("history", [])]} for name, r in m.items()}
    raw.write_text(json.dumps(_rounded({**kept, **slim}), separators=(",", ":")))


def build(doc: Path, m: dict[str, dict[str, Any]]) -> str:
    """The generated part of the results page (single-seed runs); figures go beside it."""
    img = doc.parent / "img" / "reproduce"
    img.mkdir(parents=True, exist_ok=True)
    s = Settings.load()
    any_run = next(iter(m.values()), {})
    out = [START, "",
           f"Measured on: {any_run.get('machine', '?')}. Settings: {s.train_per_domain} "
           f"training rows per domain ({3 * s.train_per_domain} in all), "
           f"{s.heldout_per_domain} held-out rows per domain ({s.eval_per_domain} of them scored), "
           f"{s.steps} optimiser steps of {s.micro_batch_size * s.gradient_accumulation_steps}"
           f" packed {s.sequence_len}-token sequence(s), learning rate {s.learning_rate}, "
           f"cosine; MoCE adapters "
           f"r={s.adapter_dim}, LoRA r={s.lora_r}; GSM8K exact match on "
           f"{s.gsm8k_generate} held-out questions, greedy, {s.max_new_tokens} new tokens. "
           "Train times are wall times and not comparable between runs: most runs shared "
           "the 2 cores with one or two others.", "",
           "### Main comparison (paper Table 1 direction)", "",
           "Held-out answer loss (nats per token, lower is better; best in bold):", ""]
    out += metric_table(MAIN, m)
    for title, names in ABLATIONS.items():
        out += ["", f"### {title}", ""] + metric_table(names, m)
    out += ["", "### Clusters (stage 1)", ""] + cluster_section(img)
    out += ["", "### Expert usage on held-out rows", "",
            "Rows per group: how the cluster model (from the request text, as at inference) "
            "distributes a domain's evaluated held-out rows over the groups. Balance: "
            "normalised entropy of expert use inside the domain's main group, mean over "
            "layers (1 = uniform, 0 = one expert; '-' with one expert per group). Overlap: "
            "Jensen-Shannon divergence between two domains' routing distributions over all "
            "C x E experts, mean over layers, for the pairs general|code, general|math, "
            "code|math (0 = same experts, 1 = disjoint experts). For (V), only the "
            "clustered groups' experts are counted, not the general experts.", ""]
    out += usage_table(["pesc", "moce", "moce_v", "moce_top1", "moce_soft", "moce_e1",
                        "moce_e2", "moce_acmoe"], m)
    usage_png = plot_usage(m, ["pesc", "moce", "moce_acmoe"], img)
    if usage_png:
        out += ["", f"![expert usage](img/reproduce/{usage_png.name})"]
    out += ["", "### Training loss", "", f"![training loss](img/reproduce/"
            f"{plot_losses(m, img).name})", "", END]
    return "\n".join(out)


def replace_region(text: str, start: str, end: str, body: str, doc: Path) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"{doc} lacks the {start} / {end} markers: add both lines where "
                         "that part of the page goes")
    head, rest = text.split(start, 1)
    return head + start + "\n\n" + body + "\n\n" + end + rest.split(end, 1)[1]


def main() -> None:
    import argparse

    from .study_report import END as STUDY_END
    from .study_report import START as STUDY_START
    from .study_report import study_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=DOC,
                        help="results page to update; figures and metrics go beside it")
    doc = parser.parse_args().doc
    raw = doc.parent / "results" / "metrics.json"
    m = {**recorded_seeded_runs(raw), **load_metrics()}  # runs measured here win
    text = doc.read_text() if doc.is_file() else (
        f"# Results\n\n{STUDY_START}\n{STUDY_END}\n\n{START}\n{END}\n")
    legacy = legacy_runs(m)
    if legacy:
        generated = build(doc, legacy).removeprefix(START).removesuffix(END).strip()
        text = replace_region(text, START, END, generated, doc)
    else:
        print("no single-seed run here: the measured single-seed tables are left as they are")
    # Before prepare.py has run, the pending section's estimate uses the default settings.
    s = Settings.load() if SETTINGS_FILE.is_file() else Settings()
    img = doc.parent / "img" / "reproduce"
    img.mkdir(parents=True, exist_ok=True)
    study = study_section(m, s, img, raw)
    text = replace_region(text, STUDY_START, STUDY_END, "\n".join(study), doc)
    if m:
        write_raw(m, raw)
    doc.write_text(text)
    print(f"wrote {doc}, with figures and metrics beside it")


if __name__ == "__main__":
    main()
