"""Routed adapter compute: ``sum_j w[t, j] * up_e(act(down_e(h[t])))`` over each token's slots.

The (token, slot) assignments are sorted by expert and run through grouped matmuls
(``torch._grouped_mm`` where the device/dtype support it, a split loop elsewhere). Two
custom autograd functions keep the backward lean:

- :class:`_GatherGroupedMM` gathers ``h`` into expert order and multiplies by ``down``;
  it saves ``h`` ([T, d]) instead of the gathered copy ([T*k, d]) and re-gathers in the
  backward (a memory-bound copy, cheaper than keeping k copies of the layer's output).
- :class:`_WeightedGroupedMMCombine` scales each slot's bottleneck by its routing weight
  *before* ``up`` (``w * (z @ up) == (w * z) @ up``) and sums each token's k slots; it saves
  only the bottleneck ``z`` ([T*k, r]). The weight gradient ``<g, z @ up>`` is formed as
  ``<g @ up^T, z>``, which the backward computes anyway, so the expert outputs
  ([T*k, d]) are never kept.

The products are the ones autograd forms for ``torch._grouped_mm`` (``grad @ W^T`` for
the input, ``input^T @ grad`` with the same offsets for the weights), with the same
operand layouts, so a device that runs the forward kernel runs the backward too.
Everything stays on the device: no host sync on the grouped path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable


def grouped_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``a`` [A, K] x ``b`` [G, K, N] here."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # Kernels want 16-byte aligned rows on both operands.
    if (a.shape[-1] * a.element_size()) % 16 or (b.shape[-1] * b.element_size()) % 16:
        return False
    if a.dtype != b.dtype:
        return False
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)
    if a.device.type == "cpu" and torch.compiler.is_compiling():
        # The eager CPU kernel takes float32, but its meta (fake-tensor) kernel accepts
        # bfloat16 only, so torch.compile would fail on float32: use the split loop there.
        return a.dtype == torch.bfloat16
    return a.device.type == "cpu" and a.dtype in (torch.float32, torch.bfloat16)


def grouped_matmul(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor,
    use_grouped: bool | None = None,
) -> torch.Tensor:
    """Rows of ``x`` (sorted by group) times their group's ``weight[g]``.

    x: [A, K] sorted so group g owns rows offsets[g-1]:offsets[g]; weight: [G, K, N].
    ``use_grouped=None`` decides from the operands; the split loop is correct everywhere
    (one host sync for the split sizes).
    """
    if use_grouped is None:
        use_grouped = grouped_mm_supported(x, weight)
    if use_grouped:
        return torch._grouped_mm(x, weight, offs=offsets)
    chunks = torch.split(x, counts.tolist())
    return torch.cat([c @ weight[g] for g, c in enumerate(chunks)], dim=0)


def grouped_weight_grad(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor,
    use_grouped: bool,
) -> torch.Tensor:
    """Per-group ``a_g^T @ b_g`` -> [G, K, N] for a: [A, K], b: [A, N] sorted by group."""
    if use_grouped:
        return torch._grouped_mm(a.transpose(-2, -1), b, offs=offsets)
    sizes = counts.tolist()
    return torch.stack([
        ca.transpose(-2, -1) @ cb
        for ca, cb in zip(torch.split(a, sizes), torch.split(b, sizes), strict=True)
    ])


def _sum_slots(rows: torch.Tensor, order: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    """Sorted-slot rows back to (token, slot) order, summed over each token's k slots.

    A permutation copy plus a reduction: no scatter-add (atomic, non-deterministic on CUDA).
    """
    unsorted = torch.empty_like(rows).index_copy_(0, order, rows)
    return unsorted.view(num_tokens, k, rows.shape[-1]).sum(1)


class _GatherGroupedMM(torch.autograd.Function):
    """``h[token_of_slot] @ down[expert]`` for every sorted slot -> [A, r]."""

    @staticmethod
    def forward(ctx, h, down, order, token_of_slot, offsets, counts, k: int, use_grouped: bool):
        h_sorted = h.index_select(0, token_of_slot)
        ctx.save_for_backward(h, down, order, token_of_slot, offsets, counts)
        ctx.k, ctx.use_grouped = k, use_grouped
        return grouped_matmul(h_sorted, down, offsets, counts, use_grouped)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z):
        h, down, order, token_of_slot, offsets, counts = ctx.saved_tensors
        grad_z = grad_z.contiguous()
        grad_h = grad_down = None
        if ctx.needs_input_grad[1]:
            h_sorted = h.index_select(0, token_of_slot)  # re-gathered, not saved
            grad_down = grouped_weight_grad(h_sorted, grad_z, offsets, counts, ctx.use_grouped)
            del h_sorted  # freed before the [T*k, d] input gradient is allocated
        if ctx.needs_input_grad[0]:
            grad_rows = grouped_matmul(grad_z, down.transpose(-2, -1), offsets, counts,
                                       ctx.use_grouped)
            grad_h = _sum_slots(grad_rows, order, h.shape[0], ctx.k)
        return grad_h, grad_down, None, None, None, None, None, None


class _WeightedGroupedMMCombine(torch.autograd.Function):
    """``sum_j w[t, j] * (z[slot] @ up[expert])`` per token t -> [T, d]."""

    @staticmethod
    def forward(ctx, z, weight, up, order, token_of_slot, offsets, counts, k: int,
                use_grouped: bool):
        rows = grouped_matmul(z * weight[:, None], up, offsets, counts, use_grouped)
        ctx.save_for_backward(z, weight, up, token_of_slot, offsets, counts)
        ctx.use_grouped = use_grouped
        return _sum_slots(rows, order, z.shape[0] // k, k)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z, weight, up, token_of_slot, offsets, counts = ctx.saved_tensors
        # Every slot of token t receives t's output gradient.
        grad_rows = grad_out.contiguous().index_select(0, token_of_slot)
        grad_zw = grouped_matmul(grad_rows, up.transpose(-2, -1), offsets, counts,
                                 ctx.use_grouped)
        grad_z = grad_weight = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_zw * weight[:, None]
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_zw * z).sum(-1)
        if ctx.needs_input_grad[2]:
            grad_up = grouped_weight_grad(z * weight[:, None], grad_rows, offsets, counts,
                                          ctx.use_grouped)
        return grad_z, grad_weight, grad_up, None, None, None, None, None, None


def routed_adapter_sum(
    h: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``sum_j weights[t, j] * up_e(act(down_e(h[t])))`` with e = expert_ids[t, j].

    h: [T, d]; expert_ids, weights: [T, k]; down: [N, d, r]; up: [N, r, d] -> [T, d].
    h and weights are cast to the experts' dtype.
    """
    num_tokens, k = expert_ids.shape
    h = h.to(down.dtype)
    flat_ids = expert_ids.reshape(-1)
    sorted_ids, order = torch.sort(flat_ids, stable=True)
    token_of_slot = order // k
    # End offset of each expert's rows, from the sorted ids (static shapes: no bincount,
    # so no graph break under torch.compile and no host sync).
    experts = torch.arange(down.shape[0], device=flat_ids.device)
    ends = torch.searchsorted(sorted_ids, experts, right=True)
    offsets = ends.to(torch.int32)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # only read by the split loop
    slot_weights = weights.to(down.dtype).reshape(-1).index_select(0, order)
    z_pre = _GatherGroupedMM.apply(h, down, order, token_of_slot, offsets, counts, k,
                                   grouped_mm_supported(h, down))
    z = act(z_pre)
    return _WeightedGroupedMMCombine.apply(z, slot_weights, up, order, token_of_slot, offsets,
                                           counts, k, grouped_mm_supported(z, up))


__all__ = ["grouped_matmul", "grouped_mm_supported", "grouped_weight_grad",
           "routed_adapter_sum"]
