"""The seeded study's part of docs/results.md: verdict, seed tables with intervals, the
paper's PESC comparison, the longer runs (loss against steps), the hypothesis run, wall
times; or, before the runs exist, the commands and their estimated time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .repro_config import (
    CLUSTERS,
    DOMAIN_NAMES,
    DOMAINS,
    GROUPS,
    RUNS,
    SEEDS,
    Settings,
    adapter_params,
    get_run,
    moce_block,
)
from .stats import MEAN, Difference, SeedRows, StatsError, describe, gather, paired_difference
from .stats import seed_summary as summarise

START, END = "<!-- study:start -->", "<!-- study:end -->"
CONFIGS = ["lora_mlp", "pesc", "pesc8", "pesc4", "moce", "moce_pairs"]
BASELINES = ["lora_mlp", "pesc", "pesc8", "pesc4"]
LONG = ["lora_mlp_long", "pesc_long", "moce_long"]
COLUMNS = [*DOMAINS, MEAN]
COLUMN_NAMES = {**DOMAIN_NAMES, MEAN: "mean"}
HYPOTHESIS = (
    "MoCE loses to PESC at this scale because a MoCE token chooses its two experts among the "
    "E = 4 of its group (6 pairs) while a PESC token chooses among all C x E (66 pairs). "
    "Test: `moce_pairs`, MoCE whose groups have C x E experts each (a token has as many "
    "pairs as in PESC; 3x the adapter parameters). Decision rule, fixed before the runs: "
    "*confirmed* if moce_pairs is better than moce and not worse than pesc (intervals); "
    "*partly confirmed* if it is better than moce but still worse than pesc; *not confirmed* "
    "if it is not better than moce; *moot* if moce is not worse than pesc to begin with.")


def seeded(m: dict[str, dict], config: str) -> dict[str, dict]:
    """The seeded runs (config@sN) of one run definition that have metrics."""
    return {n: r for n, r in m.items() if n.split("@", 1)[0] == config and "@s" in n}


def hypothesis_outcome(moce_vs_pesc: Difference, pairs_vs_moce: Difference,
                       pairs_vs_pesc: Difference) -> str:
    if moce_vs_pesc.low <= 0:  # moce is not significantly worse than pesc: no gap to explain
        return "moot"
    if not pairs_vs_moce.high < 0:
        return "not confirmed"
    return "partly confirmed" if pairs_vs_pesc.low > 0 else "confirmed"


def _cell(diff: Difference) -> str:
    text = f"{diff.diff:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"
    return f"**{text}**" if diff.significant else text


def _params(runs: dict[str, dict]) -> str:
    values = {r.get("trainable_params") for r in runs.values()} - {None}
    return "-" if not values else "/".join(f"{v / 1e6:.1f} M" for v in sorted(values))


def seed_table(m: dict[str, dict], rows: dict[str, dict[str, SeedRows]]) -> list[str]:
    lines = ["| run | " + " | ".join(f"{COLUMN_NAMES[c]} loss" for c in COLUMNS)
             + " | seeds | GSM8K EM | adapter params | train time |",
             "|" + " --- |" * (len(COLUMNS) + 5)]
    for config in CONFIGS:
        runs = seeded(m, config)
        if config not in rows:
            lines.append(f"| {RUNS[config].label} | " + " | ".join(["pending"] * len(COLUMNS))
                         + " | 0 | - | - | - |")
            continue
        summary = summarise(rows[config])
        cells = [f"{summary[c]['mean']:.4f} ± {summary[c]['sd']:.4f}" for c in COLUMNS]
        em = np.mean([r["gsm8k"]["exact_match"] for r in runs.values()])
        train = np.mean([r.get("train_seconds", 0) for r in runs.values()]) / 60
        lines.append(f"| {RUNS[config].label} | " + " | ".join(cells)
                     + f" | {len(runs)} | {em * 100:.1f}% | {_params(runs)} | {train:.1f} min |")
    return lines


def difference_table(pairs: list[tuple[str, str]], diffs: dict) -> list[str]:
    lines = ["| difference | " + " | ".join(COLUMN_NAMES[c] for c in COLUMNS) + " |",
             "|" + " --- |" * (len(COLUMNS) + 1)]
    for a, b in pairs:
        d = diffs.get((a, b))
        lines.append(f"| {a} - {b} | " + (" | ".join(_cell(d[c]) for c in COLUMNS) if d else
                                          " | ".join(["pending"] * len(COLUMNS))) + " |")
    return lines


def curve_points(m: dict[str, dict]) -> dict[str, dict[int, dict[str, dict]]]:
    """Per long-run definition and checkpoint step: the curve point of each seeded run."""
    out: dict[str, dict[int, dict[str, dict]]] = {c: {} for c in LONG}
    for c in LONG:
        for name, r in sorted(seeded(m, c).items()):
            for p in r.get("curve", []):
                out[c].setdefault(p["step"], {})[name] = p
    return out


def step_rows(points: dict[str, dict]) -> dict[str, SeedRows]:
    """The seeds' per-row losses at one checkpoint, stacked like a definition's seeds."""
    return gather({f"{name} step {p['step']}": {"rows": p["rows"]} for name, p in points.items()})


def plot_curves(m: dict[str, dict], img: Path) -> Path | None:
    """Held-out loss against steps per domain: mean over seeds, error bars one sd."""
    from .report import _pyplot

    points = {c: by_step for c, by_step in curve_points(m).items() if by_step}
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(15, 3.8))
    for ax, col in zip(axes, COLUMNS):
        for config, by_step in points.items():
            steps = sorted(by_step)
            summary = [summarise(step_rows(by_step[step]))[col] for step in steps]
            seeds = max(x["seeds"] for x in summary)
            ax.errorbar(steps, [x["mean"] for x in summary], yerr=[x["sd"] for x in summary],
                        marker="o", capsize=3, label=f"{config} ({seeds} seeds)")
        ax.set_title(COLUMN_NAMES[col], fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("held-out answer loss (mean ± sd over seeds)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    path = img / "loss_vs_steps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def long_section(m: dict[str, dict], img: Path) -> tuple[list[str], list[str]]:
    """Lines of the longer-training part, and verdict sentences: every checkpoint's loss
    pooled over the seeds that reached it, differences with intervals over rows and seeds."""
    points = curve_points(m)
    if not any(points.values()):
        return ["Pending: `python -m studies.moce_repro.run long`."], []
    lines = ["Held-out answer loss at each checkpoint, mean ± sd over seeds (seeds in "
             "brackets); differences with 95% bootstrap intervals over rows and seeds, "
             "**bold** where the interval excludes 0:", "",
             "| step | " + " | ".join(c for c in LONG) + " | moce_long - pesc_long | "
             "moce_long - lora_mlp_long |", "|" + " --- |" * (len(LONG) + 3)]
    steps = sorted(set().union(*[set(p) for p in points.values()]))
    step_means: dict[int, dict[str, float]] = {}  # steps where all three runs have a point
    diffs: dict[int, dict[str, Difference]] = {}
    seeds_at: dict[int, int] = {}
    for step in steps:
        cells, rows, means = [], {}, {}
        for c in LONG:
            at = points[c].get(step)
            if not at:
                cells.append("-")
                continue
            rows[c] = step_rows(at)
            x = summarise(rows[c])[MEAN]
            means[c] = x["mean"]
            cells.append(f"{x['mean']:.4f} ± {x['sd']:.4f} ({x['seeds']})")
        if len(means) == len(LONG):
            step_means[step] = means
            seeds_at[step] = min(len(r[DOMAINS[0]].runs) for r in rows.values())
        cols = []
        for base in ("pesc_long", "lora_mlp_long"):
            if "moce_long" in rows and base in rows:
                d = paired_difference(rows["moce_long"], rows[base])[MEAN]
                diffs.setdefault(step, {})[base] = d
                cols.append(_cell(d))
            else:
                cols.append("-")
        lines.append(f"| {step} | " + " | ".join(cells + cols) + " |")
    png = plot_curves(m, img)
    if png:
        lines += ["", f"![held-out loss against steps](img/reproduce/{png.name})"]
    verdict: list[str] = []
    if not step_means:
        return lines, verdict
    orders = {step: sorted(means, key=means.get) for step, means in step_means.items()}
    # the last checkpoint is the final model (save_steps divides the steps)
    final = max(orders)
    n = seeds_at[final]
    verdict.append(f"after {final} steps ({n}-seed means) the mean held-out loss orders "
                   + " < ".join(f"{c} {step_means[final][c]:.3f}" for c in orders[final]))
    distinct = {tuple(o) for o in orders.values()}
    verdict.append("this order holds at every checkpoint (steps "
                   + ", ".join(map(str, sorted(orders))) + ")" if len(distinct) == 1 else
                   "the order changes along the way: " + "; ".join(
                       f"step {s}: {' < '.join(o)}" for s, o in sorted(orders.items())))
    for base, d in diffs.get(final, {}).items():
        verdict.append(f"at step {final} " + describe(d, "moce_long", base))
    for base in ("pesc_long", "lora_mlp_long"):
        at = [step for step in steps if base in diffs.get(step, {})]
        if at:
            sig = sum(diffs[step][base].significant for step in at)
            verdict.append(f"moce_long - {base} excludes 0 at {sig} of {len(at)} checkpoints")
    if n < 3:
        verdict.append(f"(only {n} seed{'s' if n > 1 else ''} of the long runs so far)")
    return lines, verdict


def pending_section(s: Settings, reference: Path) -> list[str]:
    import json

    from .run import estimate_seconds, span

    ref = json.loads(reference.read_text()) if reference.is_file() else {}
    lines = ["## Seeds and intervals: machinery ready, runs pending", "",
             "**Not run yet.** The seeded study answers issue 18 (are the differences real; "
             "the paper's PESC baseline; longer training; the expert-pairs hypothesis). The "
             "machinery is built and unit-tested on synthetic losses "
             "(studies/moce_repro/tests/test_reproduce_stats.py); the runs need the 2 cores to "
             "themselves for several hours. Commands, from the repository root:", "", "```bash",
             f"python -m studies.moce_repro.prepare    # scores all {s.heldout_per_domain} held-out"
             " rows per domain (--eval-per-domain, default now 60)",
             "python -m studies.moce_repro.run study --plan  # what is left, estimated time",
             "python -m studies.moce_repro.run study   # everything below, in this order",
             "python -m studies.moce_repro.report      # this section: tables, intervals, verdict",
             "```", "", "Each group, and each run, is one command as well "
             "(`run.py moce --seed 2` = `run.py moce@s2`); two shells running `run.py study` "
             "share the work (a run in progress is locked). Estimated per-run wall time, "
             "summed, from the times measured for the single-seed tables below (training "
             "scaled by steps; low: evaluation as measured, checkpoint scoring free; high: "
             "evaluation scaled by the scored rows and paid again at each of the long runs' "
             "checkpoints). Those runs shared the 2 cores with one or two others: their "
             "per-run times sum to 2.9 h, their wall time was about 85 minutes, so two shells "
             "side by side should take about half of the sum.", "",
             "| command | runs | estimated time (sum over runs) |", "| --- | --- | --- |"]
    low = high = 0.0
    for group in ("main3", "paper", "hypothesis", "long"):
        est = [estimate_seconds(get_run(n), s, ref) or (0.0, 0.0) for n in GROUPS[group]]
        a, b = sum(e[0] for e in est), sum(e[1] for e in est)
        low, high = low + a, high + b
        lines.append(f"| `run.py {group}` | {', '.join(GROUPS[group])} | {span(a, b, 3600, 'h')} |")
    lines.append(f"| `run.py study` | all {len(GROUPS['study'])} | {span(low, high, 3600, 'h')} |")
    lines += [""] + parameter_table(s, ref)
    return lines


def model_dims(s: Settings) -> tuple[int, int]:
    """Hidden size and layer count of the base model (SmolLM2-135M's before it is built)."""
    import json

    path = Path(s.base_model) / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        return int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    return 576, 30


def parameter_table(s: Settings, ref: dict[str, dict]) -> list[str]:
    """Experts, pairs per token and adapter parameters of the compared runs (computed)."""
    import json
    from math import comb

    meta = CLUSTERS / "metadata.json"
    k = (json.loads(meta.read_text())["num_clusters"] if meta.is_file()
         else ref.get("moce", {}).get("groups", 3))
    hidden, layers = model_dims(s)
    lines = [f"Adapter parameters of the compared runs (computed for C = {k}, hidden size "
             f"{hidden}, {layers} layers; equal to the trainable counts axolotl logged for "
             "the single-seed runs):", "",
             "| run | experts per layer | experts a token chooses from (pairs, top-2) | "
             "adapter parameters |", "| --- | --- | --- | --- |"]
    for config in CONFIGS:
        run = RUNS[config]
        if run.kind != "moce":
            measured = ref.get(config, {}).get("trainable_params")
            lines.append(f"| {config} | - (LoRA r={s.lora_r} on gate/up/down) | - | "
                         + (f"{measured / 1e6:.1f} M (measured)" if measured else "-") + " |")
            continue
        moce = moce_block(run, s, k)
        e = moce["experts_per_group"]
        lines.append(f"| {config} | {moce['num_clusters'] * e} | {e} ({comb(e, 2)}) | "
                     f"{adapter_params(moce, hidden, layers) / 1e6:.1f} M |")
    return lines


def study_section(m: dict[str, dict], s: Settings, img: Path, reference: Path) -> list[str]:
    if not any("@s" in n for n in m):
        return pending_section(s, reference) + ["", "### Hypothesis under test", "", HYPOTHESIS]
    rows, problems = {}, []
    for config in CONFIGS:
        runs = seeded(m, config)
        if runs:
            try:
                rows[config] = gather(runs)
            except StatsError as err:
                problems.append(str(err))
    pairs = [("moce", b) for b in BASELINES] + [("moce_pairs", "moce"), ("moce_pairs", "pesc")]
    diffs = {}
    for a, b in pairs:
        if a in rows and b in rows:
            try:
                diffs[(a, b)] = paired_difference(rows[a], rows[b])
            except StatsError as err:
                problems.append(str(err))
    long_lines, long_verdict = long_section(m, img)
    short = {c: summarise(rows[c])[MEAN]["mean"] for c in ("lora_mlp", "pesc", "moce") if c in rows}
    if long_verdict and short:
        n = min(len(rows[c][DOMAINS[0]].runs) for c in short)
        long_verdict.insert(0, f"at {s.steps} steps ({n}-seed means) the order is "
                            + " < ".join(f"{c} {v:.3f}" for c, v in
                                         sorted(short.items(), key=lambda kv: kv[1])))
    verdict = verdict_paragraph(rows, diffs, long_verdict)
    n_rows = {d: len(r.ids) for d, r in rows.get("moce", next(iter(rows.values()), {})).items()}
    out = ["## Verdict (seeded study)", "", verdict, "", "### Seeds: mean ± sd over seeds", "",
           f"Held-out answer loss (nats per token), mean ± standard deviation over seeds "
           f"{', '.join(map(str, SEEDS))}; rows scored per domain: "
           + (", ".join(f"{DOMAIN_NAMES[d]} {n}" for d, n in n_rows.items()) or "-") + ".", ""]
    out += seed_table(m, rows)
    out += ["", "### Paired differences (95% bootstrap intervals over rows and seeds)", "",
            "Difference of held-out answer loss, first minus second (negative: the first is "
            "better); **bold**: the interval excludes 0. pesc has C x E experts (as many "
            "adapter parameters as moce), pesc8 / pesc4 are the paper's kind of PESC "
            "baseline (fewer parameters than moce).", ""]
    out += difference_table(pairs, diffs)
    out += ["", "### Longer training", ""] + long_lines
    out += ["", "### Hypothesis", "", HYPOTHESIS, "", hypothesis_text(diffs)]
    if problems:
        out += ["", "Not compared: " + "; ".join(problems)]
    missing = [n for n in GROUPS["study"] if n not in m]
    if missing:
        out += ["", f"Still to run ({len(missing)}; `python -m studies.moce_repro.run study` "
                "does them): " + ", ".join(missing) + "."]
    out += ["", "### Wall time and machine", ""] + wall_table(m)
    return out


def hypothesis_text(diffs: dict) -> str:
    keys = [("moce", "pesc"), ("moce_pairs", "moce"), ("moce_pairs", "pesc")]
    if not all(k in diffs for k in keys):
        return "Result: pending (`python -m studies.moce_repro.run main3 hypothesis`)."
    d = [diffs[k][MEAN] for k in keys]
    return (f"Result: **{hypothesis_outcome(*d)}** on the mean loss: "
            + "; ".join(describe(x, a, b) for x, (a, b) in zip(d, keys)) + ".")


def verdict_paragraph(rows: dict, diffs: dict, long_verdict: list[str]) -> str:
    parts = []
    seeds = {c: len(r[DOMAINS[0]].runs) for c, r in rows.items() if DOMAINS[0] in r}
    if seeds and min(seeds.values()) < 3:
        few = [c for c, n in seeds.items() if n < 3]
        parts.append(f"Preliminary: fewer than 3 seeds for {', '.join(few)}.")
    for b in BASELINES:
        if ("moce", b) not in diffs:
            continue
        d = diffs[("moce", b)]
        sig = [f"{DOMAIN_NAMES[c]} {'better' if d[c].diff < 0 else 'worse'}" for c in DOMAINS
               if d[c].significant]
        parts.append(describe(d[MEAN], "moce", b) + " on the mean over domains; per domain, "
                     + ("significant: " + ", ".join(sig) if sig else "no domain differs "
                        "significantly") + ".")
    if long_verdict:
        parts.append("Longer training: " + "; ".join(long_verdict) + ".")
    if ("moce_pairs", "moce") in diffs and ("moce", "pesc") in diffs:
        parts.append(hypothesis_text(diffs))
    return " ".join(parts) if parts else "No comparison has both sides measured yet."


def wall_table(m: dict[str, dict]) -> list[str]:
    lines = ["| run | machine | threads | load (1 min) | train | eval | curve | wall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def minutes(v: float | None) -> str:
        return "-" if not v else f"{v / 60:.1f} min"

    def load(r: dict) -> str:  # at the run's start and end
        ends = [r.get(k) for k in ("load_average_1min", "load_average_1min_end")]
        return " -> ".join(f"{v:.1f}" for v in ends if isinstance(v, int | float)) or "?"

    for name in sorted(n for n in m if "@s" in n):
        r = m[name]
        lines.append(f"| {name} | {r.get('machine', '?')} | {r.get('torch_threads', '?')} | "
                     f"{load(r)} | {minutes(r.get('train_seconds'))} | "
                     f"{minutes(r.get('eval_seconds'))} | {minutes(r.get('curve_seconds'))} | "
                     f"{minutes(r.get('wall_seconds'))} |")
    return lines
