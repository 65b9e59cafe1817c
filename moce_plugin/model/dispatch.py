"""The dispatch step every expert plan shares: rows sorted by bin, once.

A *bin* is what one grouped product multiplies by one weight matrix: an expert (the slot
plan: one row per (token, expert) slot) or a set of experts (the block and set plans: one
row per token). Like MegaBlocks' ``indices_and_bins``, :func:`sort_by_bin` returns
everything the grouped products and the way back need, from one stable sort:

- ``order`` [A]: the source row of each sorted row (rows of a bin are contiguous, in
  source order);
- ``inverse`` [A]: the sorted row of each source row (``inverse[order[i]] = i``), which
  gathers the results back to source order without a scatter-add;
- ``offsets`` [B] int32: the end row of each bin, what ``torch._grouped_mm`` takes;
- ``counts`` [B]: the rows of each bin, read only by the split-loop fallback.

Static shapes throughout (``searchsorted`` against ``arange(B)``, no ``bincount`` or
``unique``), so no host synchronisation and no graph break under ``torch.compile``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Dispatch(NamedTuple):
    """Rows sorted by bin: see the module docstring."""

    order: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inverse`` with ``inverse[order[i]] = i``: where each unsorted row went."""
    arange = torch.arange(order.shape[0], device=order.device, dtype=order.dtype)
    return torch.empty_like(order).scatter_(0, order, arange)


def sort_by_bin(bins: torch.Tensor, num_bins: int) -> Dispatch:
    """Sort rows by their bin ``bins`` [A] (values in [0, num_bins)), stably."""
    sorted_bins, order = torch.sort(bins, stable=True)
    ends = torch.searchsorted(sorted_bins, torch.arange(num_bins, device=bins.device),
                              right=True)
    return Dispatch(
        order=order,
        inverse=inverse_permutation(order),
        offsets=ends.to(torch.int32),
        counts=torch.diff(ends, prepend=ends.new_zeros(1)),
    )


__all__ = ["Dispatch", "inverse_permutation", "sort_by_bin"]
