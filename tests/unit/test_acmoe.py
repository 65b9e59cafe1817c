"""The ACMoE router option: the transform against a direct implementation of the paper's
formula, gradients, padding, running statistics, checkpointing and config errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tiny_models import assert_checkpointing_matches_plain_backward, tiny_causal_lm

from moce_plugin.model.acmoe import cluster_mad, feature_weights, transform
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.layer import MoCEExperts
from moce_plugin.model.upcycle import (
    aux_loss_of,
    load_moce_state_dict,
    moce_state_dict,
    pop_last_routing,
    upcycle_model,
)

D = 16


def direct_weights(x, clusters, valid, k, eps, clamp):
    """Definition 1 written out per cluster and feature with Python loops."""
    mads = torch.zeros(k, x.shape[1])
    for c in range(k):
        rows = x[(clusters == c) & valid]
        if len(rows):
            for q in range(x.shape[1]):
                col = rows[:, q]
                mads[c, q] = (col - col.mean()).abs().mean()
    w = 1.0 / (mads + eps * mads.mean())
    w = torch.clamp(w, max=clamp * w.mean())
    return w / w.mean()


def test_weights_match_direct_formula_and_ignore_padding():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, D, generator=gen) * torch.linspace(0.1, 3, D)
    clusters = torch.randint(0, 5, (80,), generator=gen)
    valid = torch.rand(80, generator=gen) > 0.2
    mad, counts = cluster_mad(x, clusters, valid, 5)
    got = feature_weights(mad, 0.1, 5.0)
    torch.testing.assert_close(got, direct_weights(x, clusters, valid, 5, 0.1, 5.0))
    assert counts.tolist() == [int(((clusters == c) & valid).sum()) for c in range(5)]
    x2 = x.clone()
    x2[~valid] = 1e3  # padding never enters the statistics
    torch.testing.assert_close(cluster_mad(x2, clusters, valid, 5)[0], mad)
    # tight features get larger weights
    assert got[:, 0].mean() > got[:, -1].mean()
    scaled = transform(x, got, clusters)
    torch.testing.assert_close(scaled[3], x[3] * got[clusters[3]])


def _layer(**kw):
    cfg = MoCEConfig(num_clusters=2, experts_per_group=3, top_k=2, adapter_dim=4,
                     router="acmoe", **kw)
    layer = MoCEExperts(D, cfg)
    with torch.no_grad():
        layer.up.normal_()
    return layer


def test_routing_uses_the_transformed_input_and_gradients_flow():
    layer = _layer().train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, D, generator=gen).requires_grad_(True)
    h = torch.randn(60, D, generator=gen)
    groups = torch.randint(0, 2, (60,), generator=gen)
    valid = torch.ones(60, dtype=torch.bool)
    prev = torch.randint(0, 3, (60,), generator=gen)
    out, record = layer(x, h, groups, valid, prev)
    clusters = groups * 3 + prev
    w = direct_weights(x.detach(), clusters, valid, 6, layer.router.eps, layer.router.clamp)
    logits = ((x.detach() * w[clusters]) @ layer.router.weight.detach().T).view(60, 2, 3)
    expected_top1 = logits[torch.arange(60), groups].argmax(-1)
    assert torch.equal(record.top1, expected_top1)
    (out.pow(2).sum() + record.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.down.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Running statistics: the first training forward sets them to this batch's dispersion
    # for every cluster with >= 2 real tokens, and counts one update for each.
    counts = torch.bincount(clusters, minlength=6)
    assert layer.router.seen.tolist() == (counts >= 2).float().tolist()
    for k in torch.nonzero(counts >= 2).flatten().tolist():
        rows = x.detach()[(clusters == k) & valid]
        torch.testing.assert_close(layer.router.dispersion[k], (rows - rows.mean(0)).abs().mean(0))


def test_eval_uses_running_statistics_so_one_token_routes_stably():
    layer = _layer().train()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, D, generator=gen)
    h = torch.randn(200, D, generator=gen)
    groups = torch.zeros(200, dtype=torch.long)
    prev = torch.randint(0, 3, (200,), generator=gen)
    layer(x, h, groups, torch.ones(200, dtype=torch.bool), prev)
    layer.eval()
    full, _ = layer(x, h, groups, torch.ones(200, dtype=torch.bool), prev)
    single, _ = layer(x[:1], h[:1], groups[:1], torch.ones(1, dtype=torch.bool), prev[:1])
    torch.testing.assert_close(single, full[:1])  # batch-size independent in eval


def _acmoe_model(**kw):
    model = upcycle_model(tiny_causal_lm("llama", num_hidden_layers=3),
                          MoCEConfig(num_clusters=2, experts_per_group=3, top_k=2,
                                     adapter_dim=8, router="acmoe", **kw))
    for name, p in model.named_parameters():
        if name.endswith("moce_experts.up"):
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(3))
    return model


def test_first_layer_routes_linearly_later_layers_use_previous_assignment():
    model = _acmoe_model().train()
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, moce_cluster_ids=torch.tensor([0, 1]))
    seen = [layer.mlp.moce_experts.router.seen.sum().item() for layer in model.model.layers]
    assert seen[0] == 0 and all(s > 0 for s in seen[1:])


def test_gradient_checkpointing_recompute_matches_plain_backward():
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    assert_checkpointing_matches_plain_backward(_acmoe_model, ids, torch.tensor([1, 0]))


def test_recompute_reuses_forward_weights_and_updates_statistics_once():
    model = _acmoe_model().train()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    ids = torch.randint(0, 128, (2, 9))
    out = model(input_ids=ids, labels=ids, moce_cluster_ids=torch.tensor([1, 0]))
    seen = [m.mlp.moce_experts.router.seen.clone() for m in model.model.layers]
    disp = [m.mlp.moce_experts.router.dispersion.clone() for m in model.model.layers]
    out.loss.backward()  # replays every layer
    for layer, s, d in zip(model.model.layers, seen, disp):
        assert torch.equal(layer.mlp.moce_experts.router.seen, s)
        assert torch.equal(layer.mlp.moce_experts.router.dispersion, d)


def test_running_statistics_are_saved_and_restored():
    model = _acmoe_model().train()
    model(input_ids=torch.randint(0, 128, (2, 8)), moce_cluster_ids=torch.tensor([0, 1]))
    state = moce_state_dict(model)
    assert "layers.1.router.dispersion" in state and state["layers.1.router.seen"].sum() > 0
    fresh = _acmoe_model()
    load_moce_state_dict(fresh, state)
    assert torch.equal(moce_state_dict(fresh)["layers.2.router.dispersion"],
                       state["layers.2.router.dispersion"])


@pytest.mark.parametrize("kw,match", [
    (dict(acmoe_eps=0), "acmoe_eps"), (dict(acmoe_clamp=1), "acmoe_clamp"),
    (dict(acmoe_momentum=1), "acmoe_momentum"), (dict(router="acm"), "router"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValidationError, match=match):
        MoCEConfig(num_clusters=2, **kw)


@pytest.mark.parametrize("top_k", [1, "soft", 2])
def test_layer_output_equals_reference_on_the_transformed_input(top_k):
    """ACMoE with top-1 / soft / top-2: the layer's output is the naive MoCE layer's output
    with the group routers reading M_k x (weights from the paper's formula)."""
    from bench.reference import naive_moce

    cfg = MoCEConfig(num_clusters=2, experts_per_group=3, top_k=top_k, adapter_dim=4,
                     adapter_scaling=0.7, router="acmoe")
    layer = MoCEExperts(D, cfg).train()
    with torch.no_grad():
        layer.up.normal_(generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(3)
    x, h = torch.randn(50, D, generator=gen), torch.randn(50, D, generator=gen)
    groups = torch.randint(0, 2, (50,), generator=gen)
    valid = torch.rand(50, generator=gen) > 0.1
    prev = torch.randint(0, 3, (50,), generator=gen)
    out, _ = layer(x, h, groups, valid, prev)
    clusters = groups * 3 + prev
    w = direct_weights(x, clusters, valid, 6, cfg.acmoe_eps, cfg.acmoe_clamp)
    expected = naive_moce(cfg, layer, x * w[clusters], h, groups, valid)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k,general", [(1, 0), ("soft", 0), (2, 2)])
def test_works_with_top1_soft_and_general_experts(top_k, general):
    model = upcycle_model(tiny_causal_lm("llama", num_hidden_layers=2),
                          MoCEConfig(num_clusters=2, experts_per_group=3, top_k=top_k,
                                     num_general_experts=general, adapter_dim=8,
                                     router="acmoe"))
    model.train()
    ids = torch.randint(0, 128, (2, 6))
    out = model(input_ids=ids, labels=ids, moce_cluster_ids=torch.tensor([[0] * 6, [1] * 6]))
    (out.loss + aux_loss_of(pop_last_routing(model))).backward()
    assert torch.isfinite(out.loss)


def test_weights_saved_with_the_old_key_names_still_load():
    """moce_weights.safetensors in the 0.1.0 format used
    ``layers.<i>.router`` / ``acmoe_dispersion`` / ``acmoe_seen``."""
    model = _acmoe_model().train()
    model(input_ids=torch.randint(0, 128, (2, 8)), moce_cluster_ids=torch.tensor([0, 1]))
    state = moce_state_dict(model)
    old_names = {"router.weight": "router", "router.dispersion": "acmoe_dispersion",
                 "router.seen": "acmoe_seen"}
    legacy = {}
    for key, value in state.items():
        layer, _, name = key.partition(".")[2].partition(".")
        legacy[f"layers.{layer}.{old_names.get(name, name)}"] = value
    assert "layers.1.router" in legacy and "layers.1.acmoe_seen" in legacy
    assert not any(k.endswith(".router.weight") for k in legacy)
    fresh = _acmoe_model()
    load_moce_state_dict(fresh, legacy)
    for key, value in moce_state_dict(fresh).items():
        assert torch.equal(value, state[key]), key
