"""The routed adapter kernels (`moce_plugin.model.expert_ops`) against plain autograd."""

from __future__ import annotations

import pytest
import torch

from moce_plugin.model import expert_ops
from moce_plugin.model.expert_ops import (
    block_adapter_sum,
    grouped_matmul,
    grouped_weight_grad,
    routed_adapter_sum,
)


def reference(h, expert_ids, weights, down, up, act):
    """Token by token, slot by slot; autograd does the backward."""
    rows = []
    for t in range(h.shape[0]):
        acc = torch.zeros_like(h[t])
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            acc = acc + weights[t, j] * (act(h[t] @ down[e]) @ up[e])
        rows.append(acc)
    return torch.stack(rows)


def make_inputs(T=23, d=16, r=8, n=6, k=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=gen, dtype=dtype)
    # expert 1 never chosen: an empty group in the middle
    choices = torch.tensor([0, 2, 3, 4, 5])
    expert_ids = choices[torch.randint(0, len(choices), (T, k), generator=gen)]
    weights = torch.rand(T, k, generator=gen, dtype=dtype)
    down = torch.randn(n, d, r, generator=gen, dtype=dtype) / d**0.5
    up = torch.randn(n, r, d, generator=gen, dtype=dtype) / r**0.5
    return h, expert_ids, weights, down, up


