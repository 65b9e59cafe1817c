"""Upcycled MoCE MLP: the frozen pretrained FFN plus clustered adapter experts.

For a token x of cluster c, with h = FFN(x) computed once::

    y = h + s * sum_{i in TopK(R_c(x))} w_i * up_i(act(down_i(h)))      (groups)
          + s * sum_{j in TopK(R_gen(x))} v_j * up_j(act(down_j(h)))    ((V) variant)

which is the paper's eq. 5 with PESC adapters A_i(x) = act(W_down_i h) W_up_i + h:
because the top-k weights are renormalised to sum to 1 (and soft-merge weights are a
softmax), sum_i w_i A_i(x) = h + sum_i w_i * adapter_i(h). The general experts of the
(V) variant add their adapter outputs to that; the shared h is counted once.

The router input is the MLP input x; each group has its own linear router, softmax
over that group's experts only. Experts are stored as stacked tensors
``down [N, d, r]`` and ``up [N, r, d]`` (N = C*E group experts, then the general
experts) and run in one grouped matmul over the (token, expert) assignments sorted by
expert (`expert_ops.routed_adapter_sum`): no Python loop over experts and no host
synchronisation on the fast path.
``up`` starts at zero, so an upcycled model reproduces the base model exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .config import MoCEConfig
from .expert_ops import routed_adapter_sum
from .losses import grouped_load_balancing_loss, router_entropy
from .routing import (
    IGNORE_CLUSTER_ID,
    RoutingRecord,
    in_forward,
    previous_record,
    record_routing,
    routing_stats_requested,
    token_cluster_ids,
)


def _route(
    logits: torch.Tensor, top_k: int | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(probs [T, E] float32, chosen experts [T, k], weights [T, k]; chosen is None for soft)."""
    probs = torch.softmax(logits.float(), dim=-1)
    num_experts = probs.shape[-1]
    if top_k == "soft":
        chosen = torch.arange(num_experts, device=probs.device).expand(probs.shape[0], -1)
        return probs, chosen, probs
    weights, chosen = probs.topk(int(top_k), dim=-1)
    if top_k > 1:
        # Renormalised over the chosen k (Mixtral/PESC style), so the k weights sum to 1
        # like the paper's weighted sum of adapters.
        weights = weights / weights.sum(dim=-1, keepdim=True)
    # top-1 keeps the raw probability (Switch Transformer): renormalising would make the
    # weight a constant 1 and cut the router off from the language-modelling gradient.
    return probs, chosen, weights


