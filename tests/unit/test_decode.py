"""The few-token inference path (a decode step: one token per sequence) against the eager
reference: the few-token plans ``"gather"`` and ``"dense"`` (`moce_plugin.model.plans`), which
one the layer takes and when, the cached ``down`` layout of the dense plan, the
per-forward cluster-id cache (`moce_plugin.model.routing`), and greedy decoding with the KV
cache against a full recomputation through the eager plan, for every routing mode."""

from __future__ import annotations

import pytest
import torch
from layer_helpers import D, make_config, make_experts
from test_plans import ROUTINGS, batch
from tiny_models import tiny_causal_lm

from moce_plugin.model import plans as plans_mod
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.layer import MoCEMLP
from moce_plugin.model.plans import (
    CPU_SLOTS_MAX_TOKENS_PER_EXPERT,
    CUDA_DENSE_MAX_WORK,
    DENSE_SLOT_FACTOR,
    GATHER_MAX_SLOTS,
    inference_plan,
)
from moce_plugin.model.routers import ACMoERouter
from moce_plugin.model.routing import cluster_ids_context, collector_stack
from moce_plugin.model.upcycle import moce_experts_modules, upcycle_model


def config_slots(kwargs: dict) -> int:
    """Slots per token from the routing settings themselves (not from the layer): k, or E
    when soft, plus the general experts' k (or G when soft; None means the group's k)."""
    experts = kwargs.get("experts", 4)
    top_k = kwargs["top_k"]
    slots = experts if top_k == "soft" else top_k
    general = kwargs.get("general", 0)
    if general:
        gk = kwargs.get("general_top_k") or top_k
        slots += general if gk == "soft" else gk
    return slots


def _inputs(T: int, groups: int):
    x, h, g, valid, prev = batch(T=T, groups=groups, seed=T)
    valid[0] = False  # always one padding row
    return x, h, g, valid, prev


@pytest.mark.parametrize("kwargs", ROUTINGS)
@pytest.mark.parametrize("tokens", [1, 3, 8, 40])
@pytest.mark.parametrize("plan", [None, "gather", "dense"])
def test_inference_step_equals_eager(kwargs, tokens, plan):
    """Without autograd the layer runs its own choice (None) or a forced few-token plan
    (dense also runs larger calls on CUDA): equal to the eager plan, padding rows left at h."""
    layer = make_experts(**kwargs).eval()
    if isinstance(layer.router, ACMoERouter):  # eval routes on running statistics
        layer.router.seen.fill_(1.0)
        layer.router.dispersion.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    x, h, g, valid, prev = _inputs(tokens, kwargs.get("groups", 3))
    prev = prev if isinstance(layer.router, ACMoERouter) else None
    with torch.no_grad():
        layer.plan = plan
        got, _ = layer(x, h, g, valid, prev)
        layer.plan = "eager"
        want, _ = layer(x, h, g, valid, prev)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[~valid], h[~valid])


def config_experts(kwargs: dict) -> int:
    """The layer's adapters from the settings: C * E group experts plus the general ones."""
    return kwargs.get("groups", 3) * kwargs.get("experts", 4) + kwargs.get("general", 0)


@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(top_k=1), id="top1"),
    pytest.param(dict(top_k=2), id="top2"),
    pytest.param(dict(top_k="soft"), id="soft"),
    pytest.param(dict(top_k=2, general=3, general_top_k=1), id="V-top2-gen1"),
    pytest.param(dict(top_k=1, general=3, general_top_k="soft"), id="V-top1-gensoft"),
    pytest.param(dict(top_k=1, groups=8, experts=8), id="top1-C8E8"),
])
def test_layer_takes_a_few_token_plan_only_without_autograd_and_few_slots(kwargs, monkeypatch):
    """Inference calls of at most GATHER_MAX_SLOTS (token, expert) slots take a few-token
    plan: "dense" once the slots reach N / DENSE_SLOT_FACTOR (N: all the layer's experts),
    else "gather"; training (autograd) and larger calls keep the sorted plans."""
    calls = []
    for name in ("gathered_expert_outputs", "dense_expert_outputs"):
        real = getattr(plans_mod, name)

        def spy(experts, h, *args, _name=name, _real=real):
            calls.append((_name.split("_")[0], h.shape[0]))
            return _real(experts, h, *args)

        monkeypatch.setattr(plans_mod, name, spy)
    layer = make_experts(**kwargs).eval()
    per_token = config_slots(kwargs)
    fits = GATHER_MAX_SLOTS // per_token
    groups = kwargs.get("groups", 3)
    seen = set()
    for tokens in range(1, fits + 2):
        calls.clear()
        x, h, g, valid, _ = _inputs(tokens, groups)
        with torch.no_grad():
            layer(x, h, g, valid)
        if tokens > fits:
            assert calls == [], tokens
            continue
        dense = config_experts(kwargs) <= DENSE_SLOT_FACTOR * tokens * per_token
        assert calls == [("dense" if dense else "gathered", tokens)], tokens
        seen.add(calls[0][0])
    calls.clear()
    x, h, g, valid, _ = _inputs(1, groups)
    layer(x, h, g, valid)  # autograd on
    assert calls == []
    # the settings above reach both few-token plans, or only one where the rule says so
    assert seen == ({"dense"} if config_experts(kwargs) <= DENSE_SLOT_FACTOR * per_token
                    else {"gathered", "dense"} if config_experts(kwargs)
                    <= DENSE_SLOT_FACTOR * fits * per_token else {"gathered"})


