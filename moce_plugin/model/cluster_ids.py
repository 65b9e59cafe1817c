"""Cluster ids: their names, and the ONE check every path runs on them (dtype, shape, range).

A cluster id says which expert group a sequence (``[B]``) or token (``[B, S]``) uses. They
come from a dataset column (:mod:`moce_plugin.integration.datasets`), a forward/generate
call (the backbone hook, an export's classes in :mod:`moce_plugin.outputs.hf_native`), the
Python API or the command line (:mod:`moce_plugin.outputs.load`, ``generate``); each of
those calls :func:`check_cluster_ids`, so a bad id raises the same error type
(:class:`~moce_plugin.errors.InvalidClusterIdsError`) and message shape everywhere, with the
fix of the path that noticed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InvalidClusterIdsError

CLUSTER_IDS_KWARG = "moce_cluster_ids"
# Token-level id of positions that are not real tokens (padding, packing gaps).
IGNORE_CLUSTER_ID = -1


def single_group_ids(num_groups: int, rows: int) -> list[int] | None:
    """One group is PESC-style MoE without clustering: every row is cluster 0, with nothing to
    assign or look up. ``None`` when there are several groups (the ids must come from
    somewhere)."""
    return [0] * rows if num_groups == 1 else None


def _first_non_integer(values: Sequence[Any]) -> tuple[int, Any, str] | None:
    """(row, value, why) of the first value that is not an integer, or None.

    A float column is refused even when integral, but a non-integral float is named before
    the first integral one: one ``1.5`` makes ``datasets`` store the whole column as float64,
    and row 0's ``0.0`` is not the value to fix."""

    def non_integral(v: Any) -> bool:
        if isinstance(v, (float, np.floating)):
            return not float(v).is_integer()
        return isinstance(v, bool) or not isinstance(v, (int, np.integer))

    hit = next(((i, v) for i, v in enumerate(values) if non_integral(v)), None)
    if hit is not None:
        return (*hit, "")
    hit = next(((i, v) for i, v in enumerate(values) if isinstance(v, (float, np.floating))),
               None)
    return None if hit is None else (*hit, ": the values are stored as floats")


def _position(index: Sequence[int]) -> str:
    return f"row {index[0]}" if len(index) == 1 else f"row {index[0]}, token {index[1]}"


def _check_shape(ids: torch.Tensor, batch_shape: Sequence[int], what: str, where: str,
                 fix: str) -> None:
    """``batch_shape`` of one dimension: exactly that; ``[B, S]``: ids per sequence ``[B]``
    or per token ``[B, S']`` with ``S' >= S`` (generation with a KV cache passes the
    prompt's ids while each later step sees only the newest positions)."""

    def refuse(detail: str) -> InvalidClusterIdsError:
        return InvalidClusterIdsError(f"{where}{what} {detail}{fix}")

    shape, expected = tuple(ids.shape), tuple(batch_shape)
    if len(expected) == 1:
        if shape != expected:
            raise refuse(f"has shape {shape}, expected {expected}")
        return
    bsz, seq = expected[0], expected[1]
    if ids.dim() not in (1, 2):
        raise refuse(f"has shape {shape}: pass one id per sequence [B] or per token [B, S]")
    if ids.dim() == 1 and shape[0] != bsz:
        raise refuse(f"has {shape[0]} per-sequence ids for a batch of {bsz}")
    if shape[0] != bsz:
        raise refuse(f"has batch size {shape[0]}, the hidden states {bsz}")
    if ids.dim() == 2 and shape[1] < seq:
        raise refuse(f"covers {shape[1]} positions but the sequence has {seq}")


def _check_range(ids: torch.Tensor, num_groups: int, allow_ignore: bool, what: str,
                 where: str, fix: str) -> None:
    bad = (ids < 0) | (ids >= num_groups)
    if allow_ignore:
        bad &= ids != IGNORE_CLUSTER_ID
    if ids.device.type != "cpu" or torch.compiler.is_compiling():
        # No host sync on accelerators (this runs in every forward); while torch.compile
        # traces (on any device), the graph stays free of the check: dtype and shape were
        # checked above, and the data collator has checked training batches' values.
        if not torch.compiler.is_compiling():
            torch._assert_async(~bad.any(), f"{what} outside [0, {num_groups})")
        return
    if not bool(bad.any()):
        return
    if ids.dim() == 0:
        raise InvalidClusterIdsError(
            f"{where}{what} {int(ids)} is out of range [0, {num_groups}){fix}")
    positions = bad.nonzero()
    first = positions[0].tolist()
    count = positions.shape[0]
    units = ("row" if ids.dim() == 1 else "token") + ("s" if count != 1 else "")
    raise InvalidClusterIdsError(
        f"{where}{count} {units} {'have' if count != 1 else 'has'} {what} outside "
        f"[0, {num_groups}) (first: {_position(first)} = {int(ids[tuple(first)])}){fix}"
    )


def check_cluster_ids(
    ids: Any,
    num_groups: int | None = None,
    *,
    batch_shape: Sequence[int] | None = None,
    allow_ignore: bool = True,
    what: str = CLUSTER_IDS_KWARG,
    where: str = "",
    fix: str = "",
) -> torch.Tensor:
    """``ids`` as an integer tensor, after checking them; raises InvalidClusterIdsError.

    Args:
        ids: a tensor, array, list of ints (e.g. a dataset column) or one int.
        num_groups: when given, every id must be in ``[0, num_groups)`` (on CPU with the
            first bad position named; on accelerators an async device assert, no host sync).
        batch_shape: when given, the shape the ids must fit (see :func:`_check_shape`).
        allow_ignore: accept :data:`IGNORE_CLUSTER_ID` (padding) among the values.
        what: how the message names the ids (``moce_cluster_ids``, ``--cluster``, a column).
        where: message prefix naming the source (``"Dataset 'x': "``).
        fix: the caller's advice, appended to the message (starts with ``". "`` / ``"; "``).
    """
    if not isinstance(ids, (torch.Tensor, np.ndarray)):
        # Python values (a dataset column, a CLI flag, a list): each value's own type is
        # checked, since numpy would turn [0, "2"] into strings and [True, 0] into ints.
        scalar = np.isscalar(ids)
        values = [ids] if scalar else list(ids)
        nested = bool(values) and not np.isscalar(values[0])
        flat = [x for row in values for x in np.asarray(row).reshape(-1).tolist()] if nested \
            else values
        bad = _first_non_integer(flat)
        if bad is not None:
            row, value, why = bad
            hint = f"[0, {num_groups})" if num_groups is not None else "(one per group)"
            raise InvalidClusterIdsError(
                f"{where}row {row} has {what} = {value!r} ({type(value).__name__}){why}; "
                f"cluster ids must be integers in {hint}{fix}"
            )
        try:
            ids = np.asarray(values[0] if scalar else values, dtype=np.int64)
        except ValueError:
            raise InvalidClusterIdsError(
                f"{where}{what} rows have different lengths: pad per-token ids with "
                f"{IGNORE_CLUSTER_ID}{fix}") from None
    if isinstance(ids, np.ndarray) and ids.dtype.kind not in "iu":
        raise InvalidClusterIdsError(
            f"{where}{what} must be integers, got dtype {ids.dtype}{fix}")
    ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InvalidClusterIdsError(f"{where}{what} must be integers, got dtype {ids.dtype}{fix}")
    if batch_shape is not None:
        _check_shape(ids, batch_shape, what, where, fix)
    if num_groups is not None:
        _check_range(ids, num_groups, allow_ignore, what, where, fix)
    return ids
