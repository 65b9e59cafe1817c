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
