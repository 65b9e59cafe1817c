"""Per-forward routing context (which cluster each token belongs to) and routing records.

This module holds all of the package's per-thread state: the cluster-id stack, the record
collectors of the running forwards, the records of each backbone's last forward, and named
per-thread values other parts set for a call's duration (:func:`thread_value`).

The cluster ids enter the model as the ``moce_cluster_ids`` keyword of the top-level
forward and travel, like every other HF ``**kwargs`` entry, into each decoder layer's
call. A forward pre-hook on the decoder layer moves them into this thread-local
context for the duration of that layer's call only, where the MoCE MLP reads them.

Why not a global set once per model forward: gradient checkpointing recomputes a
decoder layer during backward, after the model forward has returned and possibly on
another thread (autograd's device threads). Because the ids are part of the decoder
layer's call kwargs, the checkpointed recompute gets them again, and because the
context lives only between the layer's pre- and post-hook on the current thread, it
cannot leak into another forward pass, thread or rank.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# The cluster-id names and errors stay importable from here, beside the context that carries
# the ids.
from ..errors import (  # noqa: F401
    ClusterIdsError,
    InvalidClusterIdsError,
    MissingClusterIdsError,
)
from .cluster_ids import CLUSTER_IDS_KWARG, IGNORE_CLUSTER_ID, check_cluster_ids  # noqa: F401

_state = threading.local()


def _thread_list(name: str) -> list:
    """A list attribute of this thread's routing state, created on first use."""
    value = getattr(_state, name, None)
    if value is None:
        value = []
        setattr(_state, name, value)
    return value


def _stack() -> list[torch.Tensor]:
    return _thread_list("stack")


def push_cluster_ids(cluster_ids: torch.Tensor) -> None:
    _stack().append(cluster_ids)


def pop_cluster_ids() -> None:
    stack = _stack()
    if stack:
        stack.pop()


@contextmanager
def cluster_ids_context(cluster_ids: torch.Tensor) -> Iterator[None]:
    """Make ``cluster_ids`` visible to MoCE layers called directly (tests, custom loops)."""
    push_cluster_ids(cluster_ids)
    try:
        yield
    finally:
        pop_cluster_ids()


def current_cluster_ids() -> torch.Tensor | None:
    stack = _stack()
    return stack[-1] if stack else None