@pytest.mark.parametrize("experts,rank,hidden", [(12, 64, 576), (64, 64, 4096), (14, 8, 16)])
@pytest.mark.parametrize("per_token", [1, 2, 6])
@pytest.mark.parametrize("general", [False, True])
def test_inference_rule_by_device_and_call_size(experts, rank, hidden, per_token, general):
    """Without autograd, calls of at most GATHER_MAX_SLOTS slots take a few-token plan on
    every device; beyond that, CUDA runs dense while tokens x experts x rank x hidden (one
    dense product's multiply-adds) stays within CUDA_DENSE_MAX_WORK, the CPU runs the
    sorted slots (general ones too where the layer has them) up to
    CPU_SLOTS_MAX_TOKENS_PER_EXPERT tokens per adapter; larger calls: choose_plan (None)."""
    most = CUDA_DENSE_MAX_WORK // (experts * rank * hidden)  # the last dense token count
    cpu_most = CPU_SLOTS_MAX_TOKENS_PER_EXPERT * experts
    fits = GATHER_MAX_SLOTS // per_token
    sorted_slots = ("slots", "slots" if general else None)
    for tokens in [*range(1, fits + 3), most - 1, most, most + 1, 2 * most, cpu_most,
                   cpu_most + 1, 10**9]:
        slots = tokens * per_token
        small = "dense" if experts <= DENSE_SLOT_FACTOR * slots else "gather"
        cpu = (small if slots <= GATHER_MAX_SLOTS else sorted_slots if tokens <= cpu_most
               else None)
        cuda = small if slots <= GATHER_MAX_SLOTS else "dense" if tokens <= most else None
        args = (tokens, per_token, experts, rank, hidden)
        if not general:
            assert inference_plan(*args) == cpu, tokens
        assert inference_plan(*args, "cpu", general=general) == cpu, tokens
        assert inference_plan(*args, "cuda", general=general) == cuda, tokens
        assert inference_plan(*args, "mps", general=general) == (
            small if slots <= GATHER_MAX_SLOTS else None), tokens
    assert most * per_token > GATHER_MAX_SLOTS  # the CUDA bound is reached above


def test_layer_asks_the_inference_rule_with_its_own_sizes_and_device(monkeypatch):
    """The layer passes the rule its call's tokens, its slots per token, experts, rank,
    hidden size, whether it has general experts (from the config, not the layer) and its
    input's device type."""
    seen = []
    real = plans_mod.inference_plan

    def spy(tokens, per_token, experts, rank, hidden, device_type, *, general):  # no defaults
        seen.append((tokens, per_token, experts, rank, hidden, device_type, general))
        return real(tokens, per_token, experts, rank, hidden, device_type, general=general)

    import moce_plugin.model.layer as layer_mod

    monkeypatch.setattr(layer_mod, "inference_plan", spy)
    for kwargs in (dict(top_k=2, groups=3, experts=4, general=2, general_top_k=1),
                   dict(top_k="soft", groups=2, experts=3)):
        seen.clear()
        layer = make_experts(**kwargs).eval()
        x, h, g, valid, _ = _inputs(3, kwargs["groups"])
        with torch.no_grad():
            layer(x, h, g, valid)
        rank = make_config(**kwargs).adapter_dim
        assert seen == [(3, config_slots(kwargs), config_experts(kwargs), rank, D, "cpu",
                         bool(kwargs.get("general")))]


