"""Naive reference of a MoCE layer: masked double loop over groups x experts, written
directly from the paper's equations (eq. 5 and Sec. 3.4), for equality tests only."""

from __future__ import annotations

import torch

from moce_plugin.model.layer import MoCEExperts


def _weights(probs: torch.Tensor, top_k: int | str) -> torch.Tensor:
    """Dense [T, E] routing weights: zeros outside the top-k."""
    if top_k == "soft":
        return probs
    vals, idx = probs.topk(top_k, dim=-1)
    if top_k > 1:
        vals = vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, vals)


def naive_moce(
    experts: MoCEExperts, x: torch.Tensor, h: torch.Tensor, groups: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    C, E = experts.num_groups, experts.experts_per_group
    out = h.clone()
    for c in range(C):
        rows = (groups == c) & valid
        logits = x @ experts.router[c * E:(c + 1) * E].T
        w = _weights(torch.softmax(logits.float(), -1), experts.top_k)
        for e in range(E):
            i = c * E + e
            adapter = experts.act(h @ experts.down[i]) @ experts.up[i]
            out = out + experts.scaling * (rows.float() * w[:, e])[:, None] * adapter
    if experts.general_router is not None:
        g = _weights(torch.softmax((x @ experts.general_router.T).float(), -1),
                     experts.general_top_k)
        for j in range(experts.num_general):
            i = C * E + j
            adapter = experts.act(h @ experts.down[i]) @ experts.up[i]
            out = out + experts.scaling * (valid.float() * g[:, j])[:, None] * adapter
    return out
