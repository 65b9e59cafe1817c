"""End to end: the real `axolotl train` CLI on a tiny llama built in the test (CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from axolotl_helpers import (
    base_config,
    env,
    run_train,
    train_losses,
    write_cluster_jsonl,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cluster_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", limit=240)


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_train_loss_goes_down_and_checkpoints_hold_moce(tmp_path, model_dir, data, packing):
    cfg = base_config(model_dir, data, tmp_path, sample_packing=packing, max_steps=12,
                      save_steps=6, sequence_len=512, learning_rate=0.1)
    proc = run_train(cfg, tmp_path)
    out = tmp_path / "model"
    losses = train_losses(out / "checkpoint-12")
    steps = sorted(losses)
    first, last = _mean([losses[s] for s in steps[:3]]), _mean([losses[s] for s in steps[-3:]])
    print(f"packing={packing}: loss first3={first:.4f} last3={last:.4f}")
    assert last < first - 0.05
    for ckpt in ("checkpoint-6", "checkpoint-12", "."):
        d = out / ckpt
        assert (d / "moce_config.json").is_file()
        weights = load_file(str(d / "moce_weights.safetensors"))
        assert {k.split(".")[1] for k in weights} == {"0", "1"}
    full = load_file(str(out / "model.safetensors"))
    assert any(".moce_experts.up" in k for k in full)
    assert (out / "moce_routing.jsonl").is_file() and (out / "moce_expert_usage.png").is_file()
    logged = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    assert any("moce/aux_loss" in h for h in logged)
    # Per-layer metrics reach the trackers' log (trainer_state) but not the console, which
    # shows loss, learning rate and the aggregate routing summary each step.
    assert any("moce/layer_0/load_imbalance" in h for h in logged)
    console = proc.stdout + proc.stderr
    step_lines = [ln for ln in console.splitlines() if "'loss'" in ln]
    assert len(step_lines) >= 12, console[-3000:]
    for line in step_lines:
        for key in ("learning_rate", "moce/aux_loss", "moce/load_imbalance",
                    "moce/router_entropy"):
            assert key in line, line
        assert "moce/layer_" not in line, line
    # The base stayed frozen: only MoCE moved.
    base = load_file(str(model_dir / "model.safetensors"))
    for k, v in base.items():
        key = k.replace("mlp.", "mlp.base_mlp.") if ".mlp." in k else k
        assert torch.equal(full[key], v), k
    assert weights["layers.0.up"].abs().sum() > 0


def test_lora_trains_and_saves_moce_with_adapter(tmp_path, model_dir, data):
    cfg = base_config(model_dir, data, tmp_path, adapter="lora", lora_r=4, lora_alpha=8,
                      lora_dropout=0.0, lora_target_linear=True, max_steps=4, save_steps=4,
                      plugins=["moce_plugin.MoCEPlugin", "rank_dump_plugin.RankDumpPlugin"])
    proc = run_train(cfg, tmp_path)
    out = tmp_path / "model"
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("moce_experts" in k for k in adapter), sorted(adapter)[:10]
    assert any("lora_A" in k for k in adapter)
    assert "MoCE parameters:" in proc.stdout + proc.stderr
    moce = load_file(str(out / "checkpoint-4" / "moce_weights.safetensors"))
    assert moce["layers.1.up"].abs().sum() > 0

    # Inference: the reloaded output reproduces the in-training model's logits exactly, and
    # axolotl's own merge-lora (routed to moce_plugin.export) gives the same within fp error.
    from rank_dump_plugin import PROBE_CLUSTERS, PROBE_IDS

    from moce_plugin.inference import load_moce_model

    in_training = torch.load(out / "rank0_logits.pt")
    reloaded = load_moce_model(out)
    with torch.no_grad():
        logits = reloaded.model(input_ids=PROBE_IDS, moce_cluster_ids=PROBE_CLUSTERS).logits
    assert torch.equal(logits, in_training)
    cfg_path = tmp_path / "config.yml"
    merge = subprocess.run([sys.executable, "-m", "axolotl.cli.main", "merge-lora", str(cfg_path)],
                           cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert merge.returncode == 0, merge.stderr[-4000:]
    merged = load_moce_model(out / "merged")
    with torch.no_grad():
        merged_logits = merged.model(input_ids=PROBE_IDS, moce_cluster_ids=PROBE_CLUSTERS).logits
    torch.testing.assert_close(merged_logits, in_training, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("patterns,moce_trains", [
    (["model.layers.[0-9]+.self_attn"], "all"),  # written for the base: MoCE trains too
    (["model.layers.[0-9]+.mlp.moce_experts.router"], "router"),  # the user's MoCE choice
], ids=["base-patterns", "router-only"])
def test_unfrozen_parameters_keep_moce_trained(tmp_path, model_dir, data, patterns, moce_trains):
    """axolotl freezes everything unfrozen_parameters does not match after the plugin made
    MoCE trainable; patterns that name no MoCE tensor must not leave MoCE untrained."""
    cfg = base_config(model_dir, data, tmp_path, max_steps=2, save_steps=2,
                      unfrozen_parameters=patterns)
    run_train(cfg, tmp_path)
    out = tmp_path / "model"
    moce = load_file(str(out / "moce_weights.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    base = load_file(str(model_dir / "model.safetensors"))
    attention_trained = not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"],
                                        base["model.layers.0.self_attn.q_proj.weight"])
    assert attention_trained == (moce_trains == "all")
    # `up` starts at zero: trained exactly when the experts are
    assert bool(moce["layers.0.up"].abs().sum() > 0) == (moce_trains == "all")
    for key in ("model.layers.0.mlp.base_mlp.up_proj.weight", "model.embed_tokens.weight"):
        assert torch.equal(trained[key], base[key.replace("base_mlp.", "")]), key  # frozen


def test_resume_continues_exactly(tmp_path, model_dir, data):
    cfg = base_config(model_dir, data, tmp_path, max_steps=8, save_steps=4)
    run_train(cfg, tmp_path)
    out = tmp_path / "model"
    straight = train_losses(out / "checkpoint-8")
    # Interrupt after step 4: drop everything later, then resume from checkpoint-4.
    shutil.rmtree(out / "checkpoint-8")
    run_train({**cfg, "resume_from_checkpoint": str(out / "checkpoint-4")}, tmp_path)
    resumed = train_losses(out / "checkpoint-8")
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4, abs=1e-4), step


def test_ddp_two_processes_gloo(tmp_path, model_dir, data):
    cfg = base_config(model_dir, data, tmp_path, max_steps=4, save_steps=4,
                      gradient_checkpointing=True,
                      plugins=["moce_plugin.MoCEPlugin", "rank_dump_plugin.RankDumpPlugin"],
                      ddp_backend="gloo")
    run_train(cfg, tmp_path, nproc=2)
    out = tmp_path / "model"
    r0 = load_file(str(out / "rank0_moce.safetensors"))
    r1 = load_file(str(out / "rank1_moce.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert r0["layers.0.up"].abs().sum() > 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
