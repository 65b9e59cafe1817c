"""Upcycling real (tiny) decoder models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_checkpointing_matches_plain_backward, tiny_causal_lm

from moce_plugin.model.architectures import UnsupportedArchitectureError
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.layer import MoCEMLP
from moce_plugin.model.routing import InvalidClusterIdsError, MissingClusterIdsError
from moce_plugin.model.upcycle import (
    aux_loss_of,
    load_moce_state_dict,
    moce_state_dict,
    pop_last_routing,
    upcycle_model,
)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]


def moce_cfg(**kw):
    return MoCEConfig(**{"num_clusters": 3, "experts_per_group": 4, "adapter_dim": 8, **kw})


@pytest.mark.parametrize("model_type", FAMILIES)
def test_zero_init_reproduces_base_logits(model_type):
    base = tiny_causal_lm(model_type)
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = upcycle_model(base, moce_cfg(num_general_experts=2))
    assert sum(isinstance(m, MoCEMLP) for m in model.modules()) == 2
    with torch.no_grad():
        got = model(input_ids=ids, moce_cluster_ids=torch.tensor([0, 2])).logits
    assert torch.equal(got, expected)


def test_routing_changes_output_once_trained_and_per_cluster():
    model = upcycle_model(tiny_causal_lm("llama"), moce_cfg())
    for name, p in model.named_parameters():
        if name.endswith("moce_experts.up"):
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        a = model(input_ids=ids, moce_cluster_ids=torch.tensor([0])).logits
        b = model(input_ids=ids, moce_cluster_ids=torch.tensor([1])).logits
    assert not torch.allclose(a, b)


def test_only_moce_trainable_and_aux_loss_reaches_routers():
    model = upcycle_model(tiny_causal_lm("qwen2"), moce_cfg())
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".moce_experts." in n for n in trainable)
    ids = torch.randint(0, 128, (2, 7))
    out = model(input_ids=ids, labels=ids, moce_cluster_ids=torch.tensor([[0] * 7, [1] * 7]))
    records = pop_last_routing(model)
    assert len(records) == 2
    aux = aux_loss_of(records)
    (out.loss + aux).backward()
    routers = [p for n, p in model.named_parameters() if n.endswith("moce_experts.router.weight")]
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)


def test_missing_and_out_of_range_cluster_ids_are_clear():
    model = upcycle_model(tiny_causal_lm("llama"), moce_cfg())
    ids = torch.randint(0, 128, (2, 5))
    with pytest.raises(MissingClusterIdsError, match="moce_cluster_ids"):
        model(input_ids=ids)
    with pytest.raises(InvalidClusterIdsError, match=r"outside \[0, 3\)"):
        model(input_ids=ids, moce_cluster_ids=torch.tensor([0, 3]))
    with pytest.raises(InvalidClusterIdsError, match="integers"):
        model(input_ids=ids, moce_cluster_ids=torch.tensor([0.0, 1.0]))


def test_unsupported_architecture_lists_supported():
    model = tiny_causal_lm("llama")
    model.config.model_type = "falcon"
    expected = "Supported: .*llama.*register_architecture"
    with pytest.raises(UnsupportedArchitectureError, match=expected):
        upcycle_model(model, moce_cfg())


def test_layer_selection_and_state_dict_round_trip():
    model = upcycle_model(tiny_causal_lm("llama", num_hidden_layers=3), moce_cfg(layers=[0, -1]))
    assert [isinstance(layer.mlp, MoCEMLP) for layer in model.model.layers] == [True, False, True]
    state = moce_state_dict(model)
    assert set(k.split(".")[1] for k in state) == {"0", "2"}
    other = upcycle_model(tiny_causal_lm("llama", num_hidden_layers=3, seed=1),
                          moce_cfg(layers=[0, -1], init_seed=5))
    load_moce_state_dict(other, {k: v + 1 for k, v in state.items()})
    assert torch.equal(moce_state_dict(other)["layers.0.up"], state["layers.0.up"] + 1)
    with pytest.raises(ValueError, match="another moce config"):
        load_moce_state_dict(other, {"layers.1.up": state["layers.0.up"]})


def test_gradient_checkpointing_matches_plain_backward():
    def build():
        model = upcycle_model(tiny_causal_lm("llama"), moce_cfg())
        for name, p in model.named_parameters():
            if name.endswith("moce_experts.up"):
                torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(1))
        return model

    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    assert_checkpointing_matches_plain_backward(build, ids, torch.tensor([1, 2]))


def _trained_tiny(model_type="llama"):
    model = upcycle_model(tiny_causal_lm(model_type), moce_cfg())
    for name, p in model.named_parameters():
        if name.endswith("moce_experts.up"):
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(3))
    return model


def test_routing_context_does_not_leak_between_threads():
    from concurrent.futures import ThreadPoolExecutor

    model = _trained_tiny()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    clusters = [torch.tensor([c, (c + 1) % 3]) for c in range(3)]
    with torch.no_grad():
        expected = [model(input_ids=ids, moce_cluster_ids=c).logits for c in clusters]

    def run(i):
        with torch.no_grad():
            return model(input_ids=ids, moce_cluster_ids=clusters[i % 3]).logits

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(24)))
    for i, logits in enumerate(results):
        assert torch.equal(logits, expected[i % 3])
    # and nothing is left behind on this thread
    from moce_plugin.model.routing import collector_stack, current_cluster_ids

    assert current_cluster_ids() is None and collector_stack() == []


def test_failed_forward_leaves_no_context_behind():
    from moce_plugin.model.routing import collector_stack, current_cluster_ids

    model = _trained_tiny()
    with pytest.raises(InvalidClusterIdsError, match="covers 2 positions"):
        model(input_ids=torch.randint(0, 128, (2, 5)), moce_cluster_ids=torch.tensor([[0, 1]] * 2))
    assert current_cluster_ids() is None and collector_stack() == []


def test_generate_with_per_sequence_cluster_ids_and_kv_cache():
    model = _trained_tiny()
    prompt = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    clusters = torch.tensor([0, 2])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, moce_cluster_ids=clusters, max_new_tokens=5,
                             do_sample=False, use_cache=True, pad_token_id=0)
        # Greedy decoding with the cache equals recomputing the full sequence each step.
        seq = prompt
        for _ in range(5):
            logits = model(input_ids=seq, moce_cluster_ids=clusters, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_frozen_ffn_runs_once_per_forward():
    model = _trained_tiny()
    calls = []
    for layer in model.model.layers:
        layer.mlp.base_mlp.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 7)), moce_cluster_ids=torch.tensor([0, 1]))
    assert len(calls) == len(model.model.layers)


def test_upcycled_layers_follow_the_models_train_eval_mode():
    model = upcycle_model(tiny_causal_lm("llama"), moce_cfg())  # tiny_causal_lm is in eval
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 4)), moce_cluster_ids=torch.tensor([0]))
    # inference pays for no balancing statistics
    assert all(r.aux_loss is None for r in pop_last_routing(model))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_unfrozen_parameters_for_the_base_keep_moce_trainable(lora):
    """axolotl's freeze_layers_except runs after the plugin; patterns that name no MoCE tensor
    must leave the experts and routers (PEFT's active copy, not original_module) trainable,
    patterns that name some keep the user's choice among them."""
    from axolotl.utils.freeze import freeze_layers_except
    from peft import LoraConfig, get_peft_model

    from moce_plugin.integration.plugin import keep_moce_trainable

    def build():
        model = upcycle_model(tiny_causal_lm("llama"), MoCEConfig(num_clusters=2,
                                                                   experts_per_group=2))
        if lora:
            model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"],
                                                     modules_to_save=["moce_experts"]))
        return model

    prefix = "base_model.model.model" if lora else "model"
    base_patterns = [f"{prefix}.layers.[0-9]+.self_attn"]
    model = build()
    freeze_layers_except(model, base_patterns)
    keep_moce_trainable(base_patterns, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    moce = {n for n, _ in model.named_parameters()
            if ".moce_experts." in n and "original_module" not in n}
    assert moce and moce <= trainable
    assert not any("original_module" in n or "base_mlp" in n for n in trainable)
    assert any("self_attn" in n for n in trainable)

    router_only = [f"{prefix}.layers.[0-9]+.mlp.moce_experts" +
                   (".modules_to_save.default" if lora else "") + ".router"]
    model = build()
    freeze_layers_except(model, router_only)
    keep_moce_trainable(router_only, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
