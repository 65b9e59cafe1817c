"""Issue 25, unclear errors: each bad input gives one line naming the problem and the fix,
before heavy work (or the right result)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_inference import CFG, CLUSTERS, IDS, _full_output, _logits, base_dir
from test_output_safety import _lora_output, _one_error_line
from transformers import AutoModelForCausalLM

import moce_plugin.model.upcycle as upcycle_mod
from moce_plugin.clustering import cli as cluster_cli
from moce_plugin.clustering.errors import ClusteringError
from moce_plugin.model.size import MoCESizeError, moce_parameter_count
from moce_plugin.model.upcycle import moce_layers, upcycle_model
from moce_plugin.outputs.folder import MOCE_WEIGHTS_NAME
from moce_plugin.outputs.generate import main as generate_main
from moce_plugin.outputs.load import MoCELoadError, load_moce_model
from moce_plugin.utils import FileFormatError

__all__ = ["base_dir"]


# ---- 6: a truncated moce_weights.safetensors ---------------------------------------------------
def test_truncated_moce_weights_is_one_line_naming_the_file(tmp_path, base_dir, capsys):
    out = tmp_path / "out"
    _full_output(base_dir, out)
    weights = out / MOCE_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(FileFormatError, match=f"{weights} is damaged"):
        load_moce_model(out)
    with pytest.raises(SystemExit) as exit_info:
        generate_main([str(out), "--prompt", "hi", "--cluster", "0"])
    assert exit_info.value.code == 2
    assert str(weights) in _one_error_line(capsys)


def test_truncated_adapter_weights_without_moce_file_names_the_adapter(tmp_path, base_dir):
    out = tmp_path / "run"
    _lora_output(base_dir, out)
    (out / MOCE_WEIGHTS_NAME).unlink()  # the MoCE tensors are then read from the adapter
    adapter = out / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(FileFormatError, match=f"{adapter} is damaged"):
        load_moce_model(out)


# ---- 7: cluster_artifact whose parent is a file ------------------------------------------------
def test_artifact_under_a_file_is_refused_before_data_and_encoder(tmp_path, monkeypatch):
    (tmp_path / "data.jsonl").write_text('{"instruction": "x", "output": "y"}\n')

    def loaded(*args, **kwargs):
        raise AssertionError("the data was loaded before the artifact path was checked")

    monkeypatch.setattr(cluster_cli, "rows_from_yaml", loaded)
    cfg = {"datasets": [{"path": str(tmp_path / "data.jsonl"), "type": "alpaca"}],
           "moce": {"cluster_artifact": str(tmp_path / "data.jsonl" / "clusters")}}
    with pytest.raises(ClusteringError, match="data.jsonl is a file, not a folder"):
        cluster_cli.cluster_config(cfg)
    cfg["moce"] = {"cluster_artifact": str(tmp_path / "clusters"),
                   "clustering": {"cache_dir": str(tmp_path / "data.jsonl" / "cache")}}
    with pytest.raises(ClusteringError, match="cache_dir"):
        cluster_cli.cluster_config(cfg)


def test_artifact_under_a_file_is_one_cli_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    yml = tmp_path / "c.yml"
    yml.write_text(json.dumps({"datasets": [{"path": "missing.jsonl", "type": "alpaca"}],
                               "moce": {"cluster_artifact": str(tmp_path / "afile" / "c")}}))
    assert cluster_cli.main([str(yml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "afile is a file" in err and "Traceback" not in err


# ---- 9: the MoCE size is said, and absurd sizes refused -----------------------------------------
def test_moce_parameter_count_matches_the_built_modules(base_dir):
    for cfg in (CFG, CFG.model_copy(update={"router": "acmoe", "num_general_experts": 0})):
        model = upcycle_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
        built = sum(p.numel() for m in moce_layers(model) for p in m.moce_experts.parameters())
        built += sum(b.numel() for m in moce_layers(model) for b in m.moce_experts.buffers())
        assert moce_parameter_count(cfg, model.config.hidden_size,
                                    len(list(moce_layers(model)))) == built


def test_absurd_adapter_dim_is_refused_with_the_figure_before_allocating(base_dir, caplog,
                                                                         monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    huge = CFG.model_copy(update={"adapter_dim": 10**9})
    allocated = []  # the MoCE layers must not even be built
    monkeypatch.setattr(upcycle_mod, "MoCEMLP", lambda *a, **k: allocated.append(a))
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    params = moce_parameter_count(huge, hidden, layers)
    with pytest.raises(MoCESizeError, match=f"MoCE would add {params:,} parameters"):
        upcycle_model(model, huge)
    assert not allocated
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="moce_plugin.model.size"):
        upcycle_model(AutoModelForCausalLM.from_pretrained(base_dir), CFG)
    expected = moce_parameter_count(CFG, hidden, layers)
    assert f"MoCE adds {expected:,} parameters" in caplog.text


# ---- 10: a LoRA output with a relative base path, loaded from elsewhere ------------------------
def _relative_base_lora(tmp_path, base_dir) -> tuple[Path, torch.Tensor]:
    """A project folder with the base at ./base and a LoRA run at ./outputs/run whose
    adapter_config records the base as the relative path training was given."""
    project = tmp_path / "project"
    (project / "outputs").mkdir(parents=True)
    os.symlink(base_dir, project / "base")
    run = project / "outputs" / "run"
    trained = _lora_output(base_dir, run)
    expected = _logits(trained, IDS, CLUSTERS)
    adapter_cfg = run / "adapter_config.json"
    data = json.loads(adapter_cfg.read_text())
    data["base_model_name_or_path"] = "./base"
    adapter_cfg.write_text(json.dumps(data))
    return run, expected


def test_relative_base_of_a_lora_output_is_found_from_another_directory(tmp_path, base_dir,
                                                                        monkeypatch):
    run, expected = _relative_base_lora(tmp_path, base_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    moce = load_moce_model(run)
    assert torch.allclose(_logits(moce.model, IDS, CLUSTERS), expected, atol=1e-5)


def test_missing_base_of_a_lora_output_names_it_and_base_model_flag(tmp_path, base_dir,
                                                                    monkeypatch, capsys):
    run, _ = _relative_base_lora(tmp_path, base_dir)
    (tmp_path / "project" / "base").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoCELoadError, match=r"'\./base' \(recorded in .*adapter_config.json\)"
                       r".*--base-model"):
        load_moce_model(run)
    with pytest.raises(SystemExit):
        generate_main([str(run), "--prompt", "hi", "--cluster", "0"])
    line = _one_error_line(capsys)
    assert "./base" in line and "--base-model" in line
    assert generate_main([str(run), "--prompt", "hi", "--cluster", "0", "--max-new-tokens", "2",
                          "--no-stream", "--base-model", str(base_dir)]) == 0


# ---- axolotl evaluations that run the model on text without a known cluster ---------------
@pytest.mark.parametrize("settings,artifact,match", [
    ({"do_bench_eval": True}, "art", "do_bench_eval.*lm_eval --model moce"),
    ({"do_causal_lm_eval": True, "eval_causal_lm_metrics": ["sacrebleu", "perplexity"]}, "art",
     "perplexity scores the generated text alone"),
    ({"do_causal_lm_eval": True, "eval_causal_lm_metrics": ["sacrebleu"]}, None,
     "do_causal_lm_eval.*'cluster_id' column.*preprocess/cluster.py"),
], ids=["bench", "perplexity", "no-artifact"])
def test_evaluations_without_a_cluster_are_refused_before_training(settings, artifact, match):
    from axolotl.utils.dict import DictDefault

    from moce_plugin.errors import ConfigError
    from moce_plugin.integration.inference import check_eval_generation

    moce = CFG.model_copy(update={"cluster_artifact": artifact})
    with pytest.raises(ConfigError, match=match):
        check_eval_generation(DictDefault(settings), moce)
    check_eval_generation(DictDefault({"do_causal_lm_eval": True,
                                       "eval_causal_lm_metrics": ["sacrebleu"]}),
                          CFG.model_copy(update={"cluster_artifact": "art"}))  # fine
