"""One-command GPU acceptance check: every GPU-only check in one run, one summary table.

    bash bench/gpu_check.sh                     # all steps, about 5-7 minutes on one GPU
    bash bench/gpu_check.sh --steps tests,layer576 --budget 200
    python -m bench.gpu_check --list            # the steps and their timeouts, nothing run

Steps (each in its own subprocess with its own timeout, skipped with the reason when what it
needs is missing: no CUDA, no flash_attn, no bitsandbytes; the whole run also has a budget,
and a step that would start with too little of it left is skipped):

- ``tests``:      the GPU-only pytest files (their CUDA skips lifted by the GPU).
- ``layer576``:   bench.bench_layer in bf16, d=576/1536, 8192 tokens, C7 E4 top-2:
                  MoCE vs FFN + one adapter of equal rank (figure: MoCE/adapter time).
- ``layer4096``:  the same at d=4096/11008.
- ``compile``:    a train step (fwd + bwd + AdamW) of a small upcycled llama, eager vs
                  ``torch.compile``, cluster mixes changing every step (figure: the ratio,
                  graph breaks and recompiles counted by dynamo).
- ``flash_pack``: ``axolotl train`` on a tiny llama with ``attn_implementation:
                  flash_attention_2`` and ``sample_packing: true`` (figure: loss first -> last).
- ``qlora``:      ``axolotl train`` with ``adapter: qlora``, ``load_in_4bit: true`` on the GPU.

Status per step: PASS, FAIL (non-zero exit or a broken check; its log is named), TIMEOUT,
SKIP (with the reason). The exit code is 1 when any step failed or timed out.
Logs and the table (``summary.json``, ``summary.md``) go to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURE_TAG = "GPU_CHECK_FIGURE:"
# Below this many seconds of budget a step is not started: it could not finish anyway.
MIN_STEP_SECONDS = 20
GPU_TESTS = ("tests/e2e/test_layer_cuda.py", "tests/e2e/test_quantized_gpu.py")
# What importing moce_plugin's model code needs beyond torch (a bare GPU image may lack
# pydantic: carry it as wheels, see GPU_CHECK_WHEELS in gpu_check.sh).
MOCE_NEEDS = ("transformers", "pydantic")


@dataclass
class Step:
    name: str
    what: str
    timeout: int
    requires: tuple[str, ...]
    # (context) -> command; the command runs in ROOT with the check's environment.
    command: Callable[[Context], list[str]]
    # (context, output text) -> (figure, problem or None); a problem turns PASS into FAIL.
    figure: Callable[[Context, str], tuple[str, str | None]]


@dataclass
class Context:
    out: Path
    python: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    step: str
    status: str
    figure: str
    seconds: float
    log: str = ""


# --------------------------------------------------------------------------- requirements
def probe_requirements() -> dict[str, bool]:
    """What is available here: cuda and the packages the steps need."""
    have = {name: importlib.util.find_spec(name) is not None
            for name in ("pytest", "transformers", "pydantic", "flash_attn", "bitsandbytes",
                         "axolotl")}
    try:
        import torch

        have["cuda"] = bool(torch.cuda.is_available())
    except ImportError:
        have["cuda"] = False
    return have


def missing(step: Step, have: dict[str, bool]) -> str | None:
    """The skip reason of ``step`` given ``have``, or None when it can run."""
    lacking = [r for r in step.requires if not have.get(r, False)]
    if not lacking:
        return None
    return "no " + ", no ".join("CUDA GPU" if r == "cuda" else r for r in lacking)


# --------------------------------------------------------------------------- figures
def last_figure(text: str) -> str | None:
    lines = [ln[len(FIGURE_TAG):].strip() for ln in text.splitlines()
             if ln.startswith(FIGURE_TAG)]
    return lines[-1] if lines else None


def pytest_figure(_ctx: Context, text: str) -> tuple[str, str | None]:
    """pytest's closing line, e.g. ``3 passed, 1 skipped in 12.3s`` -> ``3 passed, 1 skipped``."""
    # `-q` prints the line bare ("8 passed in 14.6s"), without it between "=" rules
    found = re.findall(r"^(?:=+ )?(\d+ (?:passed|failed|skipped|error|errors|deselected|"
                       r"xfailed|xpassed|warnings?)\b.*?) in [\d.]+s", text, re.MULTILINE)
    if not found:
        return "no pytest summary", "pytest printed no summary line"
    summary = found[-1]
    problem = None
    if re.search(r"\d+ (failed|error)", summary):
        problem = summary
    elif "passed" not in summary:
        problem = f"nothing passed ({summary})"
    return summary, problem


