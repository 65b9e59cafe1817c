"""The one reference MoCE layer: a Python loop over groups x experts with boolean masks,
written directly from the paper's equations (eq. 5 and Sec. 3.4).

The unit tests compare ``MoCEExperts`` (every plan) with :func:`naive_moce` and
:func:`naive_aux_loss`; ``bench/bench_layer.py`` times :class:`MaskedLoopMLP` as the
reference-code baseline. Both read the same module, so the baseline the benchmark times is
the reference the tests trust.

Every hyper-parameter comes from the :class:`MoCEConfig`; only the weight tensors are read
from the module under test (``router.weight``, ``general_router``, ``down``, ``up``), so a
wrong attribute in the layer can't hide here, and gradients reach that module's parameters.

Two forms of the same maths:

* ``gather=False`` (dense): every expert runs on *every* token and its output is multiplied
  by the group's boolean row mask, C*E adapter evaluations per token;
* ``gather=True`` (the reference code's style): each group's tokens are gathered with a
  boolean mask (a host sync: the result's size depends on the data), routed by that group's
  router, and *every* expert of the group runs on *all* the group's tokens, E adapter
  evaluations per token.

Not used by the plugin. Import it as ``bench.reference`` (the repository root is on the path
for ``python -m bench.<name>`` and, through pyproject's ``pythonpath``, for pytest).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.layer import MoCEExperts


def dense_weights(probs: torch.Tensor, top_k: int | str) -> torch.Tensor:
    """Dense [T, E] routing weights: zeros outside the top-k, renormalised for top-k >= 2."""
    if top_k == "soft":
        return probs
    vals, idx = probs.topk(int(top_k), dim=-1)
    if int(top_k) > 1:
        vals = vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, vals)


def naive_moce(
    config: MoCEConfig, experts: MoCEExperts, x: torch.Tensor, h: torch.Tensor,
    groups: torch.Tensor, valid: torch.Tensor, *, gather: bool = False,
) -> torch.Tensor:
    """x: router input [T, d]; h: FFN output [T, d]; groups/valid: [T] -> h + experts [T, d]."""
    C, E, G = config.groups, config.experts_per_group, config.num_general_experts
    act = (lambda t: t) if config.adapter_activation == "identity" else ACT2FN[
        config.adapter_activation]
    s = config.adapter_scaling
    # One view per expert / group router: a single backward (unbind / split) instead of a
    # full-size gradient per indexed slice, so the timed baseline is not slowed by the view.
    downs, ups = experts.down.unbind(0), experts.up.unbind(0)
    routers = experts.router.weight.split(E)
    out = h.clone()
    for c in range(C):
        rows = (groups == c) & valid
        if gather:
            if not rows.any():  # host sync, as in the reference code
                continue
            x_c, h_c = x[rows], h[rows]
        else:
            x_c, h_c = x, h
        w = dense_weights(torch.softmax((x_c @ routers[c].T).float(), -1), config.top_k)
        if not gather:
            w = w * rows[:, None].to(w.dtype)
        delta = torch.zeros_like(h_c)
        for e in range(E):
            i = c * E + e
            delta = delta + w[:, e:e + 1].to(h.dtype) * (act(h_c @ downs[i]) @ ups[i])
        if gather:
            out[rows] = out[rows] + s * delta
        else:
            out = out + s * delta
    if G:
        g = dense_weights(torch.softmax((x @ experts.general_router.T).float(), -1),
                          config.resolved_general_top_k)
        g = g * valid[:, None].to(g.dtype)
        delta = torch.zeros_like(h)
        for j in range(G):
            i = C * E + j
            delta = delta + g[:, j:j + 1].to(h.dtype) * (act(h @ downs[i]) @ ups[i])
        out = out + s * delta
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


class MaskedLoopMLP(nn.Module):
    """Frozen FFN + the reference experts (the baseline's full MoCE MLP cost), on the
    weights of ``experts`` (the benchmark passes the fast layer's own experts)."""

    def __init__(self, base_mlp: nn.Module, config: MoCEConfig, experts: MoCEExperts,
                 *, gather: bool = True) -> None:
        super().__init__()
        self.base_mlp = base_mlp
        self.config = config
        self.experts = experts
        self.gather = gather

    def forward(self, x: torch.Tensor, groups: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        h = self.base_mlp(x)
        d = x.shape[-1]
        out = naive_moce(self.config, self.experts, x.reshape(-1, d), h.reshape(-1, d),
                         groups.reshape(-1), valid.reshape(-1), gather=self.gather)
        return out.view_as(h)
