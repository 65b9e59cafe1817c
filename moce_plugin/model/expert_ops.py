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
Both entry points sort their rows once with :func:`~.dispatch.sort_by_bin` and call the two
functions through :func:`gather_grouped_mm` and :func:`weighted_grouped_mm_combine`
(keyword-only arguments). Everything stays on the device: no host sync on the grouped path;
the split-loop fallback (no grouped kernel for the device/dtype, e.g. CPU under
torch.compile in float32, CUDA in float32) reads the bin sizes on the host, which a split
needs, inside a custom op (``torch.ops.moce.split_grouped_mm``) so that torch.compile
keeps it in the graph.

:func:`block_adapter_sum` runs the same two functions without slots, for tokens that share
a set of experts (soft merging: a group's E experts; top-k: the k chosen ones; (V): plus the
general experts): the set's B adapters are one adapter of rank B*r with block-wise weights,
tokens are sorted by set once (one row per token instead of B), and the combine's weight is
[A, B] instead of [A]. The sets' stacked weights are built from the expert parameters inside
the functions and rebuilt in the backward, never kept between the two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from .dispatch import sort_by_bin


def grouped_mm_supported(a: torch.Tensor, b: torch.Tensor, cols: int | None = None) -> bool:
    """Whether ``torch._grouped_mm`` takes ``a`` [A, K] x ``b`` [G, K, N] here (``cols``: N,
    when ``b`` is stacked into the product's operand later)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # Kernels want 16-byte aligned rows on both operands.
    cols = b.shape[-1] if cols is None else cols
    if (a.shape[-1] * a.element_size()) % 16 or (cols * b.element_size()) % 16:
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


# ---- the split-loop fallback as custom ops --------------------------------------------------
# A split needs the bin sizes on the host (``tolist()``): a data-dependent op that breaks a
# torch.compile graph, once per product. As opaque custom ops with fake kernels (output
# shapes from the operands alone), Dynamo keeps them inside one graph and the sizes are read
# only when the kernel runs (as transformers' ``grouped_mm_fallback``). ``offsets`` [G]: the
# end row of each group (int32, what ``torch._grouped_mm`` takes).
def _group_sizes(offsets: torch.Tensor) -> list[int]:
    ends = offsets.tolist()  # the one host read of the fallback
    return [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]


@torch.library.custom_op("moce::split_grouped_mm", mutates_args=())
def _split_grouped_mm(x: torch.Tensor, weight: torch.Tensor,
                      offsets: torch.Tensor) -> torch.Tensor:
    """Rows offsets[g-1]:offsets[g] of ``x`` [A, K] times ``weight[g]`` [K, N] -> [A, N]."""
    out = x.new_empty(x.shape[0], weight.shape[-1])
    start = 0
    for g, size in enumerate(_group_sizes(offsets)):
        if size:
            torch.mm(x[start:start + size], weight[g], out=out[start:start + size])
        start += size
    return out


@_split_grouped_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[-1])


@torch.library.custom_op("moce::split_grouped_weight_grad", mutates_args=())
def _split_grouped_weight_grad(a: torch.Tensor, b: torch.Tensor,
                               offsets: torch.Tensor) -> torch.Tensor:
    """Per-group ``a_g^T @ b_g`` -> [G, K, N] (a group without rows: zeros)."""
    out = a.new_zeros(offsets.shape[0], a.shape[-1], b.shape[-1])
    start = 0
    for g, size in enumerate(_group_sizes(offsets)):
        if size:
            torch.mm(a[start:start + size].t(), b[start:start + size], out=out[g])
        start += size
    return out


@_split_grouped_weight_grad.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return a.new_empty(offsets.shape[0], a.shape[-1], b.shape[-1])


def _split_grouped_mm_setup(ctx, inputs, output) -> None:
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight, offsets)


def _split_grouped_mm_backward(ctx, grad):
    # The products autograd forms for torch._grouped_mm, through the same two ops.
    x, weight, offsets = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.moce.split_grouped_mm(grad.contiguous(),
                                                 weight.transpose(-2, -1), offsets)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.moce.split_grouped_weight_grad(x, grad.contiguous(), offsets)
    return grad_x, grad_w, None


_split_grouped_mm.register_autograd(_split_grouped_mm_backward,
                                    setup_context=_split_grouped_mm_setup)


def grouped_matmul(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor,
    use_grouped: bool | None = None,
) -> torch.Tensor:
    """Rows of ``x`` (sorted by group) times their group's ``weight[g]``.

    x: [A, K] sorted so group g owns rows offsets[g-1]:offsets[g]; weight: [G, K, N].
    ``use_grouped=None`` decides from the operands; the split loop is correct everywhere
    (one host sync for the split sizes, inside ``torch.ops.moce.split_grouped_mm``).
    ``counts`` is accepted for the callers' symmetry; the sizes come from ``offsets``.
    """
    if weight.shape[0] == 1:  # one group: a plain product, no offsets needed
        return x @ weight[0]
    if use_grouped is None:
        use_grouped = grouped_mm_supported(x, weight)
    if use_grouped:
        return torch._grouped_mm(x, weight, offs=offsets)
    return torch.ops.moce.split_grouped_mm(x, weight, offsets)


def grouped_weight_grad(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor | None, counts: torch.Tensor | None,
    use_grouped: bool,
) -> torch.Tensor:
    """Per-group ``a_g^T @ b_g`` -> [G, K, N] for a: [A, K], b: [A, N] sorted by group.

    ``offsets is None``: one group (all rows)."""
    if offsets is None:
        return (a.transpose(-2, -1) @ b)[None]
    if use_grouped:
        return torch._grouped_mm(a.transpose(-2, -1), b, offs=offsets)
    return torch.ops.moce.split_grouped_weight_grad(a, b, offsets)


def _sum_slots(
    rows: torch.Tensor, inverse: torch.Tensor | None, num_tokens: int, k: int
) -> torch.Tensor:
    """Sorted-slot rows back to token order, summed over each token's k slots.

    ``inverse[t * k + j]``: the sorted row of token t's slot j (the inverse permutation of
    the sort); None: the rows are already in token order (one slot per token). k gathers of
    [T, d] and in-place adds: no scatter-add (atomic, non-deterministic on CUDA) and no
    [T*k, d] temporary (on the CPU an allocation above glibc's 32 MB mmap threshold is
    page-faulted afresh on every call, which cost more than the copy itself).
    """
    if inverse is None:
        return rows
    inverse = inverse.view(num_tokens, k)
    out = rows.index_select(0, inverse[:, 0])
    for j in range(1, k):
        out += rows.index_select(0, inverse[:, j])
    return out


def _scale_blocks(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Row a of ``z`` [A, B*r] with its b-th block of r columns times ``weight[a, b]``;
    ``weight`` [A]: one block (fewer ops for the routed path)."""
    if weight.dim() == 1:
        return z * weight[:, None]
    rows, blocks = weight.shape
    return (z.view(rows, blocks, -1) * weight[:, :, None]).view(z.shape)


