"""studies/moce_repro/stats.py on synthetic per-row losses whose answer is known."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from studies.moce_repro.stats import (
    MEAN,
    Difference,
    StatsError,
    describe,
    gather,
    paired_difference,
    seed_summary,
)

DOMAINS = ("alpaca", "code_alpaca", "gsm8k")


def fake_runs(config: str, shift: float, seeds: int = 3, rows: int = 60, seed_sd: float = 0.01,
              noise: float = 0.02, data_seed: int = 0, gen: int = 1) -> dict[str, dict]:
    """Metrics of `seeds` runs: per-token loss = row difficulty (shared by every run, very
    spread: pairing on rows matters) + shift + a per-seed offset + per-row noise."""
    data = np.random.default_rng(data_seed)
    difficulty = {d: data.uniform(0.3, 3.0, rows) for d in DOMAINS}
    tokens = {d: data.integers(20, 200, rows) for d in DOMAINS}
    rng = np.random.default_rng(gen)
    out = {}
    for s in range(1, seeds + 1):
        offset = rng.normal(0, seed_sd)
        ids, dom, nll, tok = [], [], [], []
        for d in DOMAINS:
            per_token = difficulty[d] + shift + offset + rng.normal(0, noise, rows)
            ids += [f"{d}-{i}" for i in range(rows)]
            dom += [d] * rows
            nll += list(per_token * tokens[d])
            tok += list(tokens[d])
        out[f"{config}@s{s}"] = {"rows": {"id": ids, "domain": dom, "nll": nll, "tokens": tok}}
    return out


def test_planted_difference_is_detected():
    a = gather(fake_runs("moce", 0.05, gen=1))
    b = gather(fake_runs("pesc", 0.0, gen=2))
    result = paired_difference(a, b)
    for key in (*DOMAINS, MEAN):
        d = result[key]
        assert d.significant and d.low < 0.05 < d.high, (key, d)
    assert "pesc is better" in describe(result[MEAN], "moce", "pesc")


def test_small_planted_difference_needs_pairing_on_rows():
    # Row difficulty spreads 0.3-3 nats, the difference is 0.02: drawing the rows separately
    # for the two sides (no pairing) would bury it.
    result = paired_difference(gather(fake_runs("a", 0.02, noise=0.01, seed_sd=0.002, gen=3)),
                               gather(fake_runs("b", 0.0, noise=0.01, seed_sd=0.002, gen=4)))
    assert result[MEAN].significant and result[MEAN].low > 0


def test_no_difference_covers_zero():
    result = paired_difference(gather(fake_runs("a", 0.0, gen=5)),
                               gather(fake_runs("b", 0.0, gen=6)))
    for key in (*DOMAINS, MEAN):
        assert result[key].low < 0 < result[key].high, (key, result[key])
    assert "cannot be told apart" in describe(result[MEAN], "a", "b")


def test_seed_spread_widens_the_interval():
    # Same rows and noise; only the seed-to-seed spread differs: seeds must be resampled.
    def width(seed_sd: float) -> float:
        r = paired_difference(gather(fake_runs("a", 0.0, seed_sd=seed_sd, gen=7)),
                              gather(fake_runs("b", 0.0, seed_sd=seed_sd, gen=8)))[MEAN]
        return r.high - r.low

    assert width(0.1) > 3 * width(0.0)


def test_deterministic_given_the_seed():
    a, b = gather(fake_runs("a", 0.01, gen=9)), gather(fake_runs("b", 0.0, gen=10))
    first, again = paired_difference(a, b, seed=3), paired_difference(a, b, seed=3)
    other = paired_difference(a, b, seed=4)
    assert first == again
    assert first[MEAN].low != other[MEAN].low
    assert first[MEAN].diff == other[MEAN].diff  # the point estimate uses every row


def test_seed_summary_mean_and_spread():
    runs = fake_runs("a", 0.0, seeds=3, seed_sd=0.0, noise=0.0)
    summary = seed_summary(gather(runs))
    assert summary[MEAN]["seeds"] == 3 and summary[MEAN]["sd"] == pytest.approx(0, abs=1e-12)
    one = seed_summary(gather(dict(list(runs.items())[:1])))
    assert one["gsm8k"]["sd"] == 0.0 and one["gsm8k"]["mean"] == pytest.approx(
        summary["gsm8k"]["mean"])
    # token-weighted, as in the tables: sum of row losses / sum of tokens
    r = runs["a@s1"]["rows"]
    code = [i for i, d in enumerate(r["domain"]) if d == "code_alpaca"]
    expected = sum(r["nll"][i] for i in code) / sum(r["tokens"][i] for i in code)
    assert one["code_alpaca"]["mean"] == pytest.approx(expected)


def test_runs_without_rows_or_with_other_rows_are_refused():
    with pytest.raises(StatsError, match="no per-row losses.*re-evaluate"):
        gather({"moce": {"loss": {}}})
    a = fake_runs("a", 0.0, seeds=1)
    b = fake_runs("b", 0.0, seeds=1, rows=59)
    with pytest.raises(StatsError, match="different .* rows"):
        gather({**a, **b})
    with pytest.raises(StatsError, match="different .* rows"):
        paired_difference(gather(a), gather(b))


def test_difference_significance():
    assert Difference(0.1, 0.01, 0.2).significant
    assert Difference(-0.1, -0.2, -0.01).significant
    assert not Difference(0.1, -0.01, 0.2).significant


# ---- study_report.py: the seeded study's part of docs/results.md -------------------------

def fake_metrics(config: str, shift: float, seeds: int = 3, **kw) -> dict[str, dict]:
    """Full run metrics (what report.py reads) around fake per-row losses."""
    out = {}
    for i, (name, m) in enumerate(fake_runs(config, shift, seeds=seeds, **kw).items()):
        rows = m["rows"]
        loss = {}
        for d in DOMAINS:
            idx = [j for j, x in enumerate(rows["domain"]) if x == d]
            loss[d] = {"loss": sum(rows["nll"][j] for j in idx)
                       / sum(rows["tokens"][j] for j in idx)}
        out[name] = {**m, "loss": loss, "gsm8k": {"exact_match": 0.05}, "seed": i + 1,
                     "trainable_params": 26_700_000, "train_seconds": 600.0,
                     "eval_seconds": 100.0, "wall_seconds": 700.0, "machine": "test CPU",
                     "torch_threads": 2, "load_average_1min": 1.0}
    return out


def with_curve(config: str, shifts: list[float], gen: int, seeds: int = 3) -> dict:
    """Long runs of `config` (seeds 1..seeds) whose checkpoints at steps 40/80/120 are
    `shifts` away from the base difficulty (each seed and step with its own noise)."""
    out = fake_metrics(config, shifts[-1], seeds=seeds, gen=gen, seed_sd=0.002, noise=0.005)
    for i, m in enumerate(out.values()):
        curve = []
        for step, shift in zip((40, 80, 120), shifts):
            point = fake_metrics(config, shift, seeds=1, gen=gen + 1000 * (i + 1) + step,
                                 seed_sd=0.002, noise=0.005)
            p = next(iter(point.values()))
            curve.append({"step": step, "loss": p["loss"], "rows": p["rows"]})
        m["curve"] = curve
    return out


def test_hypothesis_outcomes():
    from studies.moce_repro.study_report import hypothesis_outcome

    worse, better, same = (Difference(0.05, 0.02, 0.08), Difference(-0.05, -0.08, -0.02),
                           Difference(0.0, -0.02, 0.02))
    assert hypothesis_outcome(same, better, same) == "moot"  # no gap to explain
    assert hypothesis_outcome(better, better, same) == "moot"
    assert hypothesis_outcome(worse, better, same) == "confirmed"
    assert hypothesis_outcome(worse, better, better) == "confirmed"
    assert hypothesis_outcome(worse, better, worse) == "partly confirmed"
    assert hypothesis_outcome(worse, same, worse) == "not confirmed"
    assert hypothesis_outcome(worse, worse, worse) == "not confirmed"


def test_study_section_pending(tmp_path):
    from studies.moce_repro.repro_config import GROUPS, Settings
    from studies.moce_repro.study_report import study_section

    ref = Path(__file__).resolve().parents[3] / "docs" / "results" / "metrics.json"
    text = "\n".join(study_section({}, Settings(), tmp_path, ref))
    assert "## Seeds and intervals: machinery ready, runs pending" in text
    assert "**Not run yet.**" in text
    for group in ("main3", "paper", "hypothesis", "long", "study"):
        assert f"`run.py {group}`" in text
    assert f"all {len(GROUPS['study'])}" in text and " h |" in text
    assert "moce_pairs" in text and "Decision rule" in text


def test_study_section_from_runs(tmp_path):
    from studies.moce_repro.repro_config import Settings
    from studies.moce_repro.study_report import study_section

    m = {}
    # planted: lora best, pesc 0.05 better than moce, moce_pairs exactly as good as pesc
    for config, shift, gen in [("lora_mlp", -0.1, 10), ("pesc", 0.0, 20), ("moce", 0.05, 30),
                               ("pesc8", 0.02, 40), ("pesc4", 0.05, 50),
                               ("moce_pairs", 0.0, 20)]:
        m.update(fake_metrics(config, shift, gen=gen, seed_sd=0.001, noise=0.002))
    m.update(with_curve("moce_long", [0.1, 0.0, -0.1], 100))
    m.update(with_curve("pesc_long", [0.0, 0.0, 0.0], 200))
    m.update(with_curve("lora_mlp_long", [-0.2, -0.2, -0.2], 300))
    text = "\n".join(study_section(m, Settings(), tmp_path, tmp_path / "none.json"))
    assert "runs pending" not in text
    verdict = text.split("### Seeds")[0]
    assert "pesc is better (moce - pesc = +0.05" in verdict
    assert "lora_mlp is better (moce - lora_mlp = +0.15" in verdict
    assert "Result: **confirmed**" in text
    # the long runs: moce_long starts worse than pesc_long and ends better
    assert "at 40 steps (3-seed means) the order is lora_mlp" in verdict
    assert "Still to run" not in text
    assert "after 120 steps (3-seed means) the mean held-out loss orders lora_mlp_long 1." \
        in verdict
    assert re.search(r"orders lora_mlp_long [\d.]+ < moce_long [\d.]+ < pesc_long", verdict)
    assert "the order changes along the way: step 40: lora_mlp_long < pesc_long < moce_long" \
        in verdict
    assert "at step 120 moce_long is better (moce_long - pesc_long = -0.1" in verdict
    assert "only" not in verdict.split("Longer training")[1]
    assert "moce and pesc4 cannot be told apart" in verdict
    curve_rows = [line for line in text.splitlines() if line.startswith("| 40 |")
                  or line.startswith("| 120 |")]
    moce_minus_pesc = [row.split("|")[5].strip() for row in curve_rows]
    assert moce_minus_pesc[0].startswith("**+") and moce_minus_pesc[1].startswith("**-")
    # each checkpoint pools the three seeds: mean ± sd over seeds, seed count in brackets
    assert all(row.split("|")[2].strip().endswith("(3)") for row in curve_rows)
    # the verdict counts the checkpoints whose interval excludes 0 (bold in the table)
    table = [line for line in text.split("### Longer training")[1].splitlines()
             if re.match(r"\| \d+ \|", line)]
    bold = sum(row.split("|")[5].strip().startswith("**") for row in table)
    assert f"moce_long - pesc_long excludes 0 at {bold} of {len(table)} checkpoints" in verdict
    assert (tmp_path / "loss_vs_steps.png").is_file()
    assert "± " in text and "26.7 M" in text and "| moce@s1 | test CPU |" in text


def test_study_section_reports_runs_it_cannot_compare(tmp_path):
    from studies.moce_repro.repro_config import Settings
    from studies.moce_repro.study_report import study_section

    m = {**fake_metrics("moce", 0.0, gen=1), **fake_metrics("pesc", 0.0, rows=50, gen=2)}
    text = "\n".join(study_section(m, Settings(), tmp_path, tmp_path / "none.json"))
    assert "Not compared:" in text and "different" in text
    assert "Still to run (" in text and "pesc8@s1" in text


def test_long_runs_pool_seeds_per_checkpoint(tmp_path):
    from studies.moce_repro.study_report import long_section

    # planted: seed 1 of moce_long is far worse at step 120 than seeds 2 and 3; the pooled
    # mean and its sd over seeds must show it (a report that read only seed 1 would not)
    m = {**with_curve("moce_long", [0.0, 0.0, 0.0], 100),
         **with_curve("pesc_long", [0.0, 0.0, 0.0], 200),
         **with_curve("lora_mlp_long", [0.0, 0.0, 0.0], 300)}
    first = m["moce_long@s1"]["curve"][-1]
    first["rows"]["nll"] = [x + 0.3 * t for x, t in zip(first["rows"]["nll"],
                                                        first["rows"]["tokens"])]
    lines, verdict = long_section(m, tmp_path)
    row = next(line for line in lines if line.startswith("| 120 |"))
    cells = row.split("|")  # step, lora_mlp_long, pesc_long, moce_long, ...
    mean, sd = (float(x) for x in cells[4].split("(")[0].split("±"))
    base = float(cells[3].split("±")[0])
    assert mean == pytest.approx(base + 0.1, abs=0.01) and sd == pytest.approx(0.173, abs=0.01)
    assert verdict[0].startswith("after 120 steps (3-seed means)")
    # one seed: said so in the verdict
    one = {n: r for n, r in m.items() if n.endswith("@s1")}
    _, verdict = long_section(one, tmp_path)
    assert verdict[0].startswith("after 120 steps (1-seed means)")
    assert verdict[-1] == "(only 1 seed of the long runs so far)"
