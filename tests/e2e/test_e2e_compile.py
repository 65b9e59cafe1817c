"""``torch_compile: true`` with MoCE through the real `axolotl train` (CPU, tiny llama)."""

from __future__ import annotations

import json

import pytest
from axolotl_helpers import base_config, run_train, train_losses, write_cluster_jsonl

pytestmark = pytest.mark.slow


def test_torch_compile_has_no_graph_break_or_late_recompile_and_eager_losses(
        tmp_path, model_dir, monkeypatch):
    """Whole-model compile as axolotl does it (padded batches of changing length, every
    cluster mix): no graph break at all (the model without MoCE has none either), no frame
    that failed to compile (axolotl suppresses those errors), no graph compiled after the
    warm-up steps, and the losses of the eager run."""
    data = write_cluster_jsonl(tmp_path / "train.jsonl", limit=120)
    monkeypatch.setenv("TORCH_LOGS", "graph_breaks")
    settings = dict(max_steps=6, save_steps=6, val_set_size=0, gradient_accumulation_steps=1,
                    plugins=["moce_plugin.MoCEPlugin",
                             "dynamo_counters_plugin.DynamoCountersPlugin"])
    compiled_dir, eager_dir = tmp_path / "compiled", tmp_path / "eager"
    compiled_dir.mkdir()
    eager_dir.mkdir()
    proc = run_train(base_config(model_dir, data, compiled_dir, torch_compile=True,
                                 torch_compile_backend="aot_eager", **settings), compiled_dir)
    console = proc.stdout + proc.stderr
    assert "moce_plugin/" not in "\n".join(
        ln for ln in console.splitlines() if "graph_break" in ln), console[-6000:]
    rows = [json.loads(line) for line in
            (compiled_dir / "model" / "dynamo_counters.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    last = rows[-1]
    assert last["graphs"] > 0, "nothing was compiled"
    assert last["graph_breaks"] == {}, last["graph_breaks"]
    assert last["frames"].get("total") == last["frames"].get("ok"), last["frames"]
    assert rows[2]["graphs"] == last["graphs"], [r["graphs"] for r in rows]

    run_train(base_config(model_dir, data, eager_dir, **settings), eager_dir)
    compiled_losses = train_losses_of(compiled_dir)
    eager_losses = train_losses_of(eager_dir)
    assert compiled_losses.keys() == eager_losses.keys()
    for step, loss in eager_losses.items():
        assert compiled_losses[step] == pytest.approx(loss, abs=1e-4), step


def train_losses_of(run_dir):
    return train_losses(run_dir / "model" / "checkpoint-6")
