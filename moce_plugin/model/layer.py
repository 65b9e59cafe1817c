"""Upcycled MoCE MLP: the frozen pretrained FFN plus clustered adapter experts.

For a token x of cluster c, with h = FFN(x) computed once::

    y = h + s * sum_{i in TopK(R_c(x))} w_i * up_i(act(down_i(h)))      (groups)
          + s * sum_{j in TopK(R_gen(x))} v_j * up_j(act(down_j(h)))    ((V) variant)

which is the paper's eq. 5 with PESC adapters A_i(x) = act(W_down_i h) W_up_i + h:
because the top-k weights are renormalised to sum to 1 (and soft-merge weights are a
softmax), sum_i w_i A_i(x) = h + sum_i w_i * adapter_i(h). The general experts of the
(V) variant add their adapter outputs to that; the shared h is counted once.

The router input is the MLP input x; each group has its own router (`routers.py`),
softmax over that group's experts only. Experts are stored as stacked tensors
``down [N, d, r]`` and ``up [N, r, d]`` (N = C*E group experts, then the general
experts). Tokens that use the same set of experts (soft merging: the E of their group;
top-k: the k chosen ones; (V): plus the general experts) run that set as one adapter of
rank B*r with block-wise weights, tokens sorted by set (`expert_ops.block_adapter_sum`);
with many possible sets (large E, few tokens) the (token, expert) assignments are sorted
by expert instead (`expert_ops.routed_adapter_sum`). `choose_plan` picks, by measurement.
No Python loop over experts and no host synchronisation on the fast path.
``up`` starts at zero, so an upcycled model reproduces the base model exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .config import MoCEConfig
from .expert_ops import block_adapter_sum, routed_adapter_sum
from .losses import grouped_load_balancing_loss, router_entropy
from .routers import build_router
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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(probs [T, E] float32, chosen experts [T, k] or None for soft, weights [T, k]).

    Soft merging uses every expert with its probability: weights = probs, chosen None.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if top_k == "soft":
        return probs, None, probs
    weights, chosen = probs.topk(int(top_k), dim=-1)
    if top_k > 1:
        # Renormalised over the chosen k (Mixtral/PESC style), so the k weights sum to 1
        # like the paper's weighted sum of adapters.
        weights = weights / weights.sum(dim=-1, keepdim=True)
    # top-1 keeps the raw probability (Switch Transformer): renormalising would make the
    # weight a constant 1 and cut the router off from the language-modelling gradient.
    return probs, chosen, weights


def _dense_weights(probs: torch.Tensor, chosen: torch.Tensor | None,
                   weights: torch.Tensor) -> torch.Tensor:
    """[T, E] weight of every expert: the routing weights at the chosen ones, 0 elsewhere."""
    if chosen is None:
        return weights
    return torch.zeros_like(probs).scatter(-1, chosen, weights)


# How the experts run ("slots": (token, expert) slots through routed_adapter_sum; "blocks":
# all E experts of a group as one rank-E*r adapter, unchosen ones at weight 0; "sets": the k
# chosen experts of a group as one rank-k*r adapter, tokens sorted by (group, chosen set);
# general experts as "slots" in the same routed call, as a separate dense "blocks" call, or
# "fold"ed into the group call as G shared blocks of every set). Chosen by measurement
# (bench/bench_expert_plans.py, docs/performance.md), not a user option; every plan computes
# the same function.
GROUP_PLANS = ("slots", "blocks", "sets")
GENERAL_PLANS = ("slots", "blocks", "fold")


def plan_is_valid(plan: tuple[str, str | None]) -> bool:
    """Folding needs a block or set call to fold into."""
    return plan[1] != "fold" or plan[0] in ("blocks", "sets")


def choose_plan(top_k: int | str, experts: int, general_top_k: int | str, general: int,
                groups: int = 1, tokens: int = 0, rank: int = 64) -> tuple[str, str | None]:
    """(group plan, general plan or None) for a routing mode and a call of ``tokens`` rows
    (0: unknown, taken as large); the measurements behind it are in docs/performance.md."""
    if top_k == "soft" or top_k == experts:
        return "blocks", ("fold" if general else None)
    k = int(top_k)
    # Sets replace the k gathers and [k*T, d] rows of the slot path by the sets' stacked
    # weights ([S, d, k*r], built in the forward and again in the backward): worth it while
    # those are no larger than the rows they replace, S*k*r <= k*T. Top-1 has nothing to
    # gain (one slot per token already; measured equal).
    use_sets = k > 1 and (not tokens or groups * math.comb(experts, k) * rank <= tokens)
    group = "sets" if use_sets else "slots"
    if not general:
        return group, None
    dense = general_top_k == "soft" or general_top_k == general
    # A dense call for the general experts (unchosen ones at weight 0) beats their slots
    # unless it would do more than twice their work or the group's slots are few (top-1:
    # the general slots ride along in the same routed call).
    gk = general if general_top_k == "soft" else int(general_top_k)
    if not (dense or (general <= 2 * gk and k > 1)):
        return group, "slots"
    # Beside sets, the general experts are folded into the set call as shared blocks (one
    # plain product over the sorted rows, accumulated into the grouped one): no separate
    # call's [T, d] output, sum and input gradient. Measured faster than a separate dense
    # call at every size where sets are taken (docs/performance.md).
    return group, ("fold" if use_sets else "blocks")


def _chosen_sets(
    chosen: torch.Tensor, weights: torch.Tensor, experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's chosen k experts as a set: (set index [T] in [0, P), weights [T, k] in
    the set's expert order, members [P, k]: the experts of every k-subset of range(experts)).

    k = 2 in closed form (pairs a < b in colex order, index b(b-1)/2 + a: a handful of
    elementwise ops); larger k through a lookup of every subset's code."""
    k, device = chosen.shape[1], chosen.device
    if k == 2:
        first, second = chosen[:, 0], chosen[:, 1]
        swap = first > second
        low, high = torch.minimum(first, second), torch.maximum(first, second)
        weights = torch.where(swap[:, None], weights.flip(-1), weights)
        members = torch.tril_indices(experts, experts, -1, device=device).flip(0).t()
        return high * (high - 1) // 2 + low, weights, members
    chosen, by_expert = chosen.sort(-1)
    members = torch.combinations(torch.arange(experts, device=device), r=k).view(-1, k)
    powers = experts ** torch.arange(k - 1, -1, -1, device=device)
    lookup = torch.zeros(experts**k, dtype=torch.long, device=device)
    lookup[(members * powers).sum(-1)] = torch.arange(members.shape[0], device=device)
    return lookup[(chosen * powers).sum(-1)], weights.gather(-1, by_expert), members


