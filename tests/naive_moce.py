"""Naive reference of a MoCE layer: masked double loop over groups x experts, written
directly from the paper's equations (eq. 5 and Sec. 3.4), for equality tests only.

Every hyper-parameter comes from the :class:`MoCEConfig`; only the weight tensors are
read from the module under test, so a wrong attribute in the layer can't hide here."""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from moce_plugin.model.config import MoCEConfig
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
    config: MoCEConfig, experts: MoCEExperts, x: torch.Tensor, h: torch.Tensor,
    groups: torch.Tensor, valid: torch.Tensor,
) -> torch.Tensor:
    C, E, G = config.groups, config.experts_per_group, config.num_general_experts
    act = (lambda t: t) if config.adapter_activation == "identity" else ACT2FN[
        config.adapter_activation]
    s = config.adapter_scaling
    router = experts.router.weight
    down, up = experts.down, experts.up
    out = h.clone()
    for c in range(C):
        rows = (groups == c) & valid
        logits = x @ router[c * E:(c + 1) * E].T
        w = _weights(torch.softmax(logits.float(), -1), config.top_k)
        for e in range(E):
            i = c * E + e
            adapter = act(h @ down[i]) @ up[i]
            out = out + s * (rows.float() * w[:, e])[:, None] * adapter
    if G:
        g = _weights(torch.softmax((x @ experts.general_router.T).float(), -1),
                     config.resolved_general_top_k)
        for j in range(G):
            i = C * E + j
            adapter = act(h @ down[i]) @ up[i]
            out = out + s * (valid.float() * g[:, j])[:, None] * adapter
    return out


def naive_aux_loss(
    config: MoCEConfig, experts: MoCEExperts, x: torch.Tensor, groups: torch.Tensor,
    valid: torch.Tensor, weighted: bool = True,
) -> torch.Tensor:
    """Switch load-balancing loss written out per group from the paper's Sec. 3.4 setting:
    for group c over its real tokens only, E * sum_i f_i * P_i (f_i: share of the group's
    routing slots on expert i, P_i: mean router probability), averaged over groups weighted
    by their real-token counts (``weighted=False``: a plain mean over the groups); plus the
    general router's loss over all real tokens."""
    C, E, G = config.groups, config.experts_per_group, config.num_general_experts

    def switch(probs: torch.Tensor, top_k: int | str) -> torch.Tensor:
        if top_k == "soft":
            dispatch = probs
        else:
            idx = probs.topk(top_k, dim=-1).indices
            dispatch = torch.zeros_like(probs).scatter(-1, idx, 1.0 / top_k)
        return probs.shape[-1] * (dispatch.mean(0) * probs.mean(0)).sum()

    router = experts.router.weight
    per_group, counts = [], []
    for c in range(C):
        rows = (groups == c) & valid
        if not rows.any():
            continue
        probs = torch.softmax((x[rows] @ router[c * E:(c + 1) * E].T).float(), -1)
        per_group.append(switch(probs, config.top_k))
        counts.append(float(rows.sum()))
    weights = torch.tensor(counts) if weighted else torch.ones(len(counts))
    aux = (torch.stack(per_group) * weights).sum() / weights.sum()
    if G:
        probs = torch.softmax((x[valid] @ experts.general_router.T).float(), -1)
        aux = aux + switch(probs, config.resolved_general_top_k)
    return aux