def _stack_down(down: torch.Tensor, blocks: torch.Tensor | None) -> torch.Tensor:
    """Experts [N, d, r] -> sets [S, d, B*r]; column block b of set s is expert blocks[s, b].
    ``blocks`` None: ``down`` is already per set.

    Built as the transpose of a row-stacked [S, B*r, d] (a column-major operand, which the
    grouped product takes as it takes ``down.transpose`` in the backward): a gather of
    whole experts (contiguous rows of a 2-D view) from the small transposed parameter
    instead of a strided 4-D copy of the sets, which the CPU profiler showed as the largest
    non-GEMM cost of the set path."""
    if blocks is None:
        return down
    return _stack_up(down.transpose(1, 2).contiguous(), blocks).transpose(1, 2)


def _stack_up(up: torch.Tensor, blocks: torch.Tensor | None) -> torch.Tensor:
    """Experts [N, r, d] -> sets [S, B*r, d] (row block b of set s is expert blocks[s, b])."""
    if blocks is None:
        return up
    sets, width = blocks.shape
    experts, r, d = up.shape
    return up.view(experts, r * d).index_select(0, blocks.reshape(-1)).view(sets, width * r, d)


def _unstack_up_grad(grad: torch.Tensor, blocks: torch.Tensor, experts: int,
                     shared_grad: torch.Tensor | None = None,
                     shared: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of the sets [S, B*r, d] -> of the experts [N, r, d] (summed over sets);
    plus ``shared_grad`` [G*r, d] of the ``shared`` experts [G], if given."""
    sets, width = blocks.shape
    r, d = grad.shape[1] // width, grad.shape[2]
    out = grad.new_zeros(experts, r * d).index_add_(
        0, blocks.reshape(-1), grad.reshape(sets * width, r * d))
    if shared is not None:
        out.index_add_(0, shared, shared_grad.reshape(shared.shape[0], r * d))
    return out.view(experts, r, d)


def _shared_down(down: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """The ``shared`` experts' down weights side by side, [d, G*r] (column block g is expert
    shared[g]): a copy of G experts only, not the transpose of all N that sets need."""
    return down.index_select(0, shared).permute(1, 0, 2).reshape(down.shape[1], -1)


def _split_shared(t: torch.Tensor, shared: torch.Tensor | None,
                  rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Columns of ``t`` [A, (B+G)*r] -> (the sets' [A, B*r], the shared experts' [A, G*r])."""
    if shared is None:
        return t, None
    cut = t.shape[1] - shared.shape[0] * rank
    return t[:, :cut].contiguous(), t[:, cut:]


