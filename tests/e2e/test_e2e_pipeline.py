"""The user's pipeline on a tiny model: `python preprocess/cluster.py cfg.yml`, then
`axolotl train cfg.yml` on the unchanged YAML, then generation with automatic cluster
assignment; and the clear failure when the data changed after clustering."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from axolotl_helpers import ROOT, base_config, env, run_train, sample_rows

pytestmark = pytest.mark.slow


def _pipeline_config(tmp_path, model_dir, data):
    cfg = base_config(model_dir, data, tmp_path, max_steps=4, save_steps=4)
    cfg["moce"] = dict(num_clusters=3, experts_per_group=2, top_k=2, adapter_dim=8,
                       cluster_artifact=str(tmp_path / "clusters"),
                       clustering=dict(seed=0, cache_dir=str(tmp_path / "cache")))
    return cfg


def _cluster(tmp_path, cfg) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, str(ROOT / "preprocess" / "cluster.py"), str(path)],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)


def test_cluster_then_train_then_generate(tmp_path, model_dir):
    data = tmp_path / "train.jsonl"
    rows = [{k: r[k] for k in ("instruction", "input", "output", "source")}
            for r in sample_rows(150)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _pipeline_config(tmp_path, model_dir, data)
    proc = _cluster(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "clusters" / "metadata.json").is_file()
    run_train(cfg, tmp_path)  # the same YAML, unedited
    out = tmp_path / "model"
    assert (out / "cluster_artifact" / "centroids.npy").is_file()

    from moce_plugin.inference import load_moce_model

    moce = load_moce_model(out)
    # What the user types for each training row gets the row's training cluster (the id the
    # artifact recorded for it, which training attached).
    prompts = [(r["instruction"] + "\n" + r["input"]).strip() for r in rows]
    assert moce.assign_clusters(prompts) == moce.cluster_model.lookup(rows, str(data))
    prompts = prompts[:3]
    texts = moce.generate(prompts, max_new_tokens=4)
    assert len(texts) == 3
    # The routing the model saw in training matches the artifact: the plugin attached the
    # artifact's ids (checked through the prepared data set's per-token ids).
    from datasets import load_from_disk

    prepared = next(p for p in (tmp_path / "prepared").iterdir() if p.is_dir())
    ds = load_from_disk(str(prepared))
    assert set(x for row in ds["moce_cluster_ids"] for x in row) <= {0, 1, 2}
    with torch.no_grad():
        assert moce.model is not None


def test_changed_data_after_clustering_is_a_clear_error(tmp_path, model_dir):
    data = tmp_path / "train.jsonl"
    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in sample_rows(60)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _pipeline_config(tmp_path, model_dir, data)
    assert _cluster(tmp_path, cfg).returncode == 0
    rows.append({"instruction": "A row added after clustering", "input": "", "output": "x"})
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(AssertionError, match="changed since clustering.*preprocess/cluster.py"):
        run_train(cfg, tmp_path)
    cfg["moce"]["num_clusters"] = 4  # k that disagrees with the artifact
    with pytest.raises(AssertionError, match="k=3|k = 3|3 clusters"):
        run_train(cfg, tmp_path)
