"""The grouped-GEMM fast path on a GPU (bf16 `torch._grouped_mm`); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from naive_moce import naive_moce

from moce_plugin.config import MoCEConfig
from moce_plugin.layer import MoCEExperts, _grouped_mm_supported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("top_k,general", [(1, 0), (2, 0), ("soft", 0), (2, 2)])
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
    assert _grouped_mm_supported(h.bfloat16(), fast.down)
    out, _ = fast(x.bfloat16(), h.bfloat16(), g, valid)
    expected = naive_moce(ref, x.bfloat16().float(), h.bfloat16().float(), g, valid)
    # bf16 router logits can flip near-tied top-k choices; compare the tokens whose choice
    # is clear (margin between the k-th and next probability), in bf16 tolerance.
    clear = _clear_choice(ref, x, g, top_k) & _clear_choice(ref, x, None, top_k)
    assert clear.float().mean() > 0.7
    torch.testing.assert_close(out.float()[clear], expected[clear], atol=0.1, rtol=0.05)
    out.float().pow(2).mean().backward()
    assert fast.up.grad is not None and torch.isfinite(fast.up.grad).all()


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
            logits = (x @ ref.router.T).view(x.shape[0], -1, E)
            logits = logits[torch.arange(x.shape[0], device=x.device), groups]
        top = torch.softmax(logits, -1).sort(-1, descending=True).values
        if top_k >= top.shape[-1]:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return (top[:, top_k - 1] - top[:, top_k]) > margin