class _GatherGroupedMM(torch.autograd.Function):
    """``h[token_of_row] @ down[expert]`` for every sorted slot -> [A, r].

    ``inverse``/``token_of_row`` None: no gather (h is already in slot order, one slot
    per token). ``keep_gathered``: save the gathered rows instead of ``h`` and skip the
    re-gather in the backward (for one slot per token, when nothing else keeps ``h``: the
    same bytes, one [T, d] gather less). ``blocks`` [S, B]: ``down`` holds the experts and
    group s is the stack of experts blocks[s] (see :func:`_stack_down`). ``shared`` [G]:
    experts every row uses, as G*r more columns from one plain product (their weights are
    not stacked per group)."""

    @staticmethod
    def forward(ctx, h, down, inverse, token_of_row, offsets, counts, k: int,
                use_grouped: bool, keep_gathered: bool = False, blocks=None, shared=None):
        h_sorted = h if token_of_row is None else h.index_select(0, token_of_row)
        ctx.regather = token_of_row is not None and not keep_gathered
        ctx.num_tokens, ctx.k, ctx.use_grouped = h.shape[0], k, use_grouped
        ctx.save_for_backward(h if ctx.regather else h_sorted, down, inverse, token_of_row,
                              offsets, counts, blocks, shared)
        z = grouped_matmul(h_sorted, _stack_down(down, blocks), offsets, counts, use_grouped)
        if shared is None:
            return z
        return torch.cat([z, h_sorted @ _shared_down(down, shared)], 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z):
        h_saved, down, inverse, token_of_row, offsets, counts, blocks, shared = (
            ctx.saved_tensors)
        grad_z, grad_shared = _split_shared(grad_z.contiguous(), shared, down.shape[-1])
        grad_h = grad_down = None
        if ctx.needs_input_grad[1]:
            h_sorted = h_saved.index_select(0, token_of_row) if ctx.regather else h_saved
            if blocks is None:
                grad_down = grouped_weight_grad(h_sorted, grad_z, offsets, counts,
                                                ctx.use_grouped)
            else:  # formed transposed ([S, B*r, d]): whole experts, no strided copy
                grad_down = _unstack_up_grad(
                    grouped_weight_grad(grad_z, h_sorted, offsets, counts, ctx.use_grouped),
                    blocks, down.shape[0],
                    None if shared is None else grad_shared.transpose(0, 1) @ h_sorted,
                    shared).transpose(1, 2).contiguous()
            del h_sorted  # freed before the [T*k, d] input gradient is allocated
        if ctx.needs_input_grad[0]:
            grad_rows = grouped_matmul(grad_z, _stack_down(down, blocks).transpose(-2, -1),
                                       offsets, counts, ctx.use_grouped)
            if shared is not None:  # accumulated in place by the product: no [T, d] sum
                grad_rows.addmm_(grad_shared, _shared_down(down, shared).t())
            grad_h = _sum_slots(grad_rows, inverse, ctx.num_tokens, ctx.k)
        return grad_h, grad_down, None, None, None, None, None, None, None, None, None


