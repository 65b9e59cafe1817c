"""Train (with `axolotl train`) and evaluate reproduction runs.

    python bench/reproduce/run.py moce            # one run
    python bench/reproduce/run.py all             # every run not done yet, in order
    python bench/reproduce/run.py --list

Each run writes ``outputs/reproduce/runs/<name>/``: ``config.yml``, ``train.log``, the
trained ``model/`` and ``metrics.json``. A run with metrics is skipped (pass --force to redo
it); an interrupted training resumes from its last checkpoint. Needs prepare.py first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from repro_config import ENV, ROOT, RUNS, RUNS_DIR, Run, Settings, train_config


def machine() -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from machine_info import cpu_model

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"


def train(run: Run, s: Settings, out: Path) -> dict:
    cfg = train_config(run, s)
    cfg_path = out / "config.yml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = out / "train.log"
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"[{run.name}] training {s.steps} steps, log: {log}", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(cfg_path)],
                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"[{run.name}] axolotl train failed (rc {proc.returncode}):\n{tail}")
    model_dir = Path(cfg["output_dir"])
    checkpoints = sorted(model_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    history = [h for h in state["log_history"] if "loss" in h]
    for ckpt in checkpoints:  # the final model is saved beside them; checkpoints are large
        shutil.rmtree(ckpt)
    return {"train_seconds": seconds, "history": history,
            "trainable_params": trainable_params(log)}


def trainable_params(log: Path) -> int | None:
    """Axolotl logs the trainable parameter count; take the last one reported."""
    import re

    text = log.read_text()
    found = re.findall(r"trainable in total: ([\d,]+)", text) or re.findall(
        r"trainable params:? ?([\d,]+)", text, flags=re.I)
    return int(found[-1].replace(",", "")) if found else None


def do_run(run: Run, s: Settings, force: bool) -> None:
    from heldout_metrics import evaluate

    out = RUNS_DIR / run.name
    metrics_path = out / "metrics.json"
    if metrics_path.is_file() and not force:
        print(f"[{run.name}] done already ({metrics_path}); --force redoes it")
        return
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {}
    if run.kind != "base":
        done = out / "train.json"
        if done.is_file() and not force:
            record = json.loads(done.read_text())
        else:
            if force and (out / "model").exists():
                shutil.rmtree(out / "model")
            record = train(run, s, out)
            done.write_text(json.dumps(record))
    print(f"[{run.name}] evaluating", flush=True)
    metrics = evaluate(run, s)
    metrics.update(record, machine=machine(), settings=s.__dict__)
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(metrics_path)
    loss = {d: round(v["loss"], 4) for d, v in metrics["loss"].items()}
    print(f"[{run.name}] held-out answer loss {loss}, GSM8K EM "
          f"{metrics['gsm8k']['exact_match']:.3f}, eval {metrics['eval_seconds']:.0f} s"
          + (f", train {record['train_seconds']:.0f} s" if record else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run names, or 'all'")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if args.list or not args.runs:
        for run in RUNS.values():
            print(f"{run.name:12s} {run.label}")
        return
    names = list(RUNS) if args.runs == ["all"] else args.runs
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {list(RUNS)} or 'all'")
    s = Settings.load()
    print(f"machine: {machine()} ({platform.platform()})")
    for name in names:
        do_run(RUNS[name], s, args.force)


if __name__ == "__main__":
    main()
