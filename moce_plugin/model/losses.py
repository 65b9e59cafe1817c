"""Load-balancing loss for grouped experts.

Switch-Transformer style (Fedus et al., 2022): for one router over E experts,
``E * sum_i f_i * P_i`` with f_i the fraction of routing slots sent to expert i
(non-differentiable counts) and P_i the mean router probability of expert i
(differentiable). It is 1 when routing is uniform and grows as routing skews.

MoCE has one router per group, each seeing only its cluster's tokens, so the loss is
computed per group over that group's tokens and experts, then averaged over groups
weighted by their token counts. Only real tokens count (``valid``): padding and
packing gaps never enter f or P. No host synchronisation happens here.

The reference implementation used Mixtral's formula on logits that were never
returned, which made the loss a constant with no gradient; ``tests/unit/test_losses.py``
checks this one responds to skew and reaches the routers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dispatch_fractions(
    probs: torch.Tensor, selected: torch.Tensor | None
) -> torch.Tensor:
    """Per-token share of routing slots per expert, ``[T, E]``, rows sum to 1.

    ``selected`` holds the chosen expert indices ``[T, k]``; None means soft merging,
    where every expert is used with its router weight, so the (detached) probabilities
    are the dispatch.
    """
    if selected is None:
        return probs.detach()
    k = selected.shape[-1]
    out = torch.zeros_like(probs)
    return out.scatter_(-1, selected, 1.0 / k)


def grouped_load_balancing_loss(
    probs: torch.Tensor,
    selected: torch.Tensor | None,
    groups: torch.Tensor,
    valid: torch.Tensor,
    num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Switch loss per group, token-weighted mean over groups.

    Args:
        probs: ``[T, E]`` softmax of each token's own group router (float32).
        selected: ``[T, k]`` chosen experts, or None for soft merging.
        groups: ``[T]`` group of each token (any value where not valid).
        valid: ``[T]`` bool, real tokens.
        num_groups: number of groups C.

    Returns:
        (loss scalar, expert load ``[C, E]`` = fraction of each group's slots per expert,
        tokens per group ``[C]``).
    """
    num_experts = probs.shape[-1]
    weight = valid.to(probs.dtype)
    membership = F.one_hot(groups.clamp(0, num_groups - 1), num_groups).to(probs.dtype)
    membership = membership * weight[:, None]  # [T, C]
    tokens = membership.sum(0)  # [C]
    denom = tokens.clamp(min=1.0)[:, None]
    load = membership.T @ dispatch_fractions(probs, selected) / denom  # [C, E]
    mean_prob = membership.T @ probs / denom  # [C, E]
    per_group = num_experts * (load * mean_prob).sum(-1)  # [C]
    loss = (per_group * tokens).sum() / tokens.sum().clamp(min=1.0)
    return loss, load.detach(), tokens.detach()


def router_entropy(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the routing distribution over real tokens (detached)."""
    with torch.no_grad():
        ent = -(probs * probs.clamp_min(1e-9).log()).sum(-1)
        weight = valid.to(ent.dtype)
        return (ent * weight).sum() / weight.sum().clamp(min=1.0)
