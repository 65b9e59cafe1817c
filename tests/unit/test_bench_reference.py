"""bench/reference.py, the one reference MoCE layer: its gathered form (the one
bench_layer.py times as ``loop``) equals its dense form (the one the layer tests compare
with) and the fast layer, with an empty group and padding, and its gradients reach the
module's own parameters."""

from __future__ import annotations

import pytest
import torch

from bench.reference import MaskedLoopMLP, naive_moce
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.layer import MoCEExperts


@pytest.mark.parametrize("top_k,general", [(2, 2), ("soft", 0), (1, 3)])
def test_gathered_form_equals_dense_form_and_fast_layer(top_k, general):
    cfg = MoCEConfig(num_clusters=3, experts_per_group=4, top_k=top_k,
                     num_general_experts=general, adapter_dim=8, adapter_scaling=0.5)
    experts = MoCEExperts(16, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.up.normal_(generator=gen)
    x, h = torch.randn(40, 16, generator=gen), torch.randn(40, 16, generator=gen)
    groups = torch.randint(0, 3, (40,), generator=gen)
    groups[groups == 1] = 0  # group 1 has no token: the gathered form skips it
    valid = torch.rand(40, generator=gen) > 0.2
    fast, _ = experts(x, h, groups, valid)
    dense = naive_moce(cfg, experts, x, h, groups, valid)
    gathered = naive_moce(cfg, experts, x, h, groups, valid, gather=True)
    torch.testing.assert_close(dense, fast, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered, fast, atol=1e-5, rtol=1e-5)

    experts.zero_grad()
    gathered.sum().backward()
    assert experts.down.grad.abs().sum() > 0 and experts.router.weight.grad.abs().sum() > 0


def test_masked_loop_mlp_adds_the_experts_to_the_ffn():
    cfg = MoCEConfig(num_clusters=2, experts_per_group=2, top_k=1, adapter_dim=4)
    experts = MoCEExperts(8, cfg)
    with torch.no_grad():
        experts.up.normal_(generator=torch.Generator().manual_seed(1))
    ffn = torch.nn.Linear(8, 8)
    x = torch.randn(2, 5, 8)
    groups, valid = torch.randint(0, 2, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    out = MaskedLoopMLP(ffn, cfg, experts)(x, groups, valid)
    expected = naive_moce(cfg, experts, x.reshape(-1, 8), ffn(x).reshape(-1, 8),
                          groups.reshape(-1), valid.reshape(-1))
    torch.testing.assert_close(out, expected.view(2, 5, 8))
