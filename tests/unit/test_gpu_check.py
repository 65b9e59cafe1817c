"""bench/gpu_check.py's CPU-side logic: arguments, skipping, budget, the table, and that the
commands it runs name scripts and flags that exist (it must work unchanged on a GPU)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check as check

ROOT = Path(__file__).resolve().parents[2]

NO_GPU = {"cuda": False, "pytest": True, "transformers": True, "pydantic": True,
          "flash_attn": False, "bitsandbytes": True, "axolotl": True}
ALL = dict.fromkeys(NO_GPU, True)
PYTEST_OK = "....\n===== 4 passed, 1 skipped in 12.34s =====\n"


def _ctx(tmp_path) -> check.Context:
    return check.Context(out=tmp_path, python=sys.executable, env={})


class FakeRunner:
    """Replays (rc, output) per step name and records what would have run."""

    def __init__(self, replies: dict[str, tuple[int | None, str]]) -> None:
        self.replies, self.calls = replies, []

    def __call__(self, cmd, env, timeout, log):
        name = log.stem
        self.calls.append((name, cmd, timeout))
        return self.replies.get(name, (0, 'GPU_CHECK_FIGURE: {"figure": "ok"}'))


def test_without_cuda_every_step_is_skipped_and_nothing_runs(tmp_path):
    runner = FakeRunner({})
    results = check.run_steps(check.all_steps(), _ctx(tmp_path), NO_GPU, 450, runner=runner)
    assert runner.calls == []
    assert [r.status for r in results] == ["SKIP"] * 6
    assert {r.figure for r in results} == {"no CUDA GPU", "no CUDA GPU, no flash_attn"}


def test_the_lent_gpu_image_without_axolotl_skips_the_axolotl_runs(tmp_path):
    """The lent machine has torch, transformers and pytest, not axolotl or bitsandbytes."""
    have = {**ALL, "axolotl": False, "bitsandbytes": False, "flash_attn": False}
    runner = FakeRunner({"tests": (0, PYTEST_OK)})
    results = {r.step: r for r in check.run_steps(check.all_steps(), _ctx(tmp_path), have,
                                                  10_000, runner=runner)}
    assert [c[0] for c in runner.calls] == ["tests", "layer576", "layer4096", "compile"]
    assert results["qlora"].figure == "no bitsandbytes, no axolotl"
    # Without pydantic moce_plugin does not import: every step says so.
    results = check.run_steps(check.all_steps(), _ctx(tmp_path), {**have, "pydantic": False},
                              10_000, runner=FakeRunner({}))
    assert all(r.status == "SKIP" and "no pydantic" in r.figure for r in results)


def test_missing_library_skips_only_its_step(tmp_path):
    have = {**ALL, "flash_attn": False}
    runner = FakeRunner({"tests": (0, PYTEST_OK)})
    results = {r.step: r for r in check.run_steps(check.all_steps(), _ctx(tmp_path), have, 10_000,
                                               runner=runner)}
    assert results["flash_pack"].status == "SKIP"
    assert results["flash_pack"].figure == "no flash_attn"
    assert "flash_pack" not in [c[0] for c in runner.calls]
    assert results["tests"].status == "PASS" and results["tests"].figure == "4 passed, 1 skipped"


def test_statuses_from_exit_codes_timeouts_and_figures(tmp_path):
    replies = {
        "tests": (1, "F.\n===== 1 failed, 1 passed in 3.0s =====\n"),
        "compile": (None, ""),
        "flash_pack": (1, "Traceback...\nRuntimeError: boom"),
        "qlora": (0, 'GPU_CHECK_FIGURE: {"figure": "loss 5 -> 6", '
                     '"problem": "the loss did not fall"}'),
    }
    steps = check.select_steps("tests,compile,flash_pack,qlora", None, check.all_steps())
    results = {r.step: r for r in check.run_steps(steps, _ctx(tmp_path), ALL, 10_000,
                                               runner=FakeRunner(replies))}
    assert results["tests"].status == "FAIL" and "1 failed" in results["tests"].figure
    assert results["compile"].status == "TIMEOUT"
    assert results["flash_pack"].status == "FAIL"
    assert "RuntimeError: boom" in results["flash_pack"].figure
    assert results["qlora"].status == "FAIL"
    assert results["qlora"].figure == "loss 5 -> 6 -- the loss did not fall"


def test_budget_cuts_timeouts_and_skips_what_cannot_start(tmp_path):
    now = [0.0]

    def clock() -> float:
        return now[0]

    def runner(cmd, env, timeout, log):
        calls.append((log.stem, timeout))
        now[0] += 100  # every step takes 100 s
        return 0, PYTEST_OK if log.stem == "tests" else 'GPU_CHECK_FIGURE: {"figure": "x"}'

    calls: list = []
    steps = check.select_steps("tests,compile,flash_pack,qlora", None, check.all_steps())
    results = check.run_steps(steps, _ctx(tmp_path), ALL, 310, runner=runner, clock=clock)
    # 310 s: three steps start (the third with 110 s left, below its own 120 s timeout);
    # the fourth would start with 10 s left and is skipped.
    assert calls == [("tests", 150), ("compile", 150), ("flash_pack", 110)]
    assert results[-1].status == "SKIP" and results[-1].figure.startswith("budget spent")


def test_step_selection_and_unknown_names():
    names = [s.name for s in check.select_steps(None, "qlora,tests", check.all_steps())]
    assert names == ["layer576", "layer4096", "compile", "flash_pack"]
    with pytest.raises(SystemExit, match=r"unknown step\(s\) \['layer'\].*layer576"):
        check.select_steps("layer", None, check.all_steps())
    args = check.parse_args([])
    assert (args.steps, args.skip, args.budget) == (None, None, 450.0)
    assert args.budget < 8 * 60  # the whole check fits the 8 minutes a lent GPU allows


def test_table_is_aligned_and_lists_every_step():
    results = [check.Result("tests", "PASS", "4 passed", 12.3),
               check.Result("flash_pack", "SKIP", "no flash_attn", 0.0)]
    table = check.format_table(results)
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(ln) for ln in lines}) == 1
    assert re.match(r"\| step +\| status \| figure +\| seconds \|", lines[0])
    assert "| flash_pack | SKIP   | no flash_attn | 0.0     |" in table


def test_main_without_gpu_prints_the_table_and_writes_the_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(check, "probe_requirements", lambda: NO_GPU)
    assert check.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| layer4096  | SKIP   | no CUDA GPU" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["SKIP"] * 6
    assert (tmp_path / "summary.md").read_text().startswith("| step")


def test_layer_figure_reads_the_bench_csv(tmp_path):
    (tmp_path / "layer576.csv").write_text(
        "d,tokens,moce_ms,adapter_ms,ffn_ms,moce_over_adapter,moce_peak_mb,adapter_peak_mb\n"
        "576,8192,3.5,2.0,1.5,1.75,120.0,100.0\n")
    step = next(s for s in check.all_steps() if s.name == "layer576")
    figure, problem = step.figure(_ctx(tmp_path), "")
    assert problem is None
    assert figure == ("moce 3.50 ms, adapter 2.00 ms, ffn 1.50 ms, moce/adapter 1.75, "
                      "mem 120/100 MB")
    (tmp_path / "layer576.csv").unlink()
    assert step.figure(_ctx(tmp_path), "")[1] == "bench_layer wrote no layer576.csv"


def test_commands_name_existing_files_and_flags(tmp_path):
    """What runs on the GPU is checked here: script paths, pytest files, every flag."""
    ctx = _ctx(tmp_path)
    helps: dict[str, str] = {}
    for step in check.all_steps():
        cmd = step.command(ctx)
        assert cmd[0] == sys.executable
        if cmd[1:3] == ["-m", "pytest"]:
            files = [a for a in cmd[3:] if a.endswith(".py")]
            assert files and all((ROOT / f).is_file() for f in files), files
            continue
        if cmd[1] == "-m":  # a bench module, run from the repository root
            script, argv = ROOT / (cmd[2].replace(".", "/") + ".py"), ["-m", cmd[2]]
            args = cmd[3:]
        else:
            script, argv, args = ROOT / cmd[1], [str(ROOT / cmd[1])], cmd[2:]
        assert script.is_file(), cmd
        if script.name == "gpu_check.py":  # a child step: its own argument parser
            from bench import gpu_check_children

            with pytest.raises(SystemExit) as e:  # argparse --help exits 0
                gpu_check_children.main([*args, "--help"])
            assert e.value.code == 0
            continue
        if script not in helps:
            helps[script] = subprocess.run([sys.executable, *argv, "--help"],
                                           capture_output=True, text=True, cwd=ROOT).stdout
        for flag in (a for a in args if a.startswith("--")):
            assert re.search(rf"{flag}\b", helps[script]), (script.name, flag)


def test_gpu_tests_listed_are_all_the_cuda_only_files():
    """A new CUDA-only test file must be added to the check."""
    cuda_only = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
        if re.search(r"skipif\(\s*not torch\.cuda\.is_available\(\)", p.read_text()))
    assert cuda_only and set(cuda_only) <= set(check.GPU_TESTS)


def test_axolotl_configs_of_the_gpu_runs():
    from bench import gpu_check_children as ch

    flash = ch.axolotl_config("flash_pack", Path("/m"), Path("/d.jsonl"), Path("/o"))
    assert flash["attn_implementation"] == "flash_attention_2" and flash["sample_packing"]
    assert flash["bf16"] is True and flash["plugins"] == ["moce_plugin.MoCEPlugin"]
    qlora = ch.axolotl_config("qlora", Path("/m"), Path("/d.jsonl"), Path("/o"))
    assert (qlora["adapter"], qlora["load_in_4bit"], qlora["lora_target_linear"]) == (
        "qlora", True, True)
    with pytest.raises(ValueError):
        ch.axolotl_config("dpo", Path("/m"), Path("/d.jsonl"), Path("/o"))


@pytest.mark.parametrize("text, figure, problem", [
    # what `pytest -q` printed on the lent H200: no "=" rules around the closing line
    ("........                                                                 [100%]\n"
     "8 passed in 14.56s\n", "8 passed", None),
    ("..s\n2 passed, 1 skipped in 3.10s\n", "2 passed, 1 skipped", None),
    ("F.\n==== 1 failed, 1 passed in 2.00s ====\n", "1 failed, 1 passed", "1 failed, 1 passed"),
    ("ss\n2 skipped in 0.50s\n", "2 skipped", "nothing passed (2 skipped)"),
    ("ImportError while loading conftest\n", "no pytest summary",
     "pytest printed no summary line"),
])
def test_pytest_figure_reads_the_quiet_closing_line(tmp_path, text, figure, problem):
    assert check.pytest_figure(_ctx(tmp_path), text) == (figure, problem)
