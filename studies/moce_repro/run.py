"""Train (with `axolotl train`) and evaluate reproduction runs.

    python -m studies.moce_repro.run moce            # one run
    python -m studies.moce_repro.run moce --seed 2   # the same with seed 2: runs/moce@s2
    python -m studies.moce_repro.run main3           # a group: lora_mlp, pesc, moce x 3 seeds
    python -m studies.moce_repro.run study --plan    # what is left to run, estimated wall time
    python -m studies.moce_repro.run study           # the whole seeded study
    python -m studies.moce_repro.run all             # every unseeded run not done yet
    python -m studies.moce_repro.run --list

Each run writes ``outputs/reproduce/runs/<name>/``: ``config.yml``, ``train.log``, the
trained ``model/`` and ``metrics.json``. A run with metrics is skipped (pass --force to redo
it); an interrupted training resumes from its last checkpoint. A run being done by another
``run.py`` (a ``.lock`` with a live process id) is skipped too, so two shells can share a
group. Needs prepare.py first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .repro_config import (
    ENV,
    GROUPS,
    ROOT,
    RUNS,
    SETTINGS_FILE,
    Run,
    Settings,
    get_run,
    run_dir,
    train_config,
)

HERE = Path(__file__).resolve().parent
# The committed metrics of the first (single-seed) runs: the per-run times of the plan.
REFERENCE_METRICS = ROOT / "docs" / "results" / "metrics.json"
# New run definitions are timed like the measured run they resemble most.
REFERENCE_RUN = {"pesc8": "pesc", "pesc4": "pesc", "moce_pairs": "moce",
                 "lora_mlp_long": "lora_mlp", "pesc_long": "pesc", "moce_long": "moce"}


def machine() -> str:
    import torch

    from bench.machine_info import cpu_model

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"


def machine_record() -> dict:
    """What the wall times were measured on; the load average tells whether the cores were
    shared with other work (a time on a loaded machine is not a per-run cost)."""
    import torch

    return {"machine": machine(), "host": socket.gethostname(),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_1min": os.getloadavg()[0]}


def train_command(run: Run, cfg_path: Path) -> list[str]:
    if run.seed is None:  # the original runs: plain axolotl train, as they were measured
        return [sys.executable, "-m", "axolotl.cli.train", str(cfg_path)]
    return [sys.executable, str(HERE / "seeded_train.py"), str(run.seed), str(cfg_path)]


def checkpoints(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def train(run: Run, s: Settings, out: Path) -> dict:
    cfg = train_config(run, s)
    cfg_path = out / "config.yml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = out / "train.log"
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"[{run.name}] training {cfg['max_steps']} steps, log: {log}", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        proc = subprocess.run(train_command(run, cfg_path), cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"[{run.name}] axolotl train failed (rc {proc.returncode}):\n{tail}")
    found = checkpoints(Path(cfg["output_dir"]))
    state = json.loads((found[-1] / "trainer_state.json").read_text())
    history = [h for h in state["log_history"] if "loss" in h]
    record = {"train_seconds": seconds, "history": history,
              "trainable_params": trainable_params(log)}
    if run.curve_points:
        record["curve"], record["curve_seconds"] = curve(run, s, found)
    for ckpt in found:  # the final model is saved beside them; checkpoints are large
        shutil.rmtree(ckpt)
    return record


def curve(run: Run, s: Settings, found: list[Path]) -> tuple[list[dict], float]:
    """Held-out answer loss (per domain and per row) of every checkpoint."""
    from .heldout_metrics import evaluate

    t0 = time.time()
    points = []
    for ckpt in found:
        step = int(ckpt.name.split("-")[1])
        print(f"[{run.name}] held-out loss at step {step}", flush=True)
        m = evaluate(run, s, model_dir=ckpt, loss_only=True)
        points.append({"step": step, "loss": m["loss"], "rows": m["rows"]})
    return points, time.time() - t0


def trainable_params(log: Path) -> int | None:
    """Axolotl logs the trainable parameter count; take the last one reported."""
    import re

    text = log.read_text()
    found = re.findall(r"trainable in total: ([\d,]+)", text) or re.findall(
        r"trainable params:? ?([\d,]+)", text, flags=re.I)
    return int(found[-1].replace(",", "")) if found else None


def take_lock(out: Path) -> bool:
    """Claim a run for this process; False when a live process holds it."""
    lock = out / ".lock"
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError):  # stale: its process is gone
                lock.unlink(missing_ok=True)
                continue
            except PermissionError:  # alive, another user's
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


# Settings that name paths of one checkout; the rest must agree for a recorded run to count.
_PATH_SETTINGS = ("base_model", "data_dir")


def recorded_run(name: str, s: Settings, path: Path = REFERENCE_METRICS) -> dict | None:
    """A seeded run's metrics as committed by report.py (docs/results/metrics.json) when it was
    measured with the same settings: outputs/ is not in git, so a fresh checkout would
    otherwise redo (and the report drop) runs that are already measured."""
    if not path.is_file():
        return None
    run = json.loads(path.read_text()).get(name)
    if not run:
        return None
    mine = {k: v for k, v in s.__dict__.items() if k not in _PATH_SETTINGS}
    theirs = {k: v for k, v in run.get("settings", {}).items() if k not in _PATH_SETTINGS}
    return run if mine == theirs else None


def do_run(run: Run, s: Settings, force: bool) -> None:
    from .heldout_metrics import evaluate

    out = run_dir(run)
    metrics_path = out / "metrics.json"
    if metrics_path.is_file() and not force:
        print(f"[{run.name}] done already ({metrics_path}); --force redoes it")
        return
    if "@s" in run.name and recorded_run(run.name, s) and not force:
        print(f"[{run.name}] recorded in {REFERENCE_METRICS} with these settings (a run of "
              "another checkout); --force redoes it")
        return
    if not take_lock(out):
        print(f"[{run.name}] being run by another process ({out / '.lock'}); skipped")
        return
    try:
        t0 = time.time()
        where = machine_record()
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
        metrics.update(record, **where, settings=s.__dict__, seed=run.seed,
                       config=run.config, wall_seconds=time.time() - t0,
                       load_average_1min_end=os.getloadavg()[0])
        tmp = metrics_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics, indent=1))
        tmp.replace(metrics_path)
    finally:
        (out / ".lock").unlink(missing_ok=True)
    loss = {d: round(v["loss"], 4) for d, v in metrics["loss"].items()}
    print(f"[{run.name}] held-out answer loss {loss}, GSM8K EM "
          f"{metrics['gsm8k']['exact_match']:.3f}, eval {metrics['eval_seconds']:.0f} s"
          + (f", train {record['train_seconds']:.0f} s" if record else ""), flush=True)


def estimate_seconds(run: Run, s: Settings,
                     reference: dict[str, dict]) -> tuple[float, float] | None:
    """(low, high) wall time of a run from the measured time of the run it resembles.
    Training scales with steps. High: evaluation scaled by scored rows and paid again at
    every curve checkpoint; low: evaluation as measured (its greedy generations do not grow
    with the rows) and checkpoint scoring free. The truth lies between."""
    ref = reference.get(REFERENCE_RUN.get(run.config, run.config))
    if not ref or "eval_seconds" not in ref:
        return None
    rs = ref["settings"]
    train = ref.get("train_seconds", 0.0) * s.steps * run.steps_multiplier / rs["steps"]
    evaluation = ref["eval_seconds"] * max(1.0, s.eval_per_domain / rs["eval_per_domain"])
    return train + ref["eval_seconds"], train + evaluation * (1 + run.curve_points)


def span(low: float, high: float, unit: float, name: str) -> str:
    a, b = round(low / unit, 1), round(high / unit, 1)
    return f"~{a:g} {name}" if a == b else f"~{a:g}-{b:g} {name}"


def plan(runs: list[Run], s: Settings, reference_path: Path = REFERENCE_METRICS) -> str:
    reference = json.loads(reference_path.read_text()) if reference_path.is_file() else {}
    lines, low, high, unknown = [], 0.0, 0.0, []
    for run in runs:
        if (run_dir(run) / "metrics.json").is_file() or (
                "@s" in run.name and recorded_run(run.name, s, reference_path)):
            lines.append(f"  {run.name:18s} done")
            continue
        est = estimate_seconds(run, s, reference)
        if est is None:
            unknown.append(run.name)
            lines.append(f"  {run.name:18s} no estimate")
            continue
        low, high = low + est[0], high + est[1]
        lines.append(f"  {run.name:18s} {span(*est, 60, 'min')}")
    lines.append(f"to do: {span(low, high, 3600, 'h')} of per-run wall time (from "
                 f"{reference_path}, whose runs shared 2 CPU cores with one or two others)"
                 + (f"; no estimate for {unknown}" if unknown else ""))
    return "\n".join(lines)


def resolve(names: list[str], seeds: list[int] | None) -> list[Run]:
    """Run names, groups and 'all' -> runs; --seed applies to names without a seed."""
    expanded: list[str] = []
    for name in names:
        if name == "all":
            expanded += list(RUNS)
        elif name in GROUPS:
            expanded += GROUPS[name]
        elif seeds and "@" not in name:
            expanded += [f"{name}@s{seed}" for seed in seeds]
        else:
            expanded.append(name)
    runs = [get_run(n) for n in dict.fromkeys(expanded)]
    if seeds and any(r.kind == "base" for r in runs):
        raise SystemExit("the base model is not trained: leave it out of a --seed call")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run names (name@sN: seed N), groups, or 'all'")
    parser.add_argument("--seed", type=int, nargs="+", help="seed(s) for the named runs")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--plan", action="store_true",
                        help="print what is left to run and its estimated time; run nothing")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if args.list or not args.runs:
        for run in RUNS.values():
            print(f"{run.name:14s} {run.label}")
        for group, names in GROUPS.items():
            print(f"{group:14s} group: {' '.join(names)}")
        return
    runs = resolve(args.runs, args.seed)
    if args.plan:  # before prepare.py, with the default settings
        print(plan(runs, Settings.load() if SETTINGS_FILE.is_file() else Settings()))
        return
    s = Settings.load()
    print(f"machine: {machine()} ({platform.platform()})")
    for run in runs:
        do_run(run, s, args.force)


if __name__ == "__main__":
    main()
