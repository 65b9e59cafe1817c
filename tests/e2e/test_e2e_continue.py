"""Training on from a MoCE model through the real `axolotl train`: `base_model:` names a MoCE
SFT output (then its `moce-export`), the new run loads the FFN, experts and routers instead of
upcycling afresh (its logits before the first step equal the loaded model's), trains on new
data and saves a loadable output; a `moce:` block that contradicts the loaded model is
refused before any loading."""

from __future__ import annotations

import json

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


def test_contradicting_moce_block_is_refused_before_loading(tmp_path, first_run):
    cfg = _continue(tmp_path, first_run, top_k=2, adapter_dim=16)
    with pytest.raises(AssertionError) as err:
        run_train(cfg, tmp_path, timeout=600)
    message = str(err.value)
    assert "moce.top_k: 2 here, 1 in the loaded model" in message
    assert "moce.adapter_dim: 16 here, 8 in the loaded model" in message