class MoCEExperts(nn.Module):
    """Router and stacked adapter experts of one MoCE layer (all trainable)."""

    # Forces an execution plan (group, general) for benchmarks and tests; None = measured
    # choice of choose_plan. Not a configuration option: every plan gives the same result.
    plan: tuple[str, str | None] | None = None

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
        self.act = nn.Identity() if config.adapter_activation == "identity" else ACT2FN[
            config.adapter_activation
        ]
        total = self.num_groups * self.experts_per_group + self.num_general
        self.router = build_router(config, hidden_size)
        self.general_router = (
            nn.Parameter(torch.empty(self.num_general, hidden_size)) if self.num_general else None
        )
        self.down = nn.Parameter(torch.empty(total, hidden_size, self.adapter_dim))
        self.up = nn.Parameter(torch.empty(total, self.adapter_dim, hidden_size))
        self.reset_parameters(seed=config.init_seed + 1000 * layer_index)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def uniform_(t: torch.Tensor, bound: float) -> None:
            t.copy_((torch.rand(t.shape, generator=gen) * 2 - 1) * bound)

        # nn.Linear's default bound (kaiming-uniform, a=sqrt(5)) for routers and down;
        # drawn in the same order as before the router was a module (same initial weights).
        bound = 1.0 / math.sqrt(self.hidden_size)
        self.router.reset_parameters(gen)
        if self.general_router is not None:
            uniform_(self.general_router, bound)
        uniform_(self.down, bound)
        self.up.zero_()  # exact base-model behaviour at step 0

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
        prev_top1: torch.Tensor | None = None, recompute: bool = False,
    ) -> tuple[torch.Tensor, RoutingRecord]:
        """x: router input [T, d]; h: FFN output [T, d]; groups/valid: [T]; prev_top1: [T]
        each token's expert (within its group) in the previous MoCE layer, if any;
        recompute: a gradient-checkpointing replay (see :class:`~.routers.Router`)."""
        safe_groups = torch.where(valid, groups, torch.zeros_like(groups))
        logits = self.router(x, safe_groups, valid, prev_top1, recompute)
        probs, chosen, weights = _route(logits, self.top_k)
        with_stats = self.training or routing_stats_requested()
        aux = load = tokens = entropy = general_load = None
        if with_stats:
            aux, load, tokens = grouped_load_balancing_loss(
                probs, chosen, safe_groups, valid, self.num_groups
            )
            entropy = router_entropy(probs, valid)
        general = None
        if self.general_router is not None:
            g_logits = F.linear(x.to(self.general_router.dtype), self.general_router)
            general = _route(g_logits, self.general_top_k)
            if with_stats:
                g_aux, g_load, _ = grouped_load_balancing_loss(
                    general[0], general[1], torch.zeros_like(safe_groups), valid, 1
                )
                aux = aux + g_aux
                general_load = g_load[0]
        # Padding / packing gaps contribute nothing (and get no gradient); the adapter
        # scaling rides on the weights (one [T, d] product less than scaling the output).
        mask = valid[:, None].to(weights.dtype) * self.scaling
        delta = self._expert_outputs(h, safe_groups, mask, (probs, chosen, weights), general)
        out = h + delta.to(h.dtype)
        record = RoutingRecord(
            layer_index=self.layer_index,
            aux_loss=aux,
            expert_load=load,
            group_tokens=tokens,
            entropy=entropy,
            general_load=general_load,
            top1=probs.argmax(-1) if chosen is None else chosen[:, 0],
        )
        return out, record

    def _expert_outputs(
        self, h: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor,
        group_route: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
        general_route: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None,
    ) -> torch.Tensor:
        """sum over each token's experts of weight * adapter(h), weights times ``mask``."""
        C, E, G = self.num_groups, self.experts_per_group, self.num_general
        n = C * E
        group_plan, general_plan = self.plan or choose_plan(
            self.top_k, E, self.general_top_k, G, C, h.shape[0], self.adapter_dim)
        device = h.device
        out = None
        slot_ids, slot_weights = [], []
        if group_plan == "slots":
            probs, chosen, weights = group_route
            if chosen is None:  # soft as E slots per token
                chosen = torch.arange(E, device=device).expand(h.shape[0], -1)
            slot_ids.append(groups[:, None] * E + chosen)
            slot_weights.append(weights * mask)
        if general_route is not None and general_plan == "slots":
            g_probs, g_chosen, g_weights = general_route
            if g_chosen is None:
                g_chosen = torch.arange(G, device=device).expand(h.shape[0], -1)
            slot_ids.append(n + g_chosen)
            slot_weights.append(g_weights * mask)
        if slot_ids:
            ids = slot_ids[0] if len(slot_ids) == 1 else torch.cat(slot_ids, 1)
            w = slot_weights[0] if len(slot_weights) == 1 else torch.cat(slot_weights, 1)
            out = routed_adapter_sum(h, ids, w, self.down, self.up, self.act)
        if group_plan in ("blocks", "sets"):
            probs, chosen, weights = group_route
            if group_plan == "blocks":
                # Group c's E adapters as one rank-E*r adapter (unchosen experts: weight 0).
                sets = groups
                members = torch.arange(n, device=device).view(C, E)
                weights = _dense_weights(probs, chosen, weights)
            else:
                # Each (group, chosen k-subset) is one rank-k*r adapter.
                if chosen is None:  # soft: the one subset of all E experts
                    chosen = torch.arange(E, device=device).expand(h.shape[0], -1)
                subset, weights, subsets = _chosen_sets(chosen, weights, E)
                sets = groups * subsets.shape[0] + subset
                members = (torch.arange(C, device=device)[:, None, None] * E
                           + subsets).reshape(-1, subsets.shape[1])
            weights = weights * mask
            shared = None
            if general_route is not None and general_plan == "fold":
                # The general experts as G more blocks of every set: one call.
                shared = torch.arange(n, n + G, device=device)
                weights = torch.cat([weights, _dense_weights(*general_route) * mask], 1)
            y = block_adapter_sum(h, sets, weights, self.down, self.up, self.act, members,
                                  shared)
            out = y if out is None else out + y
        if general_route is not None and general_plan == "blocks":
            members = torch.arange(n, n + G, device=device).view(1, G)
            y = block_adapter_sum(h, None, _dense_weights(*general_route) * mask, self.down,
                                  self.up, self.act, members)
            out = y if out is None else out + y
        return out