def layer_figure(csv_path: Path) -> Callable[[Context, str], tuple[str, str | None]]:
    def parse(_ctx: Context, _text: str) -> tuple[str, str | None]:
        if not csv_path.is_file():
            return "no CSV", f"bench_layer wrote no {csv_path.name}"
        rows = list(csv.DictReader(csv_path.open()))
        if not rows:
            return "no rows", "bench_layer wrote no row"
        r = rows[-1]
        fig = (f"moce {float(r['moce_ms']):.2f} ms, adapter {float(r['adapter_ms']):.2f} ms, "
               f"ffn {float(r['ffn_ms']):.2f} ms, moce/adapter {float(r['moce_over_adapter']):.2f}")
        if r.get("moce_peak_mb") and r.get("adapter_peak_mb"):
            fig += (f", mem {float(r['moce_peak_mb']):.0f}/{float(r['adapter_peak_mb']):.0f} MB")
        return fig, None
    return parse


def tagged_figure(_ctx: Context, text: str) -> tuple[str, str | None]:
    """The child's own ``GPU_CHECK_FIGURE: {"figure": ..., "problem": ...}`` line."""
    line = last_figure(text)
    if line is None:
        return "no figure", "the step printed no figure line"
    data = json.loads(line)
    return data["figure"], data.get("problem")


# --------------------------------------------------------------------------- steps
def _layer_step(name: str, hidden: int, inter: int, timeout: int) -> Step:
    def command(ctx: Context) -> list[str]:
        return [ctx.python, "-m", "bench.bench_layer", "--device", "cuda", "--dtype", "bfloat16",
                "--hidden", str(hidden), "--intermediate", str(inter),
                "--part", "tokens", "--tokens", "8192", "--impls", "moce,adapter,ffn",
                "--reps", "10", "--warmup", "3", "--csv", str(ctx.out / f"{name}.csv")]

    def figure(ctx: Context, text: str) -> tuple[str, str | None]:
        return layer_figure(ctx.out / f"{name}.csv")(ctx, text)

    return Step(name, f"bench_layer bf16 d={hidden}: MoCE vs FFN + one adapter", timeout,
                ("cuda", *MOCE_NEEDS), command, figure)


def all_steps() -> list[Step]:
    return [
        Step("tests", "GPU-only pytest files", 150, ("cuda", "pytest", *MOCE_NEEDS),
             lambda ctx: [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *GPU_TESTS], pytest_figure),
        _layer_step("layer576", 576, 1536, 75),
        _layer_step("layer4096", 4096, 11008, 90),
        Step("compile", "train step eager vs torch.compile", 150, ("cuda", *MOCE_NEEDS),
             lambda ctx: [ctx.python, "-m", "bench.gpu_check", "_compile", "--out", str(ctx.out)],
             tagged_figure),
        Step("flash_pack", "axolotl train, flash_attention_2 + sample_packing", 120,
             ("cuda", *MOCE_NEEDS, "flash_attn", "axolotl"),
             lambda ctx: [ctx.python, "-m", "bench.gpu_check", "_axolotl", "flash_pack", "--out",
                          str(ctx.out)], tagged_figure),
        Step("qlora", "axolotl train, QLoRA 4-bit on the GPU", 120,
             ("cuda", *MOCE_NEEDS, "bitsandbytes", "axolotl"),
             lambda ctx: [ctx.python, "-m", "bench.gpu_check", "_axolotl", "qlora", "--out",
                          str(ctx.out)],
             tagged_figure),
    ]


def select_steps(spec: str | None, skip: str | None, steps: list[Step]) -> list[Step]:
    names = [s.name for s in steps]
    chosen = spec.split(",") if spec else names
    dropped = skip.split(",") if skip else []
    unknown = [n for n in chosen + dropped if n not in names]
    if unknown:
        raise SystemExit(f"gpu_check: unknown step(s) {unknown}; the steps are {names}")
    return [s for s in steps if s.name in chosen and s.name not in dropped]


