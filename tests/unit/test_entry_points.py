"""Entry points: the console scripts of pyproject.toml, `moce-cluster` (= preprocess/cluster.py)
and `axolotl preprocess CFG` running stage 1 when the cluster artifact is missing."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from axolotl_helpers import ROOT, base_config, env, sample_rows, write_cluster_jsonl
from fake_encoder import BagEncoder

from moce_plugin.clustering import ClusterModel
from moce_plugin.clustering.cli import main as cluster_main

SCRIPTS = {"moce-cluster", "moce-generate", "moce-export", "moce-usage"}


def test_console_scripts_resolve_to_main_functions():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == SCRIPTS
    for name, target in scripts.items():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        with pytest.raises(SystemExit) as exit_info:  # --help parses and exits 0
            main(["--help"])
        assert exit_info.value.code == 0, name


def test_python_m_moce_plugin_dispatches_every_command(capsys):
    from moce_plugin.__main__ import COMMANDS
    from moce_plugin.__main__ import main as moce_main

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    # Every console script is one `python -m moce_plugin <command>`, running the same main.
    assert {c.script: f"{c.module}:main" for c in COMMANDS.values() if c.script} == scripts
    assert moce_main(["--help"]) == 0
    listing = capsys.readouterr().out
    for name in COMMANDS:
        assert f"\n  {name} " in listing, name
    for name in ("cluster", "generate", "export", "usage"):
        with pytest.raises(SystemExit) as exit_info:
            moce_main([name, "--help"])
        assert exit_info.value.code == 0, name
        assert f"usage: python -m moce_plugin {name} " in capsys.readouterr().out, name
    assert moce_main(["expot", "a", "b"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'expot'" in err and err.count("\n") == 1


def test_python_m_moce_plugin_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "moce_plugin", "--help"], capture_output=True,
                          text=True, env=env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "commands:" in proc.stdout and "generate" in proc.stdout


@pytest.fixture
def bag_encoder(monkeypatch):
    """Stage 1 without loading a sentence encoder (the CLI builds it from the options)."""
    monkeypatch.setattr("moce_plugin.clustering.encode.SentenceTransformerEncoder",
                        lambda *a, **k: BagEncoder())


def _yaml(tmp_path: Path, clustering: dict | None = None, limit: int = 60) -> Path:
    data = write_cluster_jsonl(tmp_path / "d.jsonl", limit=limit)
    cfg = {"datasets": [{"path": str(data), "type": "alpaca", "ds_type": "json"}],
           "moce": {"num_clusters": 3, "cluster_artifact": str(tmp_path / "art"),
                    "clustering": {"report": False, **(clustering or {})}}}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_moce_cluster_main_merges_yaml_and_flags(tmp_path, bag_encoder, capsys):
    path = _yaml(tmp_path, {"seed": 3})
    rc = cluster_main([str(path), "--text-template", "{instruction}", "--num-clusters", "2",
                       "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert rc == 0
    model = ClusterModel.load(tmp_path / "art")
    assert model.num_clusters == 2 and model.template == "{instruction}"  # flags win
    assert model.metadata["kmeans"]["seed"] == 3  # the YAML's value where no flag is given
    assert capsys.readouterr().out == ""


def test_moce_cluster_main_reports_bad_options_in_one_line(tmp_path, bag_encoder, capsys):
    rc = cluster_main([str(_yaml(tmp_path, {"kmax": 4}))])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "unknown moce.clustering option(s) ['kmax']" in err
    assert not (tmp_path / "art").exists()


def test_preprocess_wrapper_is_the_same_cli(monkeypatch, capsys):
    """python preprocess/cluster.py stays the documented wrapper (its subprocess runs are in
    test_clustering.py); here: it is the package's CLI under its own name."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["preprocess/cluster.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "preprocess" / "cluster.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("usage: preprocess/cluster.py")
    assert "--text-template" in out and "--k-max" in out


def test_register_runs_stage_1_only_for_preprocess(tmp_path, bag_encoder, monkeypatch):
    from axolotl.utils.dict import DictDefault

    from moce_plugin.integration.plugin import MoCEPlugin

    monkeypatch.delenv("AXOLOTL_IS_PREPROCESS", raising=False)
    cfg = yaml.safe_load(_yaml(tmp_path, {"cache_dir": str(tmp_path / "cache")}).read_text())
    MoCEPlugin().register(DictDefault(cfg))  # axolotl train: the validator reports it
    assert not (tmp_path / "art").exists()
    MoCEPlugin().register(DictDefault({**cfg, "is_preprocess": True}))
    assert ClusterModel.load(tmp_path / "art").num_clusters == 3
    stamp = (tmp_path / "art" / "metadata.json").stat().st_mtime_ns
    MoCEPlugin().register(DictDefault({**cfg, "is_preprocess": True}))  # present: kept
    assert (tmp_path / "art" / "metadata.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_axolotl_preprocess_clusters_then_prepares(tmp_path, model_dir):
    """`axolotl preprocess CFG` with a missing artifact: stage 1 (bundled MiniLM), then the
    prepared data set with the artifact's per-token cluster ids."""
    data = tmp_path / "train.jsonl"
    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in sample_rows(60)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = base_config(model_dir, data, tmp_path, val_set_size=0, sequence_len=2048)
    cfg["moce"] = dict(cluster_artifact="clusters", experts_per_group=2, top_k=1, adapter_dim=8,
                       num_clusters=3, clustering={"report": False})
    (tmp_path / "config.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "axolotl.cli.preprocess", "config.yml"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    model = ClusterModel.load(tmp_path / "clusters")
    from datasets import load_from_disk

    prepared = next(p for p in (tmp_path / "prepared").iterdir() if p.is_dir())
    ds = load_from_disk(str(prepared))
    per_row = [ids[0] for ids in ds["moce_cluster_ids"]]
    assert sorted(per_row) == sorted(model.lookup(rows, str(data)))


def test_generate_cli_reports_bad_inputs_in_one_line(tmp_path, capsys):
    from moce_plugin.outputs.generate import main as generate_main

    with pytest.raises(SystemExit) as exit_info:
        generate_main([str(tmp_path), "--prompt", "hi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("moce_plugin.generate: error: ") and err.count("\n") == 1
    assert "not the output of a MoCE training" in err
    with pytest.raises(SystemExit):
        generate_main([str(tmp_path), "--prompt", "hi", "--debug"])
    assert "Traceback" in capsys.readouterr().err
