"""Seed spread and paired differences of held-out answer loss, with bootstrap intervals.

Every run scores the same held-out rows (heldout_metrics.py keeps each row's summed loss
and token count), so two run definitions are compared row by row: a bootstrap replicate
draws the rows once for both (pairing), and for each definition its seeds with replacement
(independently: seed N of MoCE and seed N of PESC share the data order but not the
initialisation of comparable weights, so seeds are not paired). A domain's loss is the
token-weighted mean over its rows (as in the tables), averaged over the drawn seeds; "mean"
is the mean of the domain losses. The interval is the percentile interval of the
replicates; a difference is called significant when it excludes 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MEAN = "mean"


class StatsError(ValueError):
    """Runs that cannot be compared (no per-row losses, different rows)."""


@dataclass
class SeedRows:
    """One run definition on one domain: rows x seeds."""

    runs: list[str]
    ids: list[str]
    nll: np.ndarray     # [seeds, rows] summed answer loss of each row
    tokens: np.ndarray  # [seeds, rows] answer tokens of each row

    def losses(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Token-weighted loss per seed; with weights [B, rows]: per replicate, [B, seeds]."""
        if weights is None:
            return self.nll.sum(1) / self.tokens.sum(1)
        return (weights @ self.nll.T) / (weights @ self.tokens.T)


def domain_rows(metrics: dict[str, Any], name: str) -> dict[str, tuple[list[str], list, list]]:
    rows = metrics.get("rows")
    if not rows:
        raise StatsError(f"run {name} has no per-row losses (measured before they were kept): "
                         f"delete its metrics.json and rerun `run.py {name}` to re-evaluate it")
    by_domain: dict[str, tuple[list[str], list, list]] = {}
    for rid, d, n, t in zip(rows["id"], rows["domain"], rows["nll"], rows["tokens"]):
        ids, nll, tok = by_domain.setdefault(d, ([], [], []))
        ids.append(rid)
        nll.append(n)
        tok.append(t)
    return by_domain


def gather(runs: dict[str, dict[str, Any]]) -> dict[str, SeedRows]:
    """Stack the per-row losses of several runs of one definition (its seeds) per domain."""
    if not runs:
        raise StatsError("no runs to gather")
    per_run = {name: domain_rows(m, name) for name, m in runs.items()}
    first_name, first = next(iter(per_run.items()))
    out = {}
    for domain, (ids, _, _) in first.items():
        for name, rows in per_run.items():
            if domain not in rows or rows[domain][0] != ids:
                raise StatsError(
                    f"runs {first_name} and {name} scored different {domain} held-out rows: "
                    "re-evaluate both with the same settings.json (delete their metrics.json)")
        out[domain] = SeedRows(
            runs=list(per_run), ids=ids,
            nll=np.array([rows[domain][1] for rows in per_run.values()], dtype=float),
            tokens=np.array([rows[domain][2] for rows in per_run.values()], dtype=float))
    return out


def seed_summary(rows: dict[str, SeedRows]) -> dict[str, dict[str, float]]:
    """Per domain (and MEAN over domains): mean over seeds, standard deviation over seeds
    (0 with one seed), number of seeds."""
    per_seed = {d: r.losses() for d, r in rows.items()}
    per_seed[MEAN] = np.mean(list(per_seed.values()), axis=0)
    return {d: {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                "seeds": int(v.size)} for d, v in per_seed.items()}


@dataclass
class Difference:
    diff: float   # a - b on all rows and seeds
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(a: dict[str, SeedRows], b: dict[str, SeedRows], n_boot: int = 4000,
                      seed: int = 0, level: float = 0.95) -> dict[str, Difference]:
    """a - b per domain and for MEAN, with a bootstrap interval over rows (paired) and seeds."""
    domains = [d for d in a if d in b]
    for d in domains:
        if a[d].ids != b[d].ids:
            raise StatsError(f"{a[d].runs[0]} and {b[d].runs[0]} scored different {d} rows: "
                             "re-evaluate both with the same settings.json")
    if not domains:
        raise StatsError("the two run definitions share no domain")
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2 * 100
    reps, point = {}, {}
    for d in domains:
        n = len(a[d].ids)
        weights = rng.multinomial(n, np.full(n, 1 / n), size=n_boot).astype(float)
        sides = []
        for side in (a[d], b[d]):
            per_seed = side.losses(weights)  # [B, seeds]
            pick = rng.integers(0, per_seed.shape[1], size=per_seed.shape)
            sides.append(np.take_along_axis(per_seed, pick, axis=1).mean(1))
        reps[d] = sides[0] - sides[1]
        point[d] = float(a[d].losses().mean() - b[d].losses().mean())
    reps[MEAN] = np.mean([reps[d] for d in domains], axis=0)
    point[MEAN] = float(np.mean([point[d] for d in domains]))
    return {d: Difference(point[d], float(np.percentile(r, tail)),
                          float(np.percentile(r, 100 - tail))) for d, r in reps.items()}


def describe(diff: Difference, a: str, b: str) -> str:
    """One clause that claims no more than the interval says."""
    span = f"{diff.diff:+.3f} nats [95% CI {diff.low:+.3f}, {diff.high:+.3f}]"
    if not diff.significant:
        return f"{a} and {b} cannot be told apart ({a} - {b} = {span})"
    better = a if diff.diff < 0 else b
    return f"{better} is better ({a} - {b} = {span})"
