"""The user's pipeline on a tiny model: `python preprocess/cluster.py cfg.yml`, then
`axolotl train cfg.yml` on the unchanged YAML, then generation with automatic cluster
assignment; and the clear failure when the data changed after clustering."""

from __future__ import annotations

import ast
import json
import re
import stat
import subprocess
import sys

import pytest
import torch
import yaml
from axolotl_helpers import ROOT, base_config, env, run_train, sample_rows

from moce_plugin.utils import new_file_mode

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
    # axolotl's generation metrics (eval at the last step) decode each eval row's prompt and
    # call generate with token ids only: each gets its training row's cluster
    cfg.update(do_causal_lm_eval=True, eval_causal_lm_metrics=["sacrebleu"], eval_steps=4,
               eval_max_new_tokens=2)
    proc = run_train(cfg, tmp_path)  # the same YAML, unedited
    out = tmp_path / "model"
    from moce_plugin.clustering import ClusterModel
    from moce_plugin.clustering.text import request_text

    training_ids = ClusterModel.load(tmp_path / "clusters").lookup(rows, str(data))
    by_text = {request_text(r)[:80]: c for r, c in zip(rows, training_ids)}
    logged = re.findall(r"moce cluster (\d+) <- (.+)$", proc.stdout + proc.stderr, re.M)
    assert len(logged) >= 3, (proc.stdout + proc.stderr)[-3000:]
    for cluster, text in logged:
        assert by_text[ast.literal_eval(text)] == int(cluster), text  # the repr, 80 chars
    assert (out / "cluster_artifact" / "centroids.npy").is_file()
    # every weight file of the run readable like its other files (safetensors >= 0.8: 0600)
    weights = sorted(out.rglob("*.safetensors"))
    assert {p.relative_to(out).as_posix() for p in weights} >= {
        "model.safetensors", "moce_weights.safetensors", "checkpoint-4/model.safetensors"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in weights} == {new_file_mode()}

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


def _axolotl(tmp_path, cfg, command, *args, stdin=None) -> subprocess.CompletedProcess:
    """`axolotl <command>` on ``cfg`` as its CLI runs it (`python -m axolotl.cli.<command>`);
    command "probe" runs tests/axolotl_inference_probe.py, which loads the model the same way
    as `axolotl inference` and decodes the prompts in prompts.json greedily."""
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = ([sys.executable, str(ROOT / "tests" / "axolotl_inference_probe.py"), str(path),
            str(tmp_path / "probe.json"), str(tmp_path / "prompts.json")]
           if command == "probe" else [sys.executable, "-m", f"axolotl.cli.{command}", str(path)])
    return subprocess.run([*cmd, *args], cwd=tmp_path, env=env(), input=stdin,
                          capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_axolotl_inference_and_evaluate_on_a_moce_output(tmp_path, model_dir, adapter):
    """`axolotl evaluate` gives the eval loss training logged. `axolotl inference CFG
    --base-model OUTPUT` (full) or `--lora-model-dir OUTPUT` calls generate with token ids
    only: each prompt gets the cluster and the greedy text moce-generate gives it; the CLI
    runs and names the cluster; a moce: block that contradicts the LoRA output is refused
    before loading."""
    data = tmp_path / "train.jsonl"
    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in sample_rows(150)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _pipeline_config(tmp_path, model_dir, data)
    cfg.update(eval_steps=4, sample_packing=True, pad_to_sequence_len=True)
    if adapter:
        cfg.update(adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True)
    assert _cluster(tmp_path, cfg).returncode == 0
    run_train(cfg, tmp_path)
    out = tmp_path / "model"
    flag = ["--lora-model-dir", str(out)] if adapter else ["--base-model", str(out)]
    # `axolotl evaluate` on the trained model gives the eval loss training logged at its
    # last step (same split, same weights; packed rows padded to sequence_len).
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h][-1]
    proc = _ok(_axolotl(tmp_path, cfg, "evaluate", *flag))
    evaluated = re.search(r"eval_loss: ([0-9.]+)", proc.stdout + proc.stderr)
    assert evaluated and float(evaluated.group(1)) == pytest.approx(logged, abs=1e-4)

    from moce_plugin.inference import load_moce_model

    moce = load_moce_model(out)
    prompts = [r["instruction"] for r in rows[:40]]
    clusters = moce.assign_clusters(prompts)
    picked = [prompts[clusters.index(c)] for c in sorted(set(clusters))]
    assert len(picked) == 3, "prompts of one cluster would prove nothing"
    (tmp_path / "prompts.json").write_text(json.dumps([moce.format_prompt(p) for p in picked]))
    _ok(_axolotl(tmp_path, cfg, "probe", *flag))
    got = json.loads((tmp_path / "probe.json").read_text())
    assert [g["cluster"] for g in got] == moce.assign_clusters(picked) == [0, 1, 2]
    assert [g["text"] for g in got] == [moce.generate([p], max_new_tokens=5)[0] for p in picked]
    proc = _ok(_axolotl(tmp_path, cfg, "inference", *flag, "--prompter", "AlpacaPrompter",
                        stdin=picked[2]))
    assert f"moce cluster 2 <- {picked[2][:80]!r}" in proc.stdout + proc.stderr
    if adapter:
        cfg["moce"]["top_k"] = 1
        bad = _axolotl(tmp_path, cfg, "inference", *flag, stdin="hi")
        assert bad.returncode != 0
        assert "top_k: output 2, YAML 1" in bad.stderr and "loading model" not in bad.stderr


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
