"""Every registered expert plan (`moce_plugin.model.plans`) against the eager reference, the
registry itself, and the shared dispatch step (`moce_plugin.model.dispatch`)."""

from __future__ import annotations

import pytest
import torch
from layer_helpers import D, make_experts

from moce_plugin.model import plans as plans_mod
from moce_plugin.model.dispatch import sort_by_bin
from moce_plugin.model.plans import (
    GENERAL_PLANS,
    GROUP_PLANS,
    PlanRegistry,
    SlotCall,
    all_plans,
    route,
)
from moce_plugin.model.routers import ACMoERouter


def batch(T=57, groups=3, experts=4, seed=0):
    """Router input, FFN output, groups, ~20% padding rows, previous layer's top-1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    h = torch.randn(T, D, generator=gen)
    g = torch.randint(0, groups, (T,), generator=gen)
    valid = torch.rand(T, generator=gen) > 0.2
    prev = torch.randint(0, experts, (T,), generator=gen)
    return x, h, g, valid, prev


def run(layer, plan, inputs, upstream):
    """Output and every gradient (inputs, then each parameter by name) of one fwd+bwd."""
    x, h, g, valid, prev = inputs
    layer.plan = plan
    layer.zero_grad(set_to_none=True)
    x, h = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
    # ACMoE routes on the previous layer's top-1 (a linear router ignores it)
    out, record = layer(x, h, g, valid, prev if isinstance(layer.router, ACMoERouter) else None)
    ((out * upstream).sum() + record.aux_loss).backward()
    grads = {"x": x.grad, "h": h.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return out.detach(), grads


ROUTINGS = [
    pytest.param(dict(top_k=1), id="top1"),
    pytest.param(dict(top_k=2), id="top2"),
    pytest.param(dict(top_k=3), id="top3"),
    pytest.param(dict(top_k="soft"), id="soft"),
    pytest.param(dict(top_k=2, router="acmoe"), id="top2-acmoe"),
    pytest.param(dict(top_k=1, general=3, general_top_k="soft"), id="V-top1-gensoft"),
    pytest.param(dict(top_k=2, general=2), id="V-top2"),
    pytest.param(dict(top_k=2, general=3, general_top_k=1), id="V-top2-gen1"),
    pytest.param(dict(top_k="soft", general=2), id="V-soft"),
    pytest.param(dict(top_k="soft", general=2, groups=1), id="V-soft-C1"),
    pytest.param(dict(top_k=2, general=2, router="acmoe"), id="V-top2-acmoe"),
]

ROUTINGS_X_PLANS = [
    pytest.param(p.values[0], plan, id=f"{p.id}-{'+'.join(s for s in plan if s)}")
    for p in ROUTINGS for plan in all_plans(bool(p.values[0].get("general")))
] + [  # the few-token plans, here with autograd too (plain differentiable ops)
    pytest.param(p.values[0], plan, id=f"{p.id}-{plan}")
    for p in ROUTINGS for plan in ("gather", "dense")
]


@pytest.mark.parametrize("kwargs,plan", ROUTINGS_X_PLANS)
def test_every_registered_plan_equals_eager(kwargs, plan):
    """Forward output and the gradient of the inputs, both routers and every expert; padding
    rows in the batch (their output must stay h and give no gradient, as in eager)."""
    groups = kwargs.get("groups", 3)
    inputs = batch(groups=groups)
    upstream = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5))
    fast, ref = make_experts(**kwargs), make_experts(**kwargs)
    ref.load_state_dict(fast.state_dict())
    out, grads = run(fast, plan, inputs, upstream)
    want_out, want_grads = run(ref, "eager", inputs, upstream)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert want is not None, name
        torch.testing.assert_close(grads[name], want, atol=1e-5, rtol=1e-4, msg=name)
    valid = inputs[3]
    torch.testing.assert_close(out[~valid], inputs[1][~valid])
    assert grads["h"][~valid].eq(upstream[~valid]).all(), "padding: only the identity path"


def test_all_plans_follows_the_registries():
    assert all_plans(False) == [(g, None) for g in GROUP_PLANS]
    general = all_plans(True)
    assert ("slots", "fold") not in general  # nothing to fold into
    assert len(general) == len(GROUP_PLANS) * len(GENERAL_PLANS) - 1
    assert set(GROUP_PLANS) == {"slots", "blocks", "sets"}
    assert set(GENERAL_PLANS) == {"slots", "blocks", "fold"}


def test_a_registered_plan_is_what_the_layer_runs(monkeypatch):
    """A new name in the registry is picked up by name, with no branch to add."""
    registry = PlanRegistry("group")
    for name in GROUP_PLANS:
        registry.register(name)(GROUP_PLANS[name])
    calls = []

    @registry.register("slots-spy")
    def spy(experts, routing, groups, mask):
        calls.append(routing)
        return GROUP_PLANS["slots"](experts, routing, groups, mask)

    monkeypatch.setattr(plans_mod, "GROUP_PLANS", registry)
    layer = make_experts(top_k=2)
    inputs = batch()
    upstream = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5))
    out, _ = run(layer, ("slots-spy", None), inputs, upstream)
    want, _ = run(layer, ("slots", None), inputs, upstream)
    assert len(calls) == 1 and calls[0].chosen.shape == (57, 2)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("kwargs,plan,error,match", [
    (dict(top_k=2), ("rows", None), KeyError, "unknown group plan 'rows'; registered: slots"),
    (dict(top_k=2, general=2), ("sets", "dense"), KeyError, "unknown general plan 'dense'"),
    (dict(top_k=2, general=2), ("slots", "fold"), ValueError, "'blocks' or 'sets' group plan"),
    (dict(top_k=2, general=2), ("sets", None), ValueError, "no general plan but the layer has"),
])
def test_bad_plans_name_the_problem(kwargs, plan, error, match):
    layer = make_experts(**kwargs)
    layer.plan = plan
    x, h, g, valid, _ = batch()
    with pytest.raises(error, match=match):
        layer(x, h, g, valid)


def test_routing_named_tuple():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    soft, top2 = route(logits, "soft"), route(logits, 2)
    assert soft.chosen is None and torch.equal(soft.dense(), soft.probs)
    assert torch.equal(soft.experts(), torch.arange(4).expand(5, -1))
    dense = top2.dense()
    assert dense.ne(0).sum(-1).eq(2).all()
    torch.testing.assert_close(dense.sum(-1), torch.ones(5))  # renormalised over the k
    assert torch.equal(dense.gather(-1, top2.experts()), top2.weights)
    top1 = route(logits, 1)
    torch.testing.assert_close(top1.weights[:, 0], top1.probs.max(-1).values)  # raw prob


def test_general_slots_share_the_group_routed_call():
    layer = make_experts(top_k=2, general=3, general_top_k=1)
    x, h, g, valid, _ = batch()
    mask = valid[:, None].float()
    group = route(torch.randn(57, 4), 2)
    general = route(torch.randn(57, 3), 1)
    calls = GENERAL_PLANS["slots"](layer, general, mask,
                                   GROUP_PLANS["slots"](layer, group, g, mask))
    assert len(calls) == 1 and isinstance(calls[0], SlotCall)
    assert calls[0].expert_ids.shape == (57, 3)
    assert calls[0].expert_ids[:, 2].ge(12).all()  # general experts follow the C*E


@pytest.mark.parametrize("bins,num_bins", [
    ([3, 0, 3, 1, 0, 3], 5),  # bins 2 and 4 empty (one inside, one at the end)
    ([0, 0, 0], 1),
    ([], 3),
])
def test_sort_by_bin(bins, num_bins):
    bins = torch.tensor(bins, dtype=torch.long)
    d = sort_by_bin(bins, num_bins)
    sorted_bins = bins[d.order]
    assert torch.equal(sorted_bins, bins.sort(stable=True).values)
    # stable: rows of one bin keep their source order
    for b in range(num_bins):
        rows = d.order[sorted_bins == b]
        assert torch.equal(rows, rows.sort().values)
    assert torch.equal(d.order[d.inverse], torch.arange(len(bins)))
    want_counts = torch.bincount(bins, minlength=num_bins)
    assert torch.equal(d.counts, want_counts)
    assert d.offsets.dtype == torch.int32
    assert torch.equal(d.offsets.long(), want_counts.cumsum(0))
