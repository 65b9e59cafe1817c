"""The grouped-GEMM fast path on a GPU (bf16 `torch._grouped_mm`); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from bench.reference import naive_moce
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.expert_ops import grouped_mm_supported
from moce_plugin.model.layer import MoCEExperts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("top_k,general", [(1, 0), (2, 0), ("soft", 0), (2, 2), ("soft", 2)])
def test_cuda_bf16_matches_naive(top_k, general):
    torch.manual_seed(0)
    d, T = 256, 2048
    cfg = MoCEConfig(num_clusters=7, experts_per_group=4, top_k=top_k,
                     num_general_experts=general, adapter_dim=64)
    fast = MoCEExperts(d, cfg).cuda().to(torch.bfloat16)
    with torch.no_grad():
        fast.up.normal_(0, 0.05)
    ref = MoCEExperts(d, cfg).cuda().float()
    ref.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    x = torch.randn(T, d, device="cuda")
    h = torch.randn(T, d, device="cuda")
    g = torch.randint(0, 7, (T,), device="cuda")
    valid = torch.rand(T, device="cuda") > 0.1
    assert grouped_mm_supported(h.bfloat16(), fast.down)
    out, _ = fast(x.bfloat16(), h.bfloat16(), g, valid)
    expected = naive_moce(cfg, ref, x.bfloat16().float(), h.bfloat16().float(), g, valid)
    # bf16 router logits can flip near-tied top-k choices; compare the tokens whose choice
    # is clear (margin between the k-th and next probability), in bf16 tolerance.
    clear = _clear_choice(ref, x, g, top_k) & _clear_choice(ref, x, None, top_k)
    assert clear.float().mean() > 0.7
    torch.testing.assert_close(out.float()[clear], expected[clear], atol=0.1, rtol=0.05)
    out.float().pow(2).mean().backward()
    assert fast.up.grad is not None and torch.isfinite(fast.up.grad).all()


@pytest.mark.parametrize("tokens", [8, 2048])
@pytest.mark.parametrize("top_k,general", [(1, 0), (2, 0), ("soft", 0), (2, 2), ("soft", 2)])
def test_cuda_inference_calls_take_dense_within_the_bound_and_match_naive(top_k, general,
                                                                          tokens):
    """Without autograd on CUDA the layer runs dense up to CUDA_DENSE_MAX_WORK (decode
    steps and prefills alike), equal to the naive loop in bf16 tolerance."""
    from moce_plugin.model import plans as plans_mod

    torch.manual_seed(0)
    d = 256
    cfg = MoCEConfig(num_clusters=7, experts_per_group=4, top_k=top_k,
                     num_general_experts=general, adapter_dim=64)
    fast = MoCEExperts(d, cfg).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        fast.up.normal_(0, 0.05)
    ref = MoCEExperts(d, cfg).cuda().float().eval()
    ref.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    x = torch.randn(tokens, d, device="cuda")
    h = torch.randn(tokens, d, device="cuda")
    g = torch.randint(0, 7, (tokens,), device="cuda")
    valid = torch.rand(tokens, device="cuda") > 0.1
    taken = []
    real = plans_mod.expert_outputs

    def spy(experts, plan, *args):
        taken.append(plan)
        return real(experts, plan, *args)

    import moce_plugin.model.layer as layer_mod

    layer_mod.expert_outputs, saved = spy, layer_mod.expert_outputs
    try:
        with torch.no_grad():
            out, _ = fast(x.bfloat16(), h.bfloat16(), g, valid)
    finally:
        layer_mod.expert_outputs = saved
    experts = 7 * 4 + general
    work = tokens * experts * cfg.adapter_dim * d
    gk = cfg.resolved_general_top_k
    per_token = (4 if top_k == "soft" else top_k) + (
        0 if not general else general if gk == "soft" else gk)
    slots = tokens * per_token
    assert work <= plans_mod.CUDA_DENSE_MAX_WORK
    assert taken == ["dense" if slots > plans_mod.GATHER_MAX_SLOTS or experts <= slots
                     else "gather"]
    with torch.no_grad():
        expected = naive_moce(cfg, ref, x.bfloat16().float(), h.bfloat16().float(), g, valid)
    clear = _clear_choice(ref, x, g, top_k) & _clear_choice(ref, x, None, top_k)
    torch.testing.assert_close(out.float()[clear], expected[clear], atol=0.1, rtol=0.05)
    torch.testing.assert_close(out[~valid], h.bfloat16()[~valid])


def _clear_choice(ref, x, groups, top_k, margin=0.02):
    if top_k == "soft":
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    with torch.no_grad():
        if groups is None:
            if ref.general_router is None:
                return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            logits = x @ ref.general_router.T
        else:
            E = ref.experts_per_group
            logits = (x @ ref.router.weight.T).view(x.shape[0], -1, E)
            logits = logits[torch.arange(x.shape[0], device=x.device), groups]
        top = torch.softmax(logits, -1).sort(-1, descending=True).values
        if top_k >= top.shape[-1]:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return (top[:, top_k - 1] - top[:, top_k]) > margin


@pytest.mark.parametrize("k", [1, 2, 4])
def test_cuda_expert_kernels_gradients(k):
    """bf16 grouped kernels (forward and the hand-written backward) vs a float32 split loop."""
    from moce_plugin.model.expert_ops import routed_adapter_sum

    gen = torch.Generator(device="cuda").manual_seed(0)
    T, d, r, n = 1024, 256, 64, 12
    h = torch.randn(T, d, device="cuda", generator=gen)
    ids = torch.randint(0, n - 1, (T, k), device="cuda", generator=gen)  # expert n-1 unused
    w = torch.rand(T, k, device="cuda", generator=gen)
    down = torch.randn(n, d, r, device="cuda", generator=gen) / d**0.5
    up = torch.randn(n, r, d, device="cuda", generator=gen) / r**0.5
    g = torch.randn(T, d, device="cuda", generator=gen)

    def run(dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (h, w, down, up)]
        out = routed_adapter_sum(leaves[0], ids, leaves[1], leaves[2], leaves[3], torch.sigmoid)
        (out.float() * g).sum().backward()
        return [out.float()] + [t.grad.float() for t in leaves]

    assert grouped_mm_supported(h.bfloat16(), down.bfloat16())
    for got, want in zip(run(torch.bfloat16), run(torch.float32), strict=True):
        scale = want.abs().max().clamp_min(1e-6)
        assert ((got - want).abs().max() / scale) < 0.05
