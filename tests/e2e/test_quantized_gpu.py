"""QLoRA (4-bit NF4) and 8-bit bases with MoCE: needs a CUDA GPU and bitsandbytes.

Checks what the plugin relies on: the frozen FFN stays quantized and runs once per token,
MoCE adapters/routers stay in the training dtype, LoRA + MoCE train (loss falls) and the
MoCE weights are saved with the adapter.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs a CUDA GPU and bitsandbytes",
)


def _tiny_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_with_moce_and_lora_trains(tmp_path, bits):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from moce_plugin.model.config import MoCEConfig
    from moce_plugin.model.upcycle import (
        aux_loss_of,
        cast_moce_parameters,
        pop_last_routing,
        upcycle_model,
    )
    from moce_plugin.outputs.folder import save_moce_files

    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.bfloat16)
             if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(_tiny_dir(tmp_path), quantization_config=quant,
                                                 dtype=torch.bfloat16, device_map={"": 0})
    cfg = MoCEConfig(num_clusters=3, experts_per_group=4, top_k=2, adapter_dim=16)
    upcycle_model(model, cfg, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                             modules_to_save=["moce_experts"]))
    cast_moce_parameters(model, torch.bfloat16)  # what the plugin's post_model_load does
    quant_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    mlp = model.base_model.model.model.layers[0].mlp
    assert isinstance(mlp.base_mlp.gate_proj, quant_cls), "frozen FFN stays quantized"
    active = mlp.moce_experts.modules_to_save["default"]
    assert active.down.dtype == active.router.weight.dtype == torch.bfloat16
    assert active.down.is_cuda and active.down.requires_grad

    calls = []
    mlp.base_mlp.register_forward_hook(lambda *a: calls.append(1))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (4, 64), generator=gen).cuda()
    clusters = torch.tensor([0, 1, 2, 1]).cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(input_ids=ids, labels=ids, moce_cluster_ids=clusters)
        loss = out.loss + 0.01 * aux_loss_of(pop_last_routing(model))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert len(calls) == 30, "the frozen FFN runs once per forward"
    print(f"{bits}-bit: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 0.1
    model.save_pretrained(tmp_path / "out")
    save_moce_files(model, cfg, tmp_path / "out")
    weights = load_file(str(tmp_path / "out" / "moce_weights.safetensors"))
    assert weights["layers.0.up"].abs().sum() > 0
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any("moce_experts" in k for k in adapter)