class _WeightedGroupedMMCombine(torch.autograd.Function):
    """``sum_j (w[t, j] (x) 1_r) * z[slot] @ up[expert]`` per token t -> [T, d].

    ``weight`` is [A] (one weight per slot) or [A, B]: the slot's bottleneck is B blocks
    of r columns, block b scaled by ``weight[a, b]`` (B experts merged into one rank-B*r
    adapter). ``blocks`` [S, B]: ``up`` holds the experts (see :func:`_stack_up`).
    ``shared`` [G]: the last G blocks of every row are these experts, one plain product
    accumulated into the grouped one in place."""

    @staticmethod
    def forward(ctx, z, weight, up, inverse, token_of_row, offsets, counts, k: int,
                use_grouped: bool, blocks=None, shared=None):
        zw, zw_shared = _split_shared(_scale_blocks(z, weight), shared, up.shape[1])
        rows = grouped_matmul(zw, _stack_up(up, blocks), offsets, counts, use_grouped)
        if shared is not None:
            rows.addmm_(zw_shared, _stack_up(up, shared[None])[0])
        ctx.save_for_backward(z, weight, up, token_of_row, offsets, counts, blocks, shared)
        ctx.use_grouped = use_grouped
        return _sum_slots(rows, inverse, z.shape[0] // k, k)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z, weight, up, token_of_row, offsets, counts, blocks, shared = ctx.saved_tensors
        # Every slot of token t receives t's output gradient.
        grad_rows = grad_out.contiguous()
        if token_of_row is not None:
            grad_rows = grad_rows.index_select(0, token_of_row)
        grad_zw = grouped_matmul(grad_rows, _stack_up(up, blocks).transpose(-2, -1), offsets,
                                 counts, ctx.use_grouped)
        if shared is not None:
            up_shared = _stack_up(up, shared[None])[0]
            grad_zw = torch.cat([grad_zw, grad_rows @ up_shared.t()], 1)
        grad_z = grad_weight = grad_up = None
        if ctx.needs_input_grad[2]:
            zw, zw_shared = _split_shared(_scale_blocks(z, weight), shared, up.shape[1])
            grad_up = grouped_weight_grad(zw, grad_rows, offsets, counts, ctx.use_grouped)
            if blocks is not None:
                grad_up = _unstack_up_grad(
                    grad_up, blocks, up.shape[0],
                    None if shared is None else zw_shared.t() @ grad_rows, shared)
            del zw, zw_shared
        del grad_rows
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_zw * z).view(*weight.shape, -1).sum(-1)
        if ctx.needs_input_grad[0]:
            grad_z = _scale_blocks(grad_zw, weight)
        return grad_z, grad_weight, grad_up, None, None, None, None, None, None, None, None