# --------------------------------------------------------------------------- running
def run_command(cmd: list[str], env: dict[str, str], timeout: float, log: Path
                ) -> tuple[int | None, str]:
    """(exit code or None on timeout, output). Its own process group: a timeout ends the
    step's children too (axolotl's dataloader workers, compile workers)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, log.read_text(errors="replace")


def run_steps(steps: list[Step], ctx: Context, have: dict[str, bool], budget: float,
              runner: Callable = run_command, clock: Callable[[], float] = time.monotonic
              ) -> list[Result]:
    start = clock()
    results = []
    for step in steps:
        reason = missing(step, have)
        left = budget - (clock() - start)
        if reason is None and left < MIN_STEP_SECONDS:
            reason = f"budget spent ({left:.0f} s left)"
        if reason is not None:
            results.append(Result(step.name, "SKIP", reason, 0.0))
            print(f"[gpu_check] {step.name}: SKIP ({reason})", flush=True)
            continue
        timeout = min(step.timeout, left)
        log = ctx.out / f"{step.name}.log"
        print(f"[gpu_check] {step.name}: {step.what} (timeout {timeout:.0f} s, log {log})",
              flush=True)
        t0 = clock()
        rc, text = runner(step.command(ctx), ctx.env, timeout, log)
        seconds = clock() - t0
        if rc is None:
            results.append(Result(step.name, "TIMEOUT", f"over {timeout:.0f} s", seconds,
                                  str(log)))
            continue
        try:
            figure, problem = step.figure(ctx, text)
        except Exception as e:  # a figure that cannot be read is the step's failure
            figure, problem = "unreadable output", f"{type(e).__name__}: {e}"
        if rc != 0:
            # A child that died before its figure: its last output line says more than
            # "no figure" does.
            tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or [""]
            exit_line = f"exit {rc}: {tail[0][-160:]}"
            if problem is None:
                problem = exit_line
            elif figure.startswith("no "):
                figure, problem = exit_line, exit_line
        status = "FAIL" if problem else "PASS"
        if problem and problem != figure:
            figure = f"{figure} -- {problem}"
        results.append(Result(step.name, status, figure, seconds, str(log)))
    return results


def format_table(results: list[Result]) -> str:
    rows = [("step", "status", "figure", "seconds")] + [
        (r.step, r.status, r.figure, f"{r.seconds:.1f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def check_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "bench"),
                                           env.get("PYTHONPATH", "")]))
    # A GPU check must see the GPU, whatever the caller's shell hid.
    if env.get("CUDA_VISIBLE_DEVICES") == "":
        env.pop("CUDA_VISIBLE_DEVICES")
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=None, help="comma list of steps (default: all)")
    p.add_argument("--skip", default=None, help="comma list of steps to leave out")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for the whole run; steps are cut to what is left (default 450)")
    p.add_argument("--out", default=None,
                   help="folder for logs and the table (default $OUT/gpu_check or "
                   "/tmp/moce_gpu_check)")
    p.add_argument("--python", default=sys.executable, help="the interpreter of every step")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("_compile", "_axolotl"):
        from bench import gpu_check_children

        return gpu_check_children.main(argv)
    args = parse_args(argv)
    steps = select_steps(args.steps, args.skip, all_steps())
    if args.list:
        for s in steps:
            print(f"{s.name:11s} {s.timeout:4d} s  needs {','.join(s.requires):40s} {s.what}")
        return 0
    out = Path(args.out or (Path(os.environ["OUT"]) / "gpu_check" if os.environ.get("OUT")
                            else "/tmp/moce_gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    have = probe_requirements()
    print(f"[gpu_check] available: {have}; budget {args.budget:.0f} s; logs in {out}",
          flush=True)
    ctx = Context(out=out, python=args.python, env=check_env())
    t0 = time.monotonic()
    results = run_steps(steps, ctx, have, args.budget)
    table = format_table(results)
    total = time.monotonic() - t0
    print(f"\nMoCE GPU check ({total:.0f} s):\n{table}", flush=True)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"available": have, "seconds": total, "results": [asdict(r) for r in results]},
        indent=1))
    return 1 if any(r.status in ("FAIL", "TIMEOUT") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
