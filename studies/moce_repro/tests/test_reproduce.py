"""The reproduction commands (studies/moce_repro): metric helpers, the run configs, and one
tiny end-to-end pass of prepare -> run -> report on the bundled sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from studies.moce_repro import repro_config as common
from studies.moce_repro.heldout_metrics import final_number, js_divergence

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("text,expected", [
    ("She pays 3 + 4 = 7.\n#### 1,234", "1234"),
    ("So the answer is 12.5.", "12.5"),
    ("#### 18.00", "18"),
    ("no number at all", None),
    ("first 3 then 5 #### 8 and 9", "8"),
])
def test_final_number(text, expected):
    assert final_number(text) == expected


def test_js_divergence_bounds():
    import numpy as np

    p = np.array([0.5, 0.5, 0.0, 0.0]) + 1e-12
    q = np.array([0.0, 0.0, 0.5, 0.5]) + 1e-12
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-9)
    assert js_divergence(p, q) == pytest.approx(1.0, abs=1e-6)


def test_every_run_config_is_valid(monkeypatch):
    from moce_plugin.model.config import MoCEConfig

    monkeypatch.setattr(common, "num_clusters", lambda: 3)
    s = common.Settings()
    for run in common.RUNS.values():
        if run.kind == "base":
            with pytest.raises(ValueError):
                common.train_config(run, s)
            continue
        cfg = common.train_config(run, s)
        assert cfg["max_steps"] == s.steps * run.steps_multiplier
        assert cfg["datasets"][0]["path"].endswith("train.jsonl")
        assert cfg["seed"] == 42 and "init_seed" not in cfg.get("moce", {})  # as measured
        if run.kind == "moce":
            moce = MoCEConfig(**cfg["moce"])
            if run.clustered:
                assert moce.num_clusters == 3 and moce.cluster_artifact
            else:  # PESC: one group, as many experts as MoCE has in all unless stated
                assert moce.num_clusters == 1 and not moce.cluster_artifact
                assert moce.experts_per_group == (run.experts or 3 * 4)
        else:
            assert cfg["adapter"] == "lora" and "moce" not in cfg
    moce_cfg = {n: common.train_config(common.RUNS[n], s)["moce"]
                for n in ("pesc8", "pesc4", "moce_pairs")}
    assert moce_cfg["pesc8"]["experts_per_group"] == 8 and moce_cfg["pesc8"]["top_k"] == 2
    assert moce_cfg["pesc4"]["experts_per_group"] == 4
    # the hypothesis run: each group has as many experts as PESC has in all
    assert moce_cfg["moce_pairs"]["experts_per_group"] == 12
    assert moce_cfg["moce_pairs"]["num_clusters"] == 3
    lora_long = common.train_config(common.RUNS["lora_mlp_long"], s)
    assert lora_long["lora_target_modules"] == ["gate_proj", "up_proj", "down_proj"]


def test_adapter_params_match_the_measured_counts():
    # axolotl's logged trainable counts of the single-seed runs (SmolLM2-135M, C = 3)
    measured = json.loads((ROOT / "docs" / "results" / "metrics.json").read_text())
    s = common.Settings()
    checked = 0
    for name, m in measured.items():
        run = common.get_run(name)  # single-seed runs and seeded ones (name@sN)
        if run.kind == "moce":
            moce = common.moce_block(run, s, m["groups"] if run.clustered else 3)
            assert common.adapter_params(moce, 576, 30) == m["trainable_params"], name
            checked += 1
    assert checked >= 8
    # the paper's PESC baselines have fewer adapter parameters than MoCE; moce_pairs 3x
    p = {n: common.adapter_params(common.moce_block(common.RUNS[n], s, 3), 576, 30)
         for n in ("moce", "pesc", "pesc8", "pesc4", "moce_pairs")}
    assert p["pesc4"] < p["pesc8"] < p["moce"] == p["pesc"] < p["moce_pairs"] == 3 * p["moce"]


def test_seeded_and_long_runs(monkeypatch):
    monkeypatch.setattr(common, "num_clusters", lambda: 3)
    s = common.Settings()
    run = common.get_run("moce@s2")
    assert (run.name, run.config, run.seed) == ("moce@s2", "moce", 2)
    assert common.run_dir(run) == common.RUNS_DIR / "moce@s2"
    cfg = common.train_config(run, s)
    assert cfg["seed"] == 2 and cfg["moce"]["init_seed"] == 2
    assert cfg["output_dir"] == str(common.RUNS_DIR / "moce@s2" / "model")
    assert common.train_config(common.get_run("lora_mlp@s3"), s)["seed"] == 3
    long = common.train_config(common.get_run("moce_long@s1"), s)
    steps = s.steps * common.LONG_MULTIPLIER
    assert common.LONG_MULTIPLIER >= 3 and long["max_steps"] == steps
    # every curve checkpoint is kept until it has been scored (axolotl: unset means 4)
    assert long["save_total_limit"] > common.CURVE_POINTS
    assert long["save_steps"] == steps // common.CURVE_POINTS
    # every name of every group resolves; the study has 3 seeds of each compared run
    for names in common.GROUPS.values():
        for name in names:
            common.get_run(name)
    study = common.GROUPS["study"]
    for config in ("lora_mlp", "pesc", "moce", "pesc8", "pesc4", "moce_pairs"):
        assert {f"{config}@s{n}" for n in common.SEEDS} <= set(study)
    assert {"lora_mlp_long@s1", "pesc_long@s1", "moce_long@s1"} <= set(study)


@pytest.mark.parametrize("name,message", [
    ("base@s1", "not trained"), ("mocee", "unknown run"), ("moce@x1", "unknown run")])
def test_bad_run_names(name, message):
    with pytest.raises(SystemExit, match=message):
        common.get_run(name)


def test_resolve_groups_and_seed_option():
    from studies.moce_repro import run as runner

    assert [r.name for r in runner.resolve(["moce", "pesc"], [1, 2])] == [
        "moce@s1", "moce@s2", "pesc@s1", "pesc@s2"]
    assert [r.name for r in runner.resolve(["main3"], None)] == common.GROUPS["main3"]
    assert [r.name for r in runner.resolve(["moce"], None)] == ["moce"]  # the original run
    with pytest.raises(SystemExit, match="base model is not trained"):
        runner.resolve(["base"], [1])


@pytest.mark.parametrize("args,message", [
    (["--eval-per-domain", "70"], "exceeds --heldout-per-domain 60"),
    (["--eval-per-domain", "10", "--gsm8k-generate", "20"], "exceeds --eval-per-domain 10")])
def test_prepare_refuses_more_scored_rows_than_held_out(tmp_path, args, message):
    env = {**os.environ, "MOCE_REPRODUCE_DIR": str(tmp_path / "work")}
    proc = subprocess.run([sys.executable, "-m", "studies.moce_repro.prepare", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "work").exists()  # refused before any work


def test_train_command_seeds_before_axolotl(tmp_path):
    from studies.moce_repro import run as runner

    cfg = tmp_path / "config.yml"
    seeded = runner.train_command(common.get_run("lora_mlp@s3"), cfg)
    assert seeded[1].endswith("seeded_train.py") and seeded[2:] == ["3", str(cfg)]
    assert runner.train_command(common.get_run("lora_mlp"), cfg)[1:] == [
        "-m", "axolotl.cli.train", str(cfg)]


def test_run_lock(tmp_path):
    from studies.moce_repro import run as runner

    out = tmp_path / "moce@s1"
    assert runner.take_lock(out)
    assert runner.take_lock(out)  # this process holds it already
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        assert not runner.take_lock(out)  # a live process has it
    finally:
        sleeper.kill()
        sleeper.wait()
    assert runner.take_lock(out)  # its process is gone: stale, taken over
    assert (out / ".lock").read_text() == str(os.getpid())


def test_plan_estimates_from_measured_times(monkeypatch, tmp_path):
    from studies.moce_repro import run as runner

    monkeypatch.setattr(common, "RUNS_DIR", tmp_path)
    reference = {"moce": {"train_seconds": 600.0, "eval_seconds": 120.0,
                          "settings": {"steps": 40, "eval_per_domain": 20}}}
    s = common.Settings(steps=40, eval_per_domain=60)
    # low: evaluation as measured; high: scaled by the 3x scored rows
    assert runner.estimate_seconds(common.get_run("moce@s1"), s, reference) == (720, 960)
    # 3x steps, and (high) 6 checkpoint evaluations on top of the final one
    assert runner.estimate_seconds(common.get_run("moce_long@s1"), s, reference) == (
        1920, 1800 + 360 * 7)
    assert runner.estimate_seconds(common.get_run("moce_pairs@s1"), s, reference) == (720, 960)
    assert runner.estimate_seconds(common.get_run("lora@s1"), s, reference) is None
    ref = tmp_path / "m.json"
    ref.write_text(json.dumps(reference))
    (tmp_path / "moce@s2").mkdir()
    (tmp_path / "moce@s2" / "metrics.json").write_text("{}")
    text = runner.plan([common.get_run(n) for n in ("moce@s1", "moce@s2", "lora@s1")], s, ref)
    assert "moce@s1" in text and "~12-16 min" in text and "done" in text
    assert "no estimate for ['lora@s1']" in text
    # the committed metrics of the measured runs give an estimate for every study run
    committed = json.loads((ROOT / "docs" / "results" / "metrics.json").read_text())
    for name in common.GROUPS["study"]:
        assert runner.estimate_seconds(common.get_run(name), s, committed)[0] > 0, name


def test_plan_before_prepare(tmp_path):
    env = {**os.environ, "MOCE_REPRODUCE_DIR": str(tmp_path / "work")}
    proc = subprocess.run([sys.executable, "-m", "studies.moce_repro.run", "study", "--plan"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "moce_long@s1" in proc.stdout and "to do: ~" in proc.stdout
    assert not (tmp_path / "work").exists()  # a plan runs nothing


def test_seeded_train_seeds_the_lora_initialisation(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from studies.moce_repro.seeded_train import seed_everything

    def lora_a(seed: int):
        seed_everything(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj"]))
        return next(p for n, p in model.named_parameters() if "lora_A" in n).detach().clone()

    assert torch_equal(lora_a(1), lora_a(1))
    assert not torch_equal(lora_a(1), lora_a(2))


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_seeded_train_usage():
    from studies.moce_repro.seeded_train import main

    with pytest.raises(SystemExit, match="usage"):
        main(["x", "config.yml"])


def test_gpu_recipe_configs(tmp_path):
    from moce_plugin.model.config import MoCEConfig
    from studies.moce_repro.gpu_recipe import TASKS, VARIANTS, main

    main(["--out", str(tmp_path), "--num-clusters", "7", "--seeds", "1", "2"])
    configs = sorted((tmp_path / "configs").glob("*.yml"))
    assert len(configs) == 2 * len(VARIANTS)
    import yaml

    cfgs = {p.stem: yaml.safe_load(p.read_text()) for p in configs}
    for name, cfg in cfgs.items():
        moce = MoCEConfig(**cfg["moce"])
        seed = int(name.split("@s")[1])
        assert cfg["seed"] == seed and moce.init_seed == seed
        assert cfg["output_dir"].endswith(f"{name}/model")
        # the paper's hyper-parameters, from examples/llama2-moce.yml
        assert (cfg["learning_rate"], cfg["sequence_len"], moce.adapter_dim, moce.top_k) == (
            2e-4, 512, 64, 2)
    assert cfgs["pesc@s1"]["moce"]["experts_per_group"] == 28  # C x E, one group
    assert cfgs["pesc8@s1"]["moce"]["experts_per_group"] == 8
    assert cfgs["pesc4@s2"]["moce"]["num_clusters"] == 1
    assert "cluster_artifact" not in cfgs["pesc8@s1"]["moce"]
    assert cfgs["moce_v@s1"]["moce"]["num_general_experts"] == 4
    script = (tmp_path / "run_all.sh").read_text()
    assert subprocess.run(["bash", "-n", str(tmp_path / "run_all.sh")]).returncode == 0
    assert all(t in script for t in TASKS) and script.count("axolotl.cli.train") == 10
    assert "--num_processes 8" in script


def test_gpu_recipe_needs_the_clusters(tmp_path, monkeypatch):
    from studies.moce_repro import gpu_recipe

    monkeypatch.setattr(gpu_recipe, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="preprocess/cluster.py"):
        gpu_recipe.num_clusters({"moce": {"cluster_artifact": str(tmp_path / "none")}})


@pytest.mark.slow
def test_prepare_run_report_end_to_end(tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    env = {**os.environ, "MOCE_REPRODUCE_DIR": str(work), "OMP_NUM_THREADS": "2"}

    def call(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                              capture_output=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    call("studies.moce_repro.prepare",
         "--data-dir", str(ROOT / "examples" / "data" / "moce_sample.jsonl"),
         "--train-per-domain", "24", "--heldout-per-domain", "3", "--eval-per-domain", "2",
         "--gsm8k-generate", "2", "--max-new-tokens", "8", "--steps", "2",
         "--adapter-dim", "8", "--lora-r", "4", "--base-model", str(tiny_model_dir))
    train = [json.loads(x) for x in (work / "data" / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(x) for x in (work / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 72 and len(heldout) == 9
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in heldout}
    assert (work / "clusters" / "metadata.json").is_file()

    # a seeded MoCE run with 3x the steps, scored at every checkpoint (MoCE checkpoints load
    # for inference), and a seeded LoRA run (through seeded_train.py); base: no training
    call("studies.moce_repro.run", "base", "moce_long@s1")
    call("studies.moce_repro.run", "lora_mlp", "--seed", "1")
    for name in ("base", "moce_long@s1", "lora_mlp@s1"):
        m = json.loads((work / "runs" / name / "metrics.json").read_text())
        assert set(m["loss"]) == set(common.DOMAINS)
        assert m["gsm8k"]["n"] == 2 and len(m["gsm8k"]["hits"]) == 2
        # every scored row, with its loss and tokens, for the paired statistics
        assert len(m["rows"]["id"]) == len(m["rows"]["nll"]) == 6 and min(m["rows"]["tokens"]) > 0
        assert m["wall_seconds"] > m["eval_seconds"] > 0 and m["machine"] and m["torch_threads"]
    moce = json.loads((work / "runs" / "moce_long@s1" / "metrics.json").read_text())
    assert moce["trainable_params"] > 0 and moce["seed"] == 1 and moce["config"] == "moce_long"
    assert yaml_of(work / "runs" / "moce_long@s1")["moce"]["init_seed"] == 1
    for u in moce["usage"]["per_domain"].values():
        assert sum(u["rows_per_group"]) == 2
        # routing slots only in the groups this domain's rows were sent to
        for load in u["expert_load_by_layer"].values():
            used = [g for g, row in enumerate(load) if sum(row) > 0]
            assert set(used) <= {g for g, n in enumerate(u["rows_per_group"]) if n}
    lora = json.loads((work / "runs" / "lora_mlp@s1" / "metrics.json").read_text())
    assert lora["rows"]["id"] == moce["rows"]["id"] and lora["seed"] == 1
    assert [p["step"] for p in moce["curve"]] == [1, 2, 3, 4, 5, 6] and len(moce["history"]) == 6
    assert moce["curve"][-1]["rows"]["nll"] == pytest.approx(moce["rows"]["nll"], rel=1e-4)
    assert not list((work / "runs" / "moce_long@s1" / "model").glob("checkpoint-*"))
    # the finished run is skipped, not retrained
    assert "done already" in call("studies.moce_repro.run", "lora_mlp@s1")

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nreading\n\n<!-- study:start -->\n<!-- study:end -->\n\n"
                   "<!-- generated:start -->\n<!-- generated:end -->\n")
    call("studies.moce_repro.report", "--doc", str(doc))
    text = doc.read_text()
    assert "reading" in text and "Main comparison" in text and "not run" in text
    assert "## Verdict (seeded study)" in text and "Still to run (25;" in text
    assert "| moce - pesc |" in text and "pending" in text  # pesc@sN etc. not run
    assert "| 6 | - | - | " in text  # moce_long's last checkpoint in the curve table
    assert (tmp_path / "img" / "reproduce" / "train_loss.png").is_file()
    assert (tmp_path / "img" / "reproduce" / "loss_vs_steps.png").is_file()
    assert (tmp_path / "results" / "metrics.json").is_file()


def yaml_of(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yml").read_text())


def test_recorded_seeded_runs_count_as_done_and_stay_in_the_report(tmp_path):
    """outputs/ is not in git: a fresh checkout must neither redo the seeded runs recorded in
    docs/results/metrics.json nor drop them from the report, unless the settings changed."""
    from studies.moce_repro import report
    from studies.moce_repro import run as runner

    s = common.Settings(base_model="/here/model", data_dir="/here/data")
    settings = {**s.__dict__, "base_model": "/elsewhere/model", "data_dir": "/elsewhere/data"}
    raw = tmp_path / "metrics.json"
    raw.write_text(json.dumps({"moce@s1": {"settings": settings, "loss": {}},
                               "pesc@s1": {"settings": {**settings, "steps": 7}},
                               "moce": {"settings": settings}}))
    assert runner.recorded_run("moce@s1", s, raw)  # paths of another checkout do not matter
    assert runner.recorded_run("pesc@s1", s, raw) is None  # other steps: not the same run
    assert runner.recorded_run("lora_mlp@s1", s, raw) is None
    assert "done" in runner.plan([common.get_run("moce@s1")], s, raw)
    assert set(report.recorded_seeded_runs(raw)) == {"moce@s1", "pesc@s1"}