class MoCEExperts(nn.Module):
    """Routers and stacked adapter experts of one MoCE layer (all trainable)."""

    def __init__(self, hidden_size: int, config: MoCEConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_groups = config.groups
        self.experts_per_group = config.experts_per_group
        self.num_general = config.num_general_experts
        self.top_k = config.top_k
        self.general_top_k = config.resolved_general_top_k
        self.adapter_dim = config.adapter_dim
        self.scaling = config.adapter_scaling
        self.layer_index = layer_index
        self.activation_name = config.adapter_activation
        self.act = nn.Identity() if config.adapter_activation == "identity" else ACT2FN[
            config.adapter_activation
        ]
        num_group_experts = self.num_groups * self.experts_per_group
        total = num_group_experts + self.num_general
        self.router = nn.Parameter(torch.empty(num_group_experts, hidden_size))
        self.general_router = (
            nn.Parameter(torch.empty(self.num_general, hidden_size)) if self.num_general else None
        )
        self.down = nn.Parameter(torch.empty(total, hidden_size, self.adapter_dim))
        self.up = nn.Parameter(torch.empty(total, self.adapter_dim, hidden_size))
        self.router_type = config.router
        if config.router == "acmoe":
            self.acmoe_eps = config.acmoe_eps
            self.acmoe_clamp = config.acmoe_clamp
            self.acmoe_momentum = config.acmoe_momentum
            # Running per-(group, expert) feature dispersions: saved with the weights, used
            # in eval/generation and for clusters too small in a batch.
            self.register_buffer("acmoe_dispersion", torch.zeros(num_group_experts, hidden_size))
            self.register_buffer("acmoe_seen", torch.zeros(num_group_experts))
        self.reset_parameters(seed=config.init_seed + 1000 * layer_index)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def uniform_(t: torch.Tensor, bound: float) -> None:
            t.copy_((torch.rand(t.shape, generator=gen) * 2 - 1) * bound)

        # nn.Linear's default bound (kaiming-uniform, a=sqrt(5)) for routers and down.
        bound = 1.0 / math.sqrt(self.hidden_size)
        uniform_(self.router, bound)
        if self.general_router is not None:
            uniform_(self.general_router, bound)
        uniform_(self.down, bound)
        self.up.zero_()  # exact base-model behaviour at step 0

    @property
    def num_experts_total(self) -> int:
        return self.down.shape[0]

    @torch.no_grad()
    def acmoe_weights(
        self, x: torch.Tensor, clusters: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Feature weights M [C*E, d] from the dispersion of each cluster's tokens (stop-grad).

        Training: this batch's estimate where a cluster has >= 2 real tokens (the running
        estimate elsewhere), which also updates the running estimate; eval: the running one.
        """
        from .acmoe import cluster_mad, feature_weights

        running, seen = self.acmoe_dispersion, self.acmoe_seen
        if self.training or not bool(seen.any()):
            batch, counts = cluster_mad(x, clusters, valid, running.shape[0])
            enough = counts >= 2
            if self.training:
                m = self.acmoe_momentum
                blended = torch.where(seen[:, None] > 0, m * running + (1 - m) * batch, batch)
                running.copy_(torch.where(enough[:, None], blended.to(running.dtype), running))
                seen.add_(enough.to(seen.dtype))
            fallback = torch.where(seen[:, None] > 0, running.float(),
                                   batch[enough].mean(0, keepdim=True) if bool(enough.any())
                                   else torch.ones_like(batch))
            dispersion = torch.where(enough[:, None], batch, fallback)
        else:
            dispersion = running.float()
        return feature_weights(dispersion, self.acmoe_eps, self.acmoe_clamp)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
        prev_top1: torch.Tensor | None = None, recompute: bool = False,
    ) -> tuple[torch.Tensor, RoutingRecord]:
        """x: router input [T, d]; h: FFN output [T, d]; groups/valid: [T]; prev_top1: [T]
        each token's expert (within its group) in the previous MoCE layer (ACMoE only);
        recompute: a gradient-checkpointing replay, which must reuse the forward's ACMoE
        weights instead of updating the running statistics a second time."""
        num_tokens = x.shape[0]
        E = self.experts_per_group
        safe_groups = torch.where(valid, groups, torch.zeros_like(groups))
        route_input = x
        if self.router_type == "acmoe" and prev_top1 is not None:
            from .acmoe import transform

            clusters = safe_groups * E + prev_top1.to(safe_groups.device)
            cached = getattr(self, "_acmoe_forward_weights", None)
            if recompute and cached is not None:
                weights_m = cached
            else:
                weights_m = self.acmoe_weights(x, clusters, valid)
                self._acmoe_forward_weights = weights_m if self.training else None
            route_input = transform(x, weights_m, clusters)
        # Logits of every group's router in one matmul ([T, C*E], C*E is small), then
        # each token keeps its own group's E logits.
        all_logits = F.linear(route_input.to(self.router.dtype), self.router)
        logits = all_logits.view(num_tokens, self.num_groups, E)
        logits = logits.gather(1, safe_groups.view(-1, 1, 1).expand(-1, 1, E)).squeeze(1)
        probs, chosen, weights = _route(logits, self.top_k)
        expert_ids = safe_groups[:, None] * E + chosen
        with_stats = self.training or routing_stats_requested()
        aux = load = tokens = entropy = general_load = None
        if with_stats:
            aux, load, tokens = grouped_load_balancing_loss(
                probs, None if self.top_k == "soft" else chosen, safe_groups, valid,
                self.num_groups,
            )
            entropy = router_entropy(probs, valid)
        if self.general_router is not None:
            g_logits = F.linear(x.to(self.general_router.dtype), self.general_router)
            g_probs, g_chosen, g_weights = _route(g_logits, self.general_top_k)
            if with_stats:
                g_aux, g_load, _ = grouped_load_balancing_loss(
                    g_probs,
                    None if self.general_top_k == "soft" else g_chosen,
                    torch.zeros_like(safe_groups),
                    valid,
                    1,
                )
                aux = aux + g_aux
                general_load = g_load[0]
            expert_ids = torch.cat([expert_ids, self.num_groups * E + g_chosen], dim=1)
            weights = torch.cat([weights, g_weights], dim=1)
        # Padding / packing gaps contribute nothing (and get no gradient).
        weights = weights * valid[:, None].to(weights.dtype)

        delta = self._expert_outputs(h, expert_ids, weights)
        out = h + (self.scaling * delta).to(h.dtype)
        record = RoutingRecord(
            layer_index=self.layer_index,
            aux_loss=aux,
            expert_load=load,
            group_tokens=tokens,
            entropy=entropy,
            general_load=general_load,
            top1=probs.argmax(-1) if self.top_k == "soft" else chosen[:, 0],
        )
        return out, record

    def _expert_outputs(
        self, h: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """sum_j weights[t, j] * adapter_{expert_ids[t, j]}(h[t]) for every token t."""
        return routed_adapter_sum(h, expert_ids, weights, self.down, self.up, self.act)


class MoCEMLP(nn.Module):
    """Drop-in replacement of a decoder MLP: frozen ``base_mlp`` + ``moce_experts``."""

    def __init__(
        self, base_mlp: nn.Module, hidden_size: int, config: MoCEConfig, layer_index: int
    ) -> None:
        super().__init__()
        self.base_mlp = base_mlp
        self.moce_experts = MoCEExperts(hidden_size, config, layer_index)
        self.layer_index = layer_index
        self.num_groups = config.groups
        self.router_type = config.router

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_mlp(hidden_states, *args, **kwargs)
        lead_shape = hidden_states.shape[:-1]
        ids = token_cluster_ids(lead_shape, hidden_states.device).reshape(-1)
        valid = ids != IGNORE_CLUSTER_ID
        prev_top1 = None
        recompute = not in_forward()
        if self.router_type == "acmoe":
            # The previous MoCE layer's assignment in this forward; a gradient-checkpointing
            # recompute (after the forward returned) reuses the one cached then.
            if not recompute:
                prev = previous_record()
                prev_top1 = None if prev is None else prev.top1
                self._acmoe_prev_top1 = prev_top1
            else:
                prev_top1 = getattr(self, "_acmoe_prev_top1", None)
        out, record = self.moce_experts(
            hidden_states.reshape(-1, hidden_states.shape[-1]),
            h.reshape(-1, h.shape[-1]),
            ids,
            valid,
            prev_top1,
            recompute,
        )
        record_routing(record)
        return out.view(*lead_shape, -1)


__all__ = ["MoCEExperts", "MoCEMLP", "RoutingRecord"]
