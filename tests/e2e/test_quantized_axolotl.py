"""QLoRA (4-bit NF4) and 8-bit bases with MoCE through the real `axolotl train` CLI on CPU
(bitsandbytes' CPU backend), with the tiny model; the LoRA settings are those of
examples/llama2-moce-qlora.yml (adapter, load_in_4bit, lora_target_linear), scaled down.

Checked: the frozen FFN stays a bitsandbytes Linear4bit / Linear8bitLt and runs once per
forward, MoCE stays in the training dtype (float32) and trainable, the loss falls, the
adapter holds full MoCE tensors, the output reloads (load_moce_model) and exports, and
(QLoRA) resuming from a checkpoint reproduces the uninterrupted run's losses."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from axolotl_helpers import (
    base_config,
    env,
    qlora_example_settings,
    run_train,
    train_losses,
    write_cluster_jsonl,
)
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                       reason="needs bitsandbytes"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cluster_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", limit=240)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_trains_with_moce_through_axolotl(tmp_path, tiny_model_dir, data, bits):
    if bits == 4:
        quant = qlora_example_settings()
    else:
        quant = {"adapter": "lora", "load_in_8bit": True, "lora_target_linear": True}
    cfg = base_config(tiny_model_dir, data, tmp_path, max_steps=8, save_steps=4,
                      learning_rate=0.05, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      plugins=["moce_plugin.MoCEPlugin", "quant_check_plugin.QuantCheckPlugin"],
                      **quant)
    run_train(cfg, tmp_path)
    out = tmp_path / "model"
    info = json.loads((out / "quant_check.json").read_text())
    expected = "Linear4bit" if bits == 4 else "Linear8bitLt"
    assert info["ffn_classes"] == [expected], info
    assert info["ffn_bytes_per_weight"] == [bits / 8], info
    # MoCE in the training dtype: float32 (an fp32 config). With load_in_8bit axolotl loads
    # the base in float16; the plugin keeps MoCE in float32 (pure fp16 MoCE turned NaN).
    moce_dtype = torch.float32
    assert info["moce_dtypes"] == [str(moce_dtype)] and info["moce_trainable"], info
    assert info["ffn_calls_per_forward"] == 1, info
    losses = train_losses(out / "checkpoint-8")
    first = sum(losses[s] for s in (1, 2)) / 2
    last = sum(losses[s] for s in (7, 8)) / 2
    print(f"{bits}-bit: loss {first:.4f} -> {last:.4f}")
    assert last < first - 0.05, losses
    adapter = load_file(str(out / "adapter_model.safetensors"))
    moce = {k: v for k, v in adapter.items() if "moce_experts" in k}
    assert len(moce) == 6 and all(v.dtype == moce_dtype for v in moce.values())
    assert max(float(v.abs().sum()) for k, v in moce.items() if k.endswith(".up")) > 0

    from moce_plugin.inference import load_moce_model

    reloaded = load_moce_model(out)  # float32 base + adapter + MoCE
    with torch.no_grad():
        logits = reloaded.model(input_ids=torch.arange(4, 28).view(2, 12),
                                moce_cluster_ids=torch.tensor([0, 2])).logits
    assert torch.isfinite(logits).all()
    proc = subprocess.run([sys.executable, "-m", "moce_plugin.export", str(out),
                           str(tmp_path / "exported")], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "exported" / "moce_weights.safetensors").is_file()

    if bits == 4:  # QLoRA: interrupt after step 4, resume from its checkpoint
        import shutil

        shutil.rmtree(out / "checkpoint-8")
        run_train({**cfg, "resume_from_checkpoint": str(out / "checkpoint-4")}, tmp_path)
        resumed = train_losses(out / "checkpoint-8")
        for step in (5, 6, 7, 8):
            assert resumed[step] == pytest.approx(losses[step], rel=1e-4, abs=1e-4), step