def _grads(fn, h, expert_ids, weights, down, up, act):
    leaves = [t.clone().requires_grad_(True) for t in (h, weights, down, up)]
    out = fn(leaves[0], expert_ids, leaves[1], leaves[2], leaves[3], act)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * g).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("d,force_split", [(16, False), (16, True), (6, False)],
                         ids=["grouped", "split-forced", "split-unaligned"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("act", [torch.sigmoid, torch.nn.functional.gelu], ids=["sigmoid", "gelu"])
def test_matches_autograd_reference(d, force_split, k, act, monkeypatch):
    if force_split:
        monkeypatch.setattr(expert_ops, "grouped_mm_supported", lambda a, b, cols=None: False)
    inputs = make_inputs(d=d, k=k)
    out, grads = _grads(routed_adapter_sum, *inputs, act)
    ref_out, ref_grads = _grads(reference, *inputs, act)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("h", "weights", "down", "up"), grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    assert grads[2][1].abs().max() == 0 and grads[3][1].abs().max() == 0  # unused expert


def test_gradcheck_float64():
    h, expert_ids, weights, down, up = make_inputs(T=7, d=4, r=3, n=4, k=2, dtype=torch.float64)
    expert_ids = expert_ids % 4

    def fn(h_, w_, down_, up_):
        return routed_adapter_sum(h_, expert_ids, w_, down_, up_, torch.tanh)

    assert torch.autograd.gradcheck(
        fn, tuple(t.requires_grad_(True) for t in (h, weights, down, up))
    )


def test_saves_no_per_slot_copy_of_the_hidden_states():
    """The backward keeps h [T, d] and the bottleneck [T*k, r], not [T*k, d] tensors."""
    T, d, r, k = 64, 128, 8, 2
    h, expert_ids, weights, down, up = make_inputs(T=T, d=d, r=r, k=k)
    h.requires_grad_(True)
    weights.requires_grad_(True)
    params = {id(down), id(up)}
    down.requires_grad_(True)
    up.requires_grad_(True)
    saved = []

    def pack(t):
        if id(t) not in params:
            saved.append(t.numel() * t.element_size() if t.is_floating_point() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        routed_adapter_sum(h, expert_ids, weights, down, up, torch.sigmoid)
    per_slot_row = k * T * d * h.element_size()
    assert sum(saved) < per_slot_row, (sum(saved), per_slot_row)


def test_grouped_weight_grad_split_matches_grouped():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    offsets = counts.cumsum(0).to(torch.int32)
    a = torch.randn(10, 8, generator=gen)
    b = torch.randn(10, 4, generator=gen)
    want = torch.stack([a[0:3].T @ b[0:3], torch.zeros(8, 4), a[3:8].T @ b[3:8],
                        a[8:10].T @ b[8:10]])
    torch.testing.assert_close(grouped_weight_grad(a, b, offsets, counts, False), want)
    torch.testing.assert_close(grouped_weight_grad(a, b, offsets, counts, True), want)
    torch.testing.assert_close(grouped_matmul(a, want, offsets, counts, False),
                               grouped_matmul(a, want, offsets, counts, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traces_under_torch_compile(dtype):
    """Dynamo + AOT autograd trace the custom functions (aot_eager: no C++ toolchain needed)."""
    torch._dynamo.reset()
    inputs = make_inputs(T=32, d=16, r=8, k=2, dtype=dtype)
    compiled = torch.compile(routed_adapter_sum, backend="aot_eager", fullgraph=False)
    out, grads = _grads(compiled, *inputs, torch.sigmoid)
    ref_out, ref_grads = _grads(routed_adapter_sum, *inputs, torch.sigmoid)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


# ---- block_adapter_sum: the B experts of a token's set as one rank-B*r adapter ------------
def block_reference(h, sets, weights, down, up, act, members, shared=None):
    """Token t uses the experts of its set, members[sets[t]], then the shared ones, as its
    slots: the slot-by-slot reference above, straight from the experts."""
    expert_ids = members[0].expand(h.shape[0], -1) if sets is None else members[sets]
    if shared is not None:
        expert_ids = torch.cat([expert_ids, shared.expand(h.shape[0], -1)], 1)
    return reference(h, expert_ids, weights, down, up, act)


def make_block_inputs(T=23, d=16, r=8, groups=3, blocks=3, dtype=torch.float32, seed=0,
                      shared=0):
    """``groups`` sets of ``blocks`` experts each, drawn from groups*blocks + 2 experts so
    that sets share experts (gradients summed over sets) and one expert is in no set;
    ``shared`` more experts used by every token (the general experts of (V))."""
    gen = torch.Generator().manual_seed(seed)
    experts = groups * blocks + 2 + shared
    h = torch.randn(T, d, generator=gen, dtype=dtype)
    # set 1 gets no token: an empty set in the middle
    set_ids = torch.tensor([0, 2])[torch.randint(0, 2, (T,), generator=gen)]
    weights = torch.rand(T, blocks + shared, generator=gen, dtype=dtype)
    weights[0, blocks - 1] = 0.0  # a zero weight (unchosen expert) must still give exact grads
    down = torch.randn(experts, d, r, generator=gen, dtype=dtype) / d**0.5
    up = torch.randn(experts, r, d, generator=gen, dtype=dtype) / r**0.5
    order = torch.randperm(experts - 1, generator=gen)
    members = order[: groups * blocks].view(groups, blocks)
    if groups > 2:
        members[2, 0] = members[0, -1]  # an expert in two sets, at different block positions
    shared_ids = order[groups * blocks: groups * blocks + shared].flip(0) if shared else None
    return h, (set_ids if groups > 1 else None), weights, down, up, members, shared_ids


def _block_grads(fn, h, sets, weights, down, up, members, shared, act):
    leaves = [t.clone().requires_grad_(True) for t in (h, weights, down, up)]
    out = fn(leaves[0], sets, leaves[1], leaves[2], leaves[3], act, members, shared)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * g).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("d,force_split", [(16, False), (16, True), (6, False)],
                         ids=["grouped", "split-forced", "split-unaligned"])
@pytest.mark.parametrize("groups,blocks", [(3, 3), (3, 1), (1, 4)], ids=["C3B3", "C3B1", "C1B4"])
@pytest.mark.parametrize("act", [torch.sigmoid, torch.nn.functional.gelu], ids=["sigmoid", "gelu"])
@pytest.mark.parametrize("shared", [0, 2], ids=["", "shared2"])
def test_block_sum_matches_autograd_reference(d, force_split, groups, blocks, act, shared,
                                              monkeypatch):
    if force_split:
        monkeypatch.setattr(expert_ops, "grouped_mm_supported", lambda a, b, cols=None: False)
    inputs = make_block_inputs(d=d, groups=groups, blocks=blocks, shared=shared)
    out, grads = _block_grads(block_adapter_sum, *inputs, act)
    ref_out, ref_grads = _block_grads(block_reference, *inputs, act)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("h", "weights", "down", "up"), grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    members, shared_ids = inputs[-2:]
    used = set(members[0].tolist()) | (set(members[2].tolist()) if groups > 1 else set())
    used |= set(shared_ids.tolist()) if shared else set()
    for e in range(inputs[3].shape[0]):  # experts of the empty set or of none: exactly zero
        if e not in used:
            assert grads[2][e].abs().max() == 0 and grads[3][e].abs().max() == 0


@pytest.mark.parametrize("groups", [3, 1])
@pytest.mark.parametrize("shared", [0, 2])
def test_block_sum_gradcheck_float64(groups, shared):
    h, set_ids, weights, down, up, members, shared_ids = make_block_inputs(
        T=7, d=4, r=3, groups=groups, blocks=2, dtype=torch.float64, shared=shared)
    if set_ids is not None:
        set_ids = torch.tensor([0, 2, 1, 0, 2, 2, 0])

    def fn(h_, w_, down_, up_):
        return block_adapter_sum(h_, set_ids, w_, down_, up_, torch.tanh, members, shared_ids)

    assert torch.autograd.gradcheck(
        fn, tuple(t.requires_grad_(True) for t in (h, weights, down, up))
    )


@pytest.mark.parametrize("shared", [0, 2])
def test_block_sum_saves_h_and_the_bottleneck_only(shared):
    """Saved activations: one [T, d] copy of h and the [T, B*r] bottleneck (+ [T, B] weights
    and indices), what routed_adapter_sum saves for B slots per token; never [T, d] outputs.
    Shared experts count as G more blocks."""
    T, d, r, B = 64, 128, 8, 4
    h, sets, weights, down, up, members, shared_ids = make_block_inputs(
        T=T, d=d, r=r, groups=3, blocks=B, shared=shared)
    params = {id(down), id(up)}
    for t in (h, weights, down, up):
        t.requires_grad_(True)
    saved = {}

    def pack(t):
        if id(t) not in params and t.is_floating_point():
            saved[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block_adapter_sum(h, sets, weights, down, up, torch.sigmoid, members, shared_ids)
    size, B = h.element_size(), B + shared
    assert sum(saved.values()) <= (T * d + T * B * r + T * B) * size, sum(saved.values())
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sum_traces_under_torch_compile(dtype):
    torch._dynamo.reset()
    inputs = make_block_inputs(T=32, d=16, r=8, dtype=dtype, shared=2)
    compiled = torch.compile(block_adapter_sum, backend="aot_eager", fullgraph=False)
    out, grads = _block_grads(compiled, *inputs, torch.sigmoid)
    ref_out, ref_grads = _block_grads(block_adapter_sum, *inputs, torch.sigmoid)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)
