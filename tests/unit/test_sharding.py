"""DeepSpeed / FSDP wiring, checked on CPU: what is a ZeRO-3 leaf, what FSDP2 shards, and that
the saved MoCE weights are the gathered full tensors."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from tiny_models import tiny_causal_lm

from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.layer import MoCEExperts
from moce_plugin.model.upcycle import moce_state_dict, upcycle_model

CFG = MoCEConfig(num_clusters=3, experts_per_group=2, top_k=2, adapter_dim=8)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_zero3_gathers_moce_experts_as_one_unit_without_leaf_marking():
    """ZeRO-3 fetches a module's own parameters in its pre-forward hook. MoCEExperts holds its
    expert tensors directly and calls its router module on every forward, so every rank gathers
    the same parameters every step; it is not marked a ZeRO-3 leaf (that broke the backward,
    docs/scaling.md)."""
    from transformers.integrations import HfDeepSpeedConfig

    model = upcycle_model(tiny_causal_lm("llama"), CFG)
    ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (global weakref read by transformers)
    from moce_plugin.integration.plugin import MoCEPlugin

    MoCEPlugin().post_model_load({"moce": {"num_clusters": 3}}, model)
    assert not any(getattr(m, "_z3_leaf", False) for m in model.modules())
    experts = [m for m in model.modules() if isinstance(m, MoCEExperts)]
    assert experts
    for m in experts:
        assert {n for n, _ in m.named_parameters(recurse=False)} >= {"down", "up"}
        holders = {n for n, c in m.named_children() if any(True for _ in c.parameters())}
        assert holders == {"router"}  # called as a module in forward: gathered by its hook
    del keep


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_shards_moce_with_its_decoder_layer_and_saves_full_weights(gloo_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = upcycle_model(tiny_causal_lm("llama"), CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("moce_experts.up"):
                p.normal_()
    ids = torch.randint(0, 128, (2, 6))
    clusters = torch.tensor([0, 2])
    with torch.no_grad():
        expected_logits = model(input_ids=ids, moce_cluster_ids=clusters).logits
    expected_state = moce_state_dict(model)
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:  # axolotl's TRANSFORMER_BASED_WRAP unit
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    experts = model.model.layers[0].mlp.moce_experts
    assert isinstance(experts.down, DTensor), "MoCE parameters are sharded with their layer"
    with torch.no_grad():
        logits = model(input_ids=ids, moce_cluster_ids=clusters).logits
    torch.testing.assert_close(logits, expected_logits)
    state = moce_state_dict(model)
    assert all(not isinstance(v, DTensor) for v in state.values())
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key