def test_dense_plan_follows_in_place_weight_changes():
    """The dense plan keeps a copy of ``down`` in another layout between calls: an in-place
    change (an optimizer step, ``load_state_dict``) or a new tensor must be
    seen in the next call, never the stale copy."""
    layer = make_experts(top_k=2).eval()
    layer.plan = "dense"
    x, h, g, valid, _ = _inputs(4, 3)

    def both():
        with torch.no_grad():
            layer.plan = "dense"
            got, _ = layer(x, h, g, valid)
            layer.plan = "eager"
            want, _ = layer(x, h, g, valid)
        return got, want

    first, _ = both()
    with torch.no_grad():
        layer.down.mul_(2.0)  # in place: same storage, new version
    got, want = both()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, first)
    other = make_experts(top_k=2, seed=7)
    layer.load_state_dict(other.state_dict())
    got, want = both()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    layer.down = torch.nn.Parameter(layer.down.detach() + 1.0)  # a new tensor
    got, want = both()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cluster_ids_are_resolved_again_when_they_change():
    """The per-forward id cache is keyed on the tensor, its version, the shape and device: an
    in-place edit or another tensor of the same values is never served stale ids."""
    cfg = MoCEConfig(num_clusters=3, experts_per_group=2, top_k=1, adapter_dim=8)
    mlp = MoCEMLP(torch.nn.Linear(32, 32), 32, cfg, 0).eval()
    with torch.no_grad():
        mlp.moce_experts.up.normal_(generator=torch.Generator().manual_seed(0))
    hs = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))

    def fresh(values):
        with cluster_ids_context(torch.tensor(values)), torch.no_grad():
            collector_stack().append([])
            try:
                return mlp(hs)
            finally:
                collector_stack().pop()

    ids = torch.tensor([0, 1])
    with cluster_ids_context(ids), torch.no_grad():
        first = mlp(hs)
        ids[1] = 2  # in place: same object, new version
        edited = mlp(hs)
        shorter = mlp(hs[:, :1])  # same ids, another shape
    torch.testing.assert_close(first, fresh([0, 1]))
    torch.testing.assert_close(edited, fresh([0, 2]))
    assert not torch.allclose(first, edited)
    torch.testing.assert_close(shorter, fresh([0, 2])[:, :1])


DECODE_ROUTINGS = [
    pytest.param(dict(top_k=1), id="top1"),
    pytest.param(dict(top_k=2), id="top2"),
    pytest.param(dict(top_k="soft"), id="soft"),
    pytest.param(dict(top_k=2, num_general_experts=2, general_top_k=1), id="V-top2-gen1"),
    pytest.param(dict(top_k="soft", num_general_experts=2), id="V-soft"),
    pytest.param(dict(top_k=2, router="acmoe"), id="top2-acmoe"),
]


def _decode_model(kwargs: dict):
    cfg = MoCEConfig(num_clusters=3, experts_per_group=4, adapter_dim=8, **kwargs)
    model = upcycle_model(tiny_causal_lm("llama"), cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, module in moce_experts_modules(model):
            module.up.normal_(0, 0.5, generator=gen)
            if isinstance(module.router, ACMoERouter):  # as after training
                module.router.seen.fill_(1.0)
                module.router.dispersion.uniform_(0.5, 1.5, generator=gen)
    return model


@pytest.mark.parametrize("per_token", [False, True], ids=["per-seq", "per-token"])
@pytest.mark.parametrize("kwargs", DECODE_ROUTINGS)
def test_decode_with_kv_cache_equals_full_eager_recomputation(kwargs, per_token):
    """Greedy decoding (the layer's own choice at each step: gather plan at decode) equals
    recomputing the whole sequence at every step with the eager plan, for left-padded
    prompts of different lengths with per-sequence or per-token cluster ids."""
    model = _decode_model(kwargs)
    steps, pad = 4, 0
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 128, (3, 7), generator=gen)
    mask = torch.ones_like(prompt)
    prompt[0, :3], mask[0, :3] = pad, 0  # left padding
    prompt[2, :1], mask[2, :1] = pad, 0
    clusters = torch.tensor([0, 2, 1])
    ids = clusters
    if per_token:  # padding positions carry the ignore id
        ids = torch.where(mask.bool(), clusters[:, None], torch.full_like(prompt, -1))
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=mask, moce_cluster_ids=ids,
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             use_cache=True, pad_token_id=pad, output_logits=True,
                             return_dict_in_generate=True)
        for _, module in moce_experts_modules(model):
            module.plan = "eager"
        seq, full_mask = prompt, mask
        for step in range(steps):
            full_ids = ids
            if per_token:  # generated tokens continue their sequence's cluster
                full_ids = torch.cat([ids, clusters[:, None].expand(-1, step)], 1)
            logits = model(input_ids=seq, attention_mask=full_mask, moce_cluster_ids=full_ids,
                           use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=1e-4, rtol=1e-4)
            logits[:, model.config.eos_token_id] = -torch.inf  # what min_new_tokens does
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
    assert torch.equal(out.sequences, seq)


def test_generation_under_inference_mode_equals_no_grad():
    """`torch.inference_mode()` (vLLM's forwards, many serving loops) makes the cluster ids
    inference tensors, which have no version counter: generation must work there and give
    what it gives under `no_grad`."""
    cfg = MoCEConfig(num_clusters=3, experts_per_group=2, top_k=2, adapter_dim=8)
    model = upcycle_model(tiny_causal_lm("llama"), cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("moce_experts.up"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, moce_cluster_ids=torch.tensor([0, 2]), **kwargs)
    with torch.inference_mode():
        got = model.generate(ids, moce_cluster_ids=torch.tensor([0, 2]), **kwargs)
    assert torch.equal(got, want)