def token_cluster_ids(batch_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Per-token cluster ids of shape ``batch_shape`` (= hidden_states.shape[:-1]).

    Accepts ids per token ``[B, S]`` or per sequence ``[B]`` (broadcast over the
    sequence; this is what generation uses, where S changes at every step).
    """
    ids = current_cluster_ids()
    if ids is None:
        raise MissingClusterIdsError("A MoCE layer ran without cluster ids.")
    # dtype and shape only: the values were checked once per forward by the backbone hook.
    ids = check_cluster_ids(ids, batch_shape=batch_shape).to(device=device, dtype=torch.long)
    if len(batch_shape) == 1:  # already flattened tokens
        return ids
    bsz, seq = batch_shape[0], batch_shape[1]
    if ids.dim() == 1:
        return ids[:, None].expand(bsz, seq)
    # Generation with a KV cache passes the prompt's ids; later steps see only the newest
    # positions, which inherit the sequence's id (the last real one).
    return ids[:, -seq:] if ids.shape[1] > seq else ids


def token_routing_ids(
    batch_shape: torch.Size, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T], real-token mask [T]): :func:`token_cluster_ids` flattened and compared with
    :data:`IGNORE_CLUSTER_ID`, computed once for all MoCE layers of a forward.

    Every layer of one forward sees the same ids tensor and hidden-state shape; in a decode
    step (one token per sequence, dozens of layers) checking, expanding and comparing them
    again in each layer was a visible share of the step. The cached pair is reused only for
    the same tensor object, unmodified (``_version``), shape and device."""
    ids = current_cluster_ids()
    # Inference-mode tensors (vLLM, `torch.inference_mode()` callers) have no version counter
    # to key the cache on: resolved per layer, as under compile.
    if (not isinstance(ids, torch.Tensor) or torch.compiler.is_compiling()
            or ids.is_inference()):
        flat = token_cluster_ids(batch_shape, device).reshape(-1)
        return flat, flat != IGNORE_CLUSTER_ID
    key = (ids._version, tuple(batch_shape), device)
    cached = getattr(_state, "token_ids", None)
    if cached is not None and cached[0] is ids and cached[1] == key:
        return cached[2], cached[3]
    flat = token_cluster_ids(batch_shape, device).reshape(-1)
    valid = flat != IGNORE_CLUSTER_ID
    _state.token_ids = (ids, key, flat, valid)
    return flat, valid


@dataclass
class RoutingRecord:
    """What one MoCE layer saw in one forward: its aux loss (with grad) and stats."""

    layer_index: int
    # The statistics are computed in training and inside routing_stats() only (None
    # otherwise), so inference does not pay for them.
    aux_loss: torch.Tensor | None
    expert_load: torch.Tensor | None  # [C, E] fraction of each group's routing slots
    group_tokens: torch.Tensor | None  # [C]
    entropy: torch.Tensor | None  # scalar
    general_load: torch.Tensor | None = None  # [G]
    top1: torch.Tensor | None = None  # [T] each token's first expert in its group (ACMoE)


def collector_stack() -> list[list[RoutingRecord]]:
    return _thread_list("collectors")


@contextmanager
def routing_stats() -> Iterator[None]:
    """Ask MoCE layers for load/entropy statistics outside training (e.g. usage reports)."""
    _state.stats_depth = getattr(_state, "stats_depth", 0) + 1
    try:
        yield
    finally:
        _state.stats_depth -= 1


def routing_stats_requested() -> bool:
    return getattr(_state, "stats_depth", 0) > 0


def previous_record() -> RoutingRecord | None:
    """The record of the previous MoCE layer in the current forward (None outside one)."""
    stack = collector_stack()
    return stack[-1][-1] if stack and stack[-1] else None


def in_forward() -> bool:
    """True inside a backbone forward; False e.g. during a checkpointing recompute."""
    # len(), not bool(): dynamo before torch 2.13 breaks the graph on bool(list)
    return len(collector_stack()) > 0


def record_routing(record: RoutingRecord) -> None:
    """Called by each MoCE layer; kept only inside a backbone forward (not during the
    gradient-checkpointing recompute, which runs after that forward returned)."""
    stack = collector_stack()
    if stack:
        stack[-1].append(record)


# ---- routing records of the last forward (per thread, per backbone) ---------------------
def _last_records() -> dict[int, list[RoutingRecord]]:
    last = getattr(_state, "last", None)
    if last is None:
        last = _state.last = {}
    return last


def keep_last_records(backbone: nn.Module, records: list[RoutingRecord]) -> None:
    """Called by the backbone's post-hook with the records of the forward that just ended."""
    _last_records()[id(backbone)] = records


def pop_last_records(backbone: nn.Module | None) -> list[RoutingRecord]:
    """Records of ``backbone``'s last forward on this thread (consumed); see
    :func:`~moce_plugin.model.wrappers.pop_last_routing` for a (wrapped) model."""
    if backbone is None:
        return []
    return _last_records().pop(id(backbone), [])


def aux_loss_of(records: list[RoutingRecord]) -> torch.Tensor | None:
    """Load-balancing loss averaged over converted layers."""
    losses = [r.aux_loss for r in records if r.aux_loss is not None]
    if not losses:
        return None
    return torch.stack(losses).mean()


# ---- named per-thread values --------------------------------------------------------------
@contextmanager
def thread_value(name: str, value: object) -> Iterator[None]:
    """Make ``value`` visible to :func:`current_thread_value` on this thread for the block
    (for code called by a library in between, where no argument can carry it)."""
    values = getattr(_state, "values", None)
    if values is None:
        values = _state.values = {}
    previous = values.get(name)
    values[name] = value
    try:
        yield
    finally:
        values[name] = previous


def current_thread_value(name: str) -> object | None:
    return getattr(_state, "values", {}).get(name)
