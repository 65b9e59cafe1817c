"""The reproduction commands (bench/reproduce): metric helpers, the run configs, and one
tiny end-to-end pass of prepare -> run -> report on the bundled sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPRO = ROOT / "bench" / "reproduce"
sys.path.insert(0, str(REPRO))

import repro_config as common  # noqa: E402
from heldout_metrics import final_number, js_divergence  # noqa: E402


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
        assert cfg["max_steps"] == s.steps and cfg["datasets"][0]["path"].endswith("train.jsonl")
        if run.kind == "moce":
            moce = MoCEConfig(**cfg["moce"])
            if run.clustered:
                assert moce.num_clusters == 3 and moce.cluster_artifact
            else:  # PESC: one group with as many experts as MoCE has in all
                assert moce.num_clusters == 1 and moce.experts_per_group == 3 * 4
        else:
            assert cfg["adapter"] == "lora" and "moce" not in cfg


@pytest.mark.slow
def test_prepare_run_report_end_to_end(tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    env = {**os.environ, "MOCE_REPRODUCE_DIR": str(work), "OMP_NUM_THREADS": "2"}

    def call(*args: str) -> str:
        proc = subprocess.run([sys.executable, *args], cwd=REPRO, env=env, text=True,
                              capture_output=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    call("prepare.py", "--data-dir", str(ROOT / "examples" / "data" / "moce_sample.jsonl"),
         "--train-per-domain", "24", "--heldout-per-domain", "3", "--eval-per-domain", "2",
         "--gsm8k-generate", "2", "--max-new-tokens", "8", "--steps", "2",
         "--adapter-dim", "8", "--lora-r", "4", "--base-model", str(tiny_model_dir))
    train = [json.loads(x) for x in (work / "data" / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(x) for x in (work / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 72 and len(heldout) == 9
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in heldout}
    assert (work / "clusters" / "metadata.json").is_file()

    call("run.py", "base", "pesc", "moce")
    for name in ("base", "pesc", "moce"):
        m = json.loads((work / "runs" / name / "metrics.json").read_text())
        assert set(m["loss"]) == set(common.DOMAINS)
        assert m["gsm8k"]["n"] == 2
    moce = json.loads((work / "runs" / "moce" / "metrics.json").read_text())
    assert moce["trainable_params"] > 0 and len(moce["history"]) == 2
    for u in moce["usage"]["per_domain"].values():
        assert sum(u["rows_per_group"]) == 2
        # routing slots only in the groups this domain's rows were sent to
        for load in u["expert_load_by_layer"].values():
            used = [g for g, row in enumerate(load) if sum(row) > 0]
            assert set(used) <= {g for g, n in enumerate(u["rows_per_group"]) if n}
    pesc = json.loads((work / "runs" / "pesc" / "metrics.json").read_text())
    assert pesc["groups"] == 1
    # the finished run is skipped, not retrained
    assert "done already" in call("run.py", "moce")

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nreading\n\n<!-- generated:start -->\n<!-- generated:end -->\n")
    call("report.py", "--doc", str(doc))
    text = doc.read_text()
    assert "reading" in text and "Main comparison" in text and "not run" in text
    assert (tmp_path / "img" / "reproduce" / "train_loss.png").is_file()
    assert (tmp_path / "results" / "metrics.json").is_file()
