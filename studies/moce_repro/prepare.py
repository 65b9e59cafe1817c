"""Build the reproduction's data splits and cluster them (MoCE stage 1).

    python -m studies.moce_repro.prepare [--data-dir ../shared/data] [--train-per-domain 200]
                                      [--heldout-per-domain 60] [--steps 40] ...

Writes ``outputs/reproduce/`` (override with MOCE_REPRODUCE_DIR): ``settings.json`` (sizes
every run shares), ``data/train.jsonl`` and ``data/heldout.jsonl`` (disjoint; held-out rows
are drawn first, so growing --train-per-domain never moves a row into training), and
``clusters/`` (preprocess/cluster.py with the elbow method). Re-running with the same
settings reuses everything; while runs exist, changed training settings are refused and
changed evaluation settings (--eval-per-domain, --gsm8k-generate, --max-new-tokens) only
make the runs re-evaluate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import yaml

from .repro_config import (
    CLUSTERS,
    DATA_DIR,
    DOMAINS,
    ENV,
    HELDOUT_FILE,
    ROOT,
    RUNS_DIR,
    SETTINGS_FILE,
    TRAIN_FILE,
    WORK,
    Settings,
    clustering_settings,
)

# Settings that change only the evaluation: changing them keeps the trained runs.
EVAL_ONLY = {"eval_per_domain", "gsm8k_generate", "max_new_tokens"}

SOURCES = {
    "alpaca": "alpaca_5000.json",
    "code_alpaca": "code_alpaca_4535.json",
    "gsm8k": "gsm8k_train.jsonl",
}


def load_domain(data_dir: Path, domain: str) -> list[dict]:
    """Rows of one domain in alpaca fields, from the shared data folder or from one jsonl
    file whose rows carry a ``source`` field (e.g. examples/data/moce_sample.jsonl)."""
    if data_dir.is_file():
        rows = [json.loads(line) for line in data_dir.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        return [{"instruction": r["instruction"], "input": r.get("input", "") or "",
                 "output": r["output"], "source": domain} for r in rows
                if r.get("source") == domain]
    path = data_dir / SOURCES[domain]
    if not path.is_file():
        raise SystemExit(
            f"{path} not found. Point --data-dir at the folder holding "
            f"{', '.join(SOURCES.values())} (the project's shared/data)."
        )
    text = path.read_text(encoding="utf-8")
    raw = json.loads(text) if path.suffix == ".json" else [
        json.loads(line) for line in text.splitlines() if line.strip()]
    if domain == "gsm8k":  # question -> instruction, answer -> output (alpaca fields)
        raw = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in raw]
    return [{"instruction": r["instruction"], "input": r.get("input", "") or "",
             "output": r["output"], "source": domain} for r in raw]


def build_splits(s: Settings) -> dict[str, int]:
    rng = random.Random(s.seed)
    train, heldout = [], []
    for domain in DOMAINS:
        rows = [r for r in load_domain(Path(s.data_dir), domain)
                if len(json.dumps(r)) <= s.max_chars]
        rng.shuffle(rows)
        need = s.heldout_per_domain + s.train_per_domain
        if len(rows) < need:
            raise SystemExit(f"{domain}: {len(rows)} usable rows, {need} needed.")
        heldout += rows[: s.heldout_per_domain]
        train += rows[s.heldout_per_domain: need]
    rng.shuffle(train)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for path, rows in ((TRAIN_FILE, train), (HELDOUT_FILE, heldout)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
    return {"train": len(train), "heldout": len(heldout)}


def cluster(s: Settings) -> None:
    cfg = dict(
        base_model=s.base_model,
        plugins=["moce_plugin.MoCEPlugin"],
        moce=dict(num_clusters="auto", cluster_artifact=str(CLUSTERS),
                  clustering=clustering_settings(s)),
        datasets=[dict(path=str(TRAIN_FILE), type="alpaca", ds_type="json")],
    )
    path = WORK / "cluster.yml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, str(ROOT / "preprocess" / "cluster.py"), str(path)],
                   check=True, cwd=ROOT, env={**__import__("os").environ, **ENV})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Settings):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                            default=field.default)
    args = parser.parse_args()
    s = Settings(**vars(args))
    if s.eval_per_domain > s.heldout_per_domain:
        raise SystemExit(
            f"--eval-per-domain {s.eval_per_domain} exceeds --heldout-per-domain "
            f"{s.heldout_per_domain}: only held-out rows are scored. Lower --eval-per-domain, "
            "or raise --heldout-per-domain (this moves rows out of training: new "
            "MOCE_REPRODUCE_DIR).")
    if s.gsm8k_generate > s.eval_per_domain:
        raise SystemExit(f"--gsm8k-generate {s.gsm8k_generate} exceeds --eval-per-domain "
                         f"{s.eval_per_domain}: generation uses the scored GSM8K rows.")
    if SETTINGS_FILE.is_file() and RUNS_DIR.is_dir() and any(RUNS_DIR.iterdir()):
        old = dataclasses.asdict(Settings.load())
        changed = {k: (v, getattr(s, k)) for k, v in old.items() if v != getattr(s, k)}
        if set(changed) - EVAL_ONLY:
            raise SystemExit(
                f"settings differ from the existing runs' {changed}; remove {RUNS_DIR} "
                "(or set MOCE_REPRODUCE_DIR to a new folder) to start over."
            )
        if changed:  # trained models stay; only their metrics are recomputed
            for metrics in RUNS_DIR.glob("*/metrics.json"):
                metrics.unlink()
            print(f"evaluation settings changed {changed}: runs will be re-evaluated, "
                  "not retrained")
    s.save()
    print("splits:", build_splits(s))
    cluster(s)
    print(f"ready: {WORK}")


if __name__ == "__main__":
    main()
