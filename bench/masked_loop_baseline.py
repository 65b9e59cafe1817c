"""Benchmark baseline only: a MoCE layer in the style of the reference code.

One ``nn.ModuleList`` of routers and one of experts per group, a Python loop over groups
x experts with boolean masks: for each group, the group's tokens are gathered with a
boolean mask (a host sync: the result's size depends on the data), routed by that
group's router, and *every* expert of the group runs on *all* the group's tokens; the
outputs are weighted by a dense ``[T_c, E]`` weight matrix (zeros outside the top-k) and
written back. Same maths as ``moce_plugin.model.layer.MoCEExperts`` (weights can be copied over
with :func:`from_fast`), so the benchmark compares implementations, not models.

``dense=True`` is the even more literal variant (like ``tests/naive_moce.py``): every
expert runs on *every* token and its output is multiplied by the group's boolean row mask,
C*E adapter evaluations per token instead of E.

This file is not used by the plugin; it lives in ``bench/`` for ``bench_layer.py``.
"""

from __future__ import annotations

import torch
from torch import nn


class _Adapter(nn.Module):
    """PESC adapter ``up(act(down(h)))`` as two bias-free linears (reference style)."""

    def __init__(self, d: int, r: int, act: nn.Module) -> None:
        super().__init__()
        self.down = nn.Linear(d, r, bias=False)
        self.up = nn.Linear(r, d, bias=False)
        self.act = act

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


def _dense_weights(probs: torch.Tensor, top_k) -> torch.Tensor:
    if top_k == "soft":
        return probs
    vals, idx = probs.topk(int(top_k), dim=-1)
    if top_k > 1:
        vals = vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, vals)


class MaskedLoopMoCE(nn.Module):
    """Reference-style MoCE experts: loops over groups x experts with boolean masks."""

    def __init__(self, d: int, r: int, groups: int, experts: int, top_k, general: int = 0,
                 general_top_k=None, scaling: float = 1.0, act: nn.Module | None = None,
                 dense: bool = False):
        super().__init__()
        self.dense = dense
        act = act if act is not None else nn.Sigmoid()
        self.C, self.E, self.G = groups, experts, general
        self.top_k = top_k
        self.general_top_k = general_top_k if general_top_k is not None else top_k
        self.scaling = scaling
        self.routers = nn.ModuleList(nn.Linear(d, experts, bias=False) for _ in range(groups))
        self.experts = nn.ModuleList(
            nn.ModuleList(_Adapter(d, r, act) for _ in range(experts)) for _ in range(groups)
        )
        self.general_router = nn.Linear(d, general, bias=False) if general else None
        self.general_experts = nn.ModuleList(_Adapter(d, r, act) for _ in range(general))

    @classmethod
    @torch.no_grad()
    def from_fast(cls, fast, dense: bool = False) -> MaskedLoopMoCE:
        """Same weights as a ``moce_plugin.model.layer.MoCEExperts``."""
        d, r = fast.hidden_size, fast.adapter_dim
        m = cls(d, r, fast.num_groups, fast.experts_per_group, fast.top_k, fast.num_general,
                fast.general_top_k, fast.scaling, fast.act, dense)
        m = m.to(fast.down.dtype).to(fast.down.device)
        E = fast.experts_per_group
        for c in range(fast.num_groups):
            m.routers[c].weight.copy_(fast.router.weight[c * E:(c + 1) * E])
            for e in range(E):
                m.experts[c][e].down.weight.copy_(fast.down[c * E + e].T)
                m.experts[c][e].up.weight.copy_(fast.up[c * E + e].T)
        if fast.num_general:
            m.general_router.weight.copy_(fast.general_router)
            for j in range(fast.num_general):
                i = fast.num_groups * E + j
                m.general_experts[j].down.weight.copy_(fast.down[i].T)
                m.general_experts[j].up.weight.copy_(fast.up[i].T)
        return m

    def forward(self, x: torch.Tensor, h: torch.Tensor, groups: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """x: router input [T, d]; h: FFN output [T, d]; groups/valid: [T] -> [T, d]."""
        out = h.clone()
        for c in range(self.C):
            mask = (groups == c) & valid
            if self.dense:  # every expert on every token, masked by multiplication
                w = _dense_weights(torch.softmax(self.routers[c](x).float(), -1), self.top_k)
                w = w * mask[:, None].to(w.dtype)
                for e in range(self.E):
                    out = out + self.scaling * w[:, e:e + 1].to(h.dtype) * self.experts[c][e](h)
                continue
            if not mask.any():  # host sync, as in the reference
                continue
            x_c, h_c = x[mask], h[mask]
            w = _dense_weights(torch.softmax(self.routers[c](x_c).float(), -1), self.top_k)
            delta = torch.zeros_like(h_c)
            for e in range(self.E):
                delta = delta + w[:, e:e + 1].to(h_c.dtype) * self.experts[c][e](h_c)
            out[mask] = out[mask] + self.scaling * delta
        if self.G:
            w = _dense_weights(torch.softmax(self.general_router(x).float(), -1),
                               self.general_top_k)
            w = w * valid[:, None].to(w.dtype)
            delta = torch.zeros_like(h)
            for j in range(self.G):
                delta = delta + w[:, j:j + 1].to(h.dtype) * self.general_experts[j](h)
            out = out + self.scaling * delta
        return out


class MaskedLoopMLP(nn.Module):
    """Frozen FFN + reference-style experts (the baseline's full MoCE MLP cost)."""

    def __init__(self, base_mlp: nn.Module, experts: MaskedLoopMoCE) -> None:
        super().__init__()
        self.base_mlp = base_mlp
        self.experts = experts

    def forward(self, x: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor):
        h = self.base_mlp(x)
        d = x.shape[-1]
        out = self.experts(x.reshape(-1, d), h.reshape(-1, d), groups.reshape(-1),
                           valid.reshape(-1))
        return out.view_as(h)
