"""The fast MoCE layer against the naive masked-loop reference, and its routing."""

from __future__ import annotations

import pytest
import torch
from layer_helpers import D, make_config, make_experts

from bench.reference import naive_aux_loss, naive_moce
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.expert_ops import grouped_matmul
from moce_plugin.model.layer import MoCEExperts, MoCEMLP
from moce_plugin.model.plans import all_plans, choose_plan
from moce_plugin.model.routing import cluster_ids_context


def random_batch(T=57, groups=3, seed=0, pad_frac=0.2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    h = torch.randn(T, D, generator=gen)
    g = torch.randint(0, groups, (T,), generator=gen)
    valid = torch.rand(T, generator=gen) > pad_frac
    return x, h, g, valid


CASES = [
    pytest.param(dict(top_k=1), id="top1"),
    pytest.param(dict(top_k=2), id="top2"),
    pytest.param(dict(top_k=3), id="top3"),  # sets of 3: the subset lookup, not the pair formula
    pytest.param(dict(top_k=4), id="top4-all"),
    pytest.param(dict(top_k="soft"), id="soft"),
    pytest.param(dict(top_k="soft", groups=1), id="soft-C1"),
    pytest.param(dict(top_k="soft", activation="gelu"), id="soft-gelu"),
    pytest.param(dict(top_k=2, general=2), id="V-top2"),
    pytest.param(dict(top_k=2, general=3, general_top_k=1), id="V-top2-gen1"),
    pytest.param(dict(top_k=1, general=3, general_top_k="soft"), id="V-top1-gensoft"),
    pytest.param(dict(top_k="soft", general=2), id="V-soft"),
    pytest.param(dict(top_k="soft", general=2, general_top_k=1), id="V-soft-gen1"),
    pytest.param(dict(top_k="soft", general=2, groups=1, activation="gelu"), id="V-soft-C1"),
]


def plans(kwargs):
    """The default choice, the eager reference and every registered plan for this routing
    mode."""
    return [None, "eager", *all_plans(bool(kwargs.get("general")))]


def _plan_id(plan):
    return plan if isinstance(plan, str) else "auto" if plan is None else "+".join(map(str, plan))


CASES_X_PLANS = [
    pytest.param(p.values[0], plan, id=f"{p.id}-{_plan_id(plan)}")
    for p in CASES for plan in plans(p.values[0])
]


@pytest.mark.parametrize("kwargs,plan", CASES_X_PLANS)
def test_fast_equals_naive_forward_and_grad(kwargs, plan):
    cfg = make_config(**kwargs)
    fast = make_experts(**kwargs)
    fast.plan = plan
    ref = make_experts(**kwargs)
    ref.load_state_dict(fast.state_dict())
    x, h, g, valid = random_batch(groups=cfg.groups)
    xs = [t.clone().requires_grad_(True) for t in (x, h)]
    xr = [t.clone().requires_grad_(True) for t in (x, h)]
    out_fast, _ = fast(xs[0], xs[1], g, valid)
    out_ref = naive_moce(cfg, ref, xr[0], xr[1], g, valid)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out_fast)
    (out_fast * upstream).sum().backward()
    (out_ref * upstream).sum().backward()
    for a, b in zip(xs, xr):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    for (name, pa), (_, pb) in zip(fast.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_default_plan_per_routing_mode():
    """The measured choice (docs/performance.md, bench/bench_expert_plans.py): dense blocks
    where a group's experts are used in full, (group, chosen set) blocks for top-k >= 2 when
    the sets' stacked weights are no larger than the slot rows, slots otherwise."""
    big, small = 8192, 2048  # tokens in the call; C=7, E=4, r=64 -> 42 sets * 64 = 2688
    assert choose_plan(2, 4, 2, 0, 7, big) == ("sets", None)
    assert choose_plan(2, 4, 2, 0, 7, small) == ("slots", None)
    assert choose_plan(2, 8, 2, 0, 7, big) == ("slots", None)  # 196 sets
    assert choose_plan(1, 4, 1, 0, 7, big) == ("slots", None)
    assert choose_plan("soft", 4, "soft", 0, 7, big) == ("blocks", None)
    assert choose_plan(4, 4, 4, 0, 7, small) == ("blocks", None)
    # General experts folded into the set call (shared blocks); a separate dense call
    # beside slots.
    assert choose_plan(2, 4, 2, 2, 7, big) == ("sets", "fold")
    assert choose_plan(2, 4, 2, 2, 7, small) == ("slots", "blocks")
    assert choose_plan(2, 4, 2, 3, 7, big) == ("sets", "fold")  # sparse general, G <= 2k
    assert choose_plan(2, 4, 1, 3, 7, big) == ("sets", "slots")
    assert choose_plan(1, 4, 1, 2, 7, big) == ("slots", "slots")
    assert choose_plan("soft", 4, "soft", 2, 7, big) == ("blocks", "fold")
    assert choose_plan("soft", 4, 1, 2, 7, big) == ("blocks", "fold")


def test_gradients_reach_routers_and_every_expert():
    layer = make_experts(top_k=2, general=2, groups=2, experts=3)
    x, h, g, valid = random_batch(T=400, groups=2, pad_frac=0.0)
    out, record = layer(x, h, g, valid)
    (out.pow(2).sum() + record.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum(-1).gt(0).all(), "every group router row"
    assert layer.general_router.grad.abs().sum(-1).gt(0).all()
    assert layer.down.grad.flatten(1).abs().sum(-1).gt(0).all(), "every expert's down-proj"
    assert layer.up.grad.flatten(1).abs().sum(-1).gt(0).all(), "every expert's up-proj"


def test_top1_router_learns_from_lm_loss():
    # top-1 keeps the raw probability, so the router gets gradient without the aux loss.
    layer = make_experts(top_k=1)
    x, h, g, valid = random_batch(pad_frac=0.0)
    out, _ = layer(x, h, g, valid)
    out.pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("plan", [("slots", None), ("sets", None), ("blocks", None)])
def test_cluster_tokens_only_touch_their_group(plan):
    C, E = 3, 4
    layer = make_experts(top_k=2, groups=C, experts=E)
    layer.plan = plan
    x, h, _, _ = random_batch(T=64, groups=C, pad_frac=0.0)
    g = torch.full((64,), 1)
    out, _ = layer(x, h, g, torch.ones(64, dtype=torch.bool))
    out.pow(2).sum().backward()
    per_expert = layer.down.grad.flatten(1).abs().sum(-1) + layer.up.grad.flatten(1).abs().sum(-1)
    in_group = torch.zeros(C * E, dtype=torch.bool)
    in_group[E:2 * E] = True
    assert per_expert[~in_group].eq(0).all()
    assert per_expert[in_group].gt(0).any()
    router_rows = layer.router.weight.grad.abs().sum(-1)
    assert router_rows[~in_group].eq(0).all() and router_rows[in_group].gt(0).all()


@pytest.mark.parametrize("plan", [("slots", None), ("sets", None), ("blocks", None)])
def test_padding_gets_no_output_change_and_no_gradient(plan):
    layer = make_experts(top_k=2)
    layer.plan = plan
    x, h, g, valid = random_batch()
    hh = h.clone().requires_grad_(True)
    out, _ = layer(x, hh, g, valid)
    torch.testing.assert_close(out[~valid], h[~valid])
    out[~valid].sum().backward()
    assert layer.up.grad is None or layer.up.grad.abs().sum() == 0


def test_zero_init_is_identity():
    cfg = MoCEConfig(num_clusters=2, experts_per_group=4, num_general_experts=2)
    layer = MoCEExperts(D, cfg)
    x, h, g, valid = random_batch(groups=2)
    out, _ = layer(x, h, g, valid)
    assert torch.equal(out, h)


def test_grouped_matmul_fallback_matches():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 6, generator=gen)  # 6 floats = 24 bytes: not 16-aligned -> fallback
    w = torch.randn(4, 6, 3, generator=gen)
    offsets = counts.cumsum(0).to(torch.int32)
    out = grouped_matmul(x, w, offsets, counts)
    ref = torch.cat([x[0:3] @ w[0], x[3:8] @ w[2], x[8:10] @ w[3]])
    torch.testing.assert_close(out, ref)


def test_mlp_reads_per_sequence_and_per_token_ids():
    cfg = MoCEConfig(num_clusters=3, experts_per_group=2, top_k=1, adapter_dim=8)
    base = torch.nn.Linear(D, D)
    mlp = MoCEMLP(base, D, cfg, 0)
    with torch.no_grad():
        mlp.moce_experts.up.normal_()
    hs = torch.randn(2, 5, D)
    with cluster_ids_context(torch.tensor([0, 2])):
        per_seq = mlp(hs)
    with cluster_ids_context(torch.tensor([[0] * 5, [2] * 5])):
        per_tok = mlp(hs)
    torch.testing.assert_close(per_seq, per_tok)


@pytest.mark.parametrize("kwargs,plan", [
    pytest.param(dict(top_k="soft", general=2), None, id="V-soft"),
    pytest.param(dict(top_k=2, general=2), ("slots", "blocks"), id="V-top2-slots"),
    pytest.param(dict(top_k=2, general=2), ("sets", "blocks"), id="V-top2-sets"),
    pytest.param(dict(top_k="soft", groups=1), None, id="soft-C1"),
])
def test_layer_traces_under_torch_compile(kwargs, plan):
    """The block, set and slot plans inside MoCEExperts trace with Dynamo + AOT autograd."""
    torch._dynamo.reset()
    cfg = make_config(**kwargs)
    layer = make_experts(**kwargs)
    layer.plan = plan
    x, h, g, valid = random_batch(groups=cfg.groups)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    results = []
    for fn in (torch.compile(layer, backend="aot_eager"), layer):
        layer.zero_grad(set_to_none=True)
        out, record = fn(x, h, g, valid)
        ((out * upstream).sum() + record.aux_loss).backward()
        results.append([out.detach()] + [p.grad.clone() for p in layer.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(top_k=1), id="top1"),
    pytest.param(dict(top_k=2), id="top2"),
    pytest.param(dict(top_k="soft"), id="soft"),
    pytest.param(dict(top_k=2, general=2, general_top_k=1), id="V"),
])
def test_layer_aux_loss_value_with_padding_and_unequal_groups(kwargs):
    """The layer's balancing loss equals the per-group formula over real tokens only, with
    groups weighted by their token counts (40 / 12 / 3 real tokens; padding rows carry huge
    router inputs that would dominate if they were counted)."""
    cfg = make_config(**kwargs)
    layer = make_experts(**kwargs)
    gen = torch.Generator().manual_seed(5)
    counts, pad = (40, 12, 3), 30
    g = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)] + [torch.zeros(pad)]).long()
    valid = torch.cat([torch.ones(sum(counts)), torch.zeros(pad)]).bool()
    x = torch.randn(len(g), D, generator=gen)
    x[~valid] = 50 * torch.randn(pad, D, generator=gen)
    h = torch.randn(len(g), D, generator=gen)
    layer.train()
    _, record = layer(x, h, g, valid)
    expected = naive_aux_loss(cfg, layer, x, g, valid)
    torch.testing.assert_close(record.aux_loss, expected, atol=1e-5, rtol=1e-5)
    # Real tokens per group, padding not counted; and group weighting matters here: the
    # plain mean over the groups' losses is a different number.
    assert record.group_tokens.tolist() == [float(n) for n in counts]
    if not cfg.num_general_experts:
        plain = naive_aux_loss(cfg, layer, x, g, valid, weighted=False)
        assert not torch.isclose(plain, expected, atol=1e-4, rtol=1e-4)