class MoCEMLP(nn.Module):
    """Drop-in replacement of a decoder MLP: frozen ``base_mlp`` + ``moce_experts``."""

    def __init__(
        self, base_mlp: nn.Module, hidden_size: int, config: MoCEConfig, layer_index: int
    ) -> None:
        super().__init__()
        self.base_mlp = base_mlp
        self.moce_experts = MoCEExperts(hidden_size, config, layer_index)
        self.layer_index = layer_index

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_mlp(hidden_states, *args, **kwargs)
        lead_shape = hidden_states.shape[:-1]
        ids = token_cluster_ids(lead_shape, hidden_states.device).reshape(-1)
        valid = ids != IGNORE_CLUSTER_ID
        # A gradient-checkpointing recompute runs after the forward returned: no previous
        # layer's record then (the router replays what it cached in the forward).
        recompute = not in_forward()
        prev = None if recompute else previous_record()
        out, record = self.moce_experts(
            hidden_states.reshape(-1, hidden_states.shape[-1]),
            h.reshape(-1, h.shape[-1]),
            ids,
            valid,
            None if prev is None else prev.top1,
            recompute,
        )
        record_routing(record)
        return out.view(*lead_shape, -1)


__all__ = ["MoCEExperts", "MoCEMLP", "RoutingRecord", "choose_plan", "plan_is_valid"]
