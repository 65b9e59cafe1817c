"""Training on from a MoCE model through the real `axolotl train`: `base_model:` names a MoCE
SFT output (then its `moce-export`), the new run loads the FFN, experts and routers instead of
upcycling afresh (its logits before the first step equal the loaded model's), trains on new
data and saves a loadable output; a `moce:` block that contradicts the loaded model is
refused before any loading."""

from __future__ import annotations

import json
import re

import pytest
import torch
from axolotl_helpers import base_config, run_train, sample_rows, train_losses
from start_logits_plugin import PROBE_CLUSTERS, PROBE_IDS

pytestmark = pytest.mark.slow

PLUGINS = ["moce_plugin.MoCEPlugin", "start_logits_plugin.StartLogitsPlugin"]


def _data(path, rows):
    clusters = {"alpaca": 0, "code_alpaca": 1, "gsm8k": 2}
    path.write_text("\n".join(json.dumps({**r, "cluster_id": clusters[r["source"]]})
                              for r in rows))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir):
    """A MoCE SFT run on the first 120 sample rows (cluster_id column)."""
    tmp = tmp_path_factory.mktemp("first")
    data = _data(tmp / "train.jsonl", sample_rows(120))
    cfg = base_config(tiny_model_dir, data, tmp, max_steps=4, save_steps=4, learning_rate=0.1)
    run_train(cfg, tmp)
    return tmp / "model"


def _continue(tmp_path, source, **moce):
    data = _data(tmp_path / "new.jsonl", sample_rows()[120:240])  # rows the first run never saw
    cfg = base_config(source, data, tmp_path, max_steps=2, save_steps=2, plugins=PLUGINS,
                      moce=dict(router_aux_loss_coef=0.02, **moce))
    return cfg


def _loaded_logits(folder):
    from moce_plugin.inference import load_moce_model

    return load_moce_model(folder).logits(PROBE_IDS, PROBE_CLUSTERS)


@pytest.mark.parametrize("start", ["output", "export"])
def test_sft_continues_from_a_moce_output_or_export(tmp_path, first_run, start):
    source = first_run
    if start == "export":
        from moce_plugin.export import export_model

        source = export_model(first_run, tmp_path / "exported")
    cfg = _continue(tmp_path, source)
    proc = run_train(cfg, tmp_path)
    out = tmp_path / "model"
    # Step 0 of the new run is the loaded model, not a fresh upcycle of a random-MLP base.
    start_logits = torch.load(out / "start_logits.pt")
    torch.testing.assert_close(start_logits, _loaded_logits(first_run), rtol=0, atol=1e-5)
    console = proc.stdout + proc.stderr
    assert f"MoCE: continuing from {source}" in console
    assert train_losses(out / "checkpoint-2")
    # The new output is a MoCE model of the same shape, loadable and trained on.
    saved = json.loads((out / "moce_config.json").read_text())
    first = json.loads((first_run / "moce_config.json").read_text())
    for key in ("num_clusters", "experts_per_group", "top_k", "adapter_dim"):
        assert saved[key] == first[key], key
    assert saved["router_aux_loss_coef"] == 0.02
    after = _loaded_logits(out)
    assert not torch.allclose(after, start_logits)


def test_continuation_under_deepspeed_zero3_on_two_processes(tmp_path, first_run):
    """`base_model:` a MoCE output, trained on under ZeRO-3 (examples' zero3 config, 2 gloo
    ranks): the FFN (through the base_mlp key mapping, inside zero.Init) and the experts are
    the loaded model's at step 0, and the output is a MoCE model trained on."""
    from test_sharded_train import launch, sharding_settings

    cfg = {**_continue(tmp_path, first_run), **sharding_settings("zero3")}
    log = launch(cfg, tmp_path)
    assert f"MoCE: continuing from {first_run}" in log
    out = tmp_path / "model"
    start_logits = torch.load(out / "start_logits.pt")
    torch.testing.assert_close(start_logits, _loaded_logits(first_run), rtol=0, atol=1e-5)
    assert train_losses(out / "checkpoint-2")
    saved = json.loads((out / "moce_config.json").read_text())
    assert saved["router_aux_loss_coef"] == 0.02 and saved["adapter_dim"] == 8
    assert not torch.allclose(_loaded_logits(out), start_logits)


def test_contradicting_moce_block_is_refused_before_loading(tmp_path, first_run):
    cfg = _continue(tmp_path, first_run, top_k=2, adapter_dim=16)
    with pytest.raises(AssertionError) as err:
        run_train(cfg, tmp_path, timeout=600)
    message = str(err.value)
    assert "moce.top_k: 2 here, 1 in the loaded model" in message
    assert "moce.adapter_dim: 16 here, 8 in the loaded model" in message


def test_continued_run_assigns_new_data_with_the_loaded_artifact(tmp_path, tiny_model_dir):
    """Stage 1 + SFT, then SFT on new rows from that output: the new rows are assigned by the
    output's own cluster artifact (kept in the new output); data its text template cannot
    read is refused."""
    import subprocess
    import sys

    import yaml
    from axolotl_helpers import ROOT, env

    def rows(part):
        return [{k: r[k] for k in ("instruction", "input", "output")} for r in part]

    first = tmp_path / "first"
    first.mkdir()
    data = first / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows(sample_rows(150))))
    cfg = base_config(tiny_model_dir, data, first, max_steps=2, save_steps=2)
    cfg["moce"] = dict(num_clusters=3, experts_per_group=2, top_k=1, adapter_dim=8,
                       cluster_artifact=str(first / "clusters"),
                       clustering=dict(seed=0, cache_dir=str(first / "cache"),
                                       text_template="{instruction}"))
    (first / "config.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(ROOT / "preprocess" / "cluster.py"),
                           str(first / "config.yml")], cwd=first, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_train(cfg, first)
    source = first / "model"

    new = tmp_path / "new.jsonl"
    new.write_text("\n".join(json.dumps(r) for r in rows(sample_rows()[150:240])))
    cfg = base_config(source, new, tmp_path, max_steps=2, save_steps=2, plugins=PLUGINS,
                      moce=dict(router_aux_loss_coef=0.02))
    proc = run_train(cfg, tmp_path)
    console = proc.stdout + proc.stderr
    assigned = re.search(r"(\d+) rows kept their cluster, (\d+) new rows assigned by the "
                         r"loaded model's artifact", console)
    assert assigned and int(assigned.group(2)) > 0, console[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "model" / "start_logits.pt"),
                               _loaded_logits(source), rtol=0, atol=1e-5)
    kept = json.loads((tmp_path / "model" / "cluster_artifact" / "metadata.json").read_text())
    made = json.loads((first / "clusters" / "metadata.json").read_text())
    assert kept["fingerprint"] == made["fingerprint"]

    other = tmp_path / "other"
    other.mkdir()
    text = other / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": r["instruction"] + "\n" + r["output"]})
                              for r in sample_rows(40)))
    cfg = base_config(source, text, other, max_steps=2, plugins=PLUGINS,
                      moce=dict(router_aux_loss_coef=0.02),
                      datasets=[dict(path=str(text), type="completion", ds_type="json")])
    with pytest.raises(AssertionError) as err:
        run_train(cfg, other, timeout=600)
    assert "text template '{instruction}' reads ['instruction']" in str(err.value)