def gather_grouped_mm(
    h: torch.Tensor, down: torch.Tensor, *, token_of_row: torch.Tensor | None,
    inverse: torch.Tensor | None, offsets: torch.Tensor | None, counts: torch.Tensor | None,
    slots_per_token: int, use_grouped: bool, keep_gathered: bool = False,
    blocks: torch.Tensor | None = None, shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """:class:`_GatherGroupedMM` with named arguments: ``h[token_of_row] @ down`` per bin.

    token_of_row [A]: the token of each sorted row (None: h is in row order); inverse: the
    sorted row of each (token, slot), what the backward sums the input gradient through;
    offsets/counts: from :func:`~.dispatch.sort_by_bin` (None with one bin)."""
    return _GatherGroupedMM.apply(h, down, inverse, token_of_row, offsets, counts,
                                  slots_per_token, use_grouped, keep_gathered, blocks, shared)


def weighted_grouped_mm_combine(
    z: torch.Tensor, weight: torch.Tensor, up: torch.Tensor, *,
    token_of_row: torch.Tensor | None, inverse: torch.Tensor | None,
    offsets: torch.Tensor | None, counts: torch.Tensor | None, slots_per_token: int,
    use_grouped: bool, blocks: torch.Tensor | None = None, shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """:class:`_WeightedGroupedMMCombine` with named arguments (as :func:`gather_grouped_mm`):
    the weighted ``z @ up`` per bin, summed back to token order -> [T, d]."""
    return _WeightedGroupedMMCombine.apply(z, weight, up, inverse, token_of_row, offsets,
                                           counts, slots_per_token, use_grouped, blocks, shared)


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
    h and weights are cast to the experts' dtype. The bins are the experts: one row per
    (token, slot), flattened token-major.
    """
    k = expert_ids.shape[1]
    h = h.to(down.dtype)
    rows = sort_by_bin(expert_ids.reshape(-1), down.shape[0])
    sorted_rows = dict(token_of_row=rows.order // k if k > 1 else rows.order,
                       inverse=rows.inverse, offsets=rows.offsets, counts=rows.counts,
                       slots_per_token=k)
    slot_weights = weights.to(down.dtype).reshape(-1).index_select(0, rows.order)
    # h is saved (and re-gathered in the backward), not the [T*k, d] gathered rows; a
    # general-expert call beside this one shares that same tensor.
    z = act(gather_grouped_mm(h, down, use_grouped=grouped_mm_supported(h, down),
                              **sorted_rows))
    return weighted_grouped_mm_combine(z, slot_weights, up,
                                       use_grouped=grouped_mm_supported(z, up), **sorted_rows)


def block_adapter_sum(
    h: torch.Tensor,
    sets: torch.Tensor | None,
    weights: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    members: torch.Tensor,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_b weights[t, b] * up_e(act(down_e(h[t])))`` with e = members[sets[t], b],
    b over the set's B members and then the G ``shared`` experts (used by every token).

    Every token of set s uses the same B experts ``members[s]``, so they are one adapter of
    rank B*r whose hidden units are scaled block-wise by the token's weights:
    ``up_s((w (x) 1_r) * act(h down_s))`` with ``down_s = [down_e for e in members[s]]``. No
    per-(token, expert) slot: tokens are sorted by set once and each set is one grouped
    product (a plain product with one set). A zero weight leaves an expert out.

    h: [T, d]; sets: [T] in [0, S), or None with S = 1; weights: [T, B (+ G)];
    down: [N, d, r]; up: [N, r, d] (all experts); members: [S, B] expert ids; shared: [G]
    expert ids or None -> [T, d]. Shared experts (the general experts of (V)) join every
    set's adapter as G more blocks without being stacked into each set: one plain product
    over the sorted rows, accumulated into the grouped one.
    The backward keeps h (its sorted copy) and the [T, B*r] bottleneck, like
    :func:`routed_adapter_sum`; the sets' stacked weights are rebuilt there, not kept.
    """
    num_sets, width = members.shape
    h = h.to(down.dtype)
    weights = weights.to(down.dtype)
    sorted_rows = dict(token_of_row=None, inverse=None, offsets=None, counts=None,
                       slots_per_token=1, blocks=members, shared=shared)
    if num_sets > 1:
        if sets is None:
            raise ValueError("sets is required with more than one set of experts")
        rows = sort_by_bin(sets, num_sets)
        weights = weights.index_select(0, rows.order)
        sorted_rows.update(token_of_row=rows.order, inverse=rows.inverse,
                           offsets=rows.offsets, counts=rows.counts)
    rank = down.shape[-1] * width
    # The sorted copy of h is saved instead of h (same bytes, no re-gather in the backward).
    z = act(gather_grouped_mm(h, down, use_grouped=grouped_mm_supported(h, down, cols=rank),
                              keep_gathered=True, **sorted_rows))
    return weighted_grouped_mm_combine(z, weights, up, use_grouped=grouped_mm_supported(z, up),
                                       **sorted_rows)


__all__ = ["block_adapter_sum", "gather_grouped_mm", "grouped_matmul", "grouped_mm_supported",
           "grouped_weight_grad", "routed_adapter_sum", "weighted_grouped_mm_combine"]
