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
by expert instead (`expert_ops.routed_adapter_sum`). These execution plans are registered
by name in `plans.py` (with a glossary: slot, set, block, fold, shared) and
`plans.choose_plan` picks one, by measurement. No Python loop over experts and no host
synchronisation on the fast path.
``up`` starts at zero, so an upcycled model reproduces the base model exactly.
"""

from __future__ import annotations

import itertools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .cluster_ids import IGNORE_CLUSTER_ID
from .config import MoCEConfig
from .losses import grouped_load_balancing_loss, router_entropy
from .plans import (
    GENERAL_PLANS,
    GROUP_PLANS,
    Plan,
    Routing,
    choose_plan,
    expert_outputs,
    inference_plan,
    plan_is_valid,
    route,
    slots_of,
)
from .routers import build_router
from .routing import (
    RoutingRecord,
    in_forward,
    previous_record,
    record_routing,
    routing_stats_requested,
    token_routing_ids,
)


class MoCEExperts(nn.Module):
    """Router and stacked adapter experts of one MoCE layer (all trainable)."""

    # Forces an execution plan ((group, general) names of .plans' registries, or "eager")
    # for benchmarks and tests; None = measured choice of choose_plan. Not a configuration
    # option: every plan gives the same result.
    plan: Plan | None = None

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
        self.slots_per_token = slots_of(self.top_k, self.experts_per_group,
                                        self.general_top_k, self.num_general)
        self.router = build_router(config, hidden_size)
        self.general_router = (
            nn.Parameter(torch.empty(self.num_general, hidden_size)) if self.num_general else None
        )
        self.down = nn.Parameter(torch.empty(total, hidden_size, self.adapter_dim))
        self.up = nn.Parameter(torch.empty(total, self.adapter_dim, hidden_size))
        # (key, [N*r, d] copy of down) of down_rows(): not a buffer, never saved.
        self._down_rows: tuple[tuple, torch.Tensor] | None = None
        self._register_for_op()
        self.reset_parameters(seed=config.init_seed + 1000 * layer_index)

    def _register_for_op(self) -> None:
        """This layer's own key in the run-time plan op's registry (see _expert_outputs)."""
        self._op_key = next(_OP_KEYS)
        _OP_LAYERS[self._op_key] = self

    def __setstate__(self, state: dict) -> None:
        # A copy (deepcopy: PEFT's modules_to_save, a reference model) or an unpickled layer
        # gets a key of its own; the original's would make the op run the original's weights.
        super().__setstate__(state)
        self._register_for_op()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def uniform_(t: torch.Tensor, bound: float) -> None:
            t.copy_((torch.rand(t.shape, generator=gen) * 2 - 1) * bound)

        # nn.Linear's default bound (kaiming-uniform, a=sqrt(5)) for routers and down;
        # the draw order is part of the format: a seed gives 0.1.0's initial weights.
        bound = 1.0 / math.sqrt(self.hidden_size)
        self.router.reset_parameters(gen)
        if self.general_router is not None:
            uniform_(self.general_router, bound)
        uniform_(self.down, bound)
        self.up.zero_()  # exact base-model behaviour at step 0

    def down_rows(self) -> torch.Tensor:
        """``down`` [N, d, r] as one linear weight [N*r, d] (row e*r + j: expert e's column
        j), for the few-token ``"dense"`` plan. Without autograd the copy is kept until
        ``down`` changes (its version, storage or dtype), so a decode step does not pay for
        it: the memory of one more ``down``. With autograd, or under compile, it is made in
        the call (differentiable)."""
        down = self.down
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return down.transpose(1, 2).reshape(-1, down.shape[1])
        # Inference tensors have no version counter (and cannot change outside inference
        # mode): their storage identifies them.
        version = None if down.is_inference() else down._version
        key = (version, down.data_ptr(), down.dtype, down.device, down.shape)
        cached = self._down_rows
        if cached is None or cached[0] != key:
            with torch.no_grad():
                rows = down.detach().transpose(1, 2).reshape(-1, down.shape[1]).contiguous()
            self._down_rows = cached = (key, rows)
        return cached[1]

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
        prev_top1: torch.Tensor | None = None, recompute: bool = False,
    ) -> tuple[torch.Tensor, RoutingRecord]:
        """x: router input [T, d]; h: FFN output [T, d]; groups/valid: [T]; prev_top1: [T]
        each token's expert (within its group) in the previous MoCE layer, if any;
        recompute: a gradient-checkpointing replay (see :class:`~.routers.Router`)."""
        safe_groups = torch.where(valid, groups, torch.zeros_like(groups))
        logits = self.router(x, safe_groups, valid, prev_top1, recompute)
        routing = route(logits, self.top_k)
        with_stats = self.training or routing_stats_requested()
        aux = load = tokens = entropy = general_load = None
        if with_stats:
            aux, load, tokens = grouped_load_balancing_loss(
                routing.probs, routing.chosen, safe_groups, valid, self.num_groups
            )
            entropy = router_entropy(routing.probs, valid)
        general = None
        if self.general_router is not None:
            g_logits = F.linear(x.to(self.general_router.dtype), self.general_router)
            general = route(g_logits, self.general_top_k)
            if with_stats:
                g_aux, g_load, _ = grouped_load_balancing_loss(
                    general.probs, general.chosen, torch.zeros_like(safe_groups), valid, 1
                )
                aux = aux + g_aux
                general_load = g_load[0]
        # Padding / packing gaps contribute nothing (and get no gradient); the adapter
        # scaling rides on the weights (one [T, d] product less than scaling the output).
        mask = valid[:, None].to(routing.weights.dtype) * self.scaling
        delta = self._expert_outputs(h, safe_groups, mask, routing, general)
        out = h + delta.to(h.dtype)
        record = RoutingRecord(
            layer_index=self.layer_index,
            aux_loss=aux,
            expert_load=load,
            group_tokens=tokens,
            entropy=entropy,
            general_load=general_load,
            top1=routing.probs.argmax(-1) if routing.chosen is None else routing.chosen[:, 0],
        )
        return out, record

    def _expert_outputs(
        self, h: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, routing: Routing,
        general: Routing | None,
    ) -> torch.Tensor:
        """sum over each token's experts of weight * adapter(h), weights times ``mask``, by
        the forced or the measured plan (:mod:`.plans`); without autograd, a call of few
        slots (a decode step), on CUDA of bounded work, on the CPU of a few hundred tokens,
        takes the plan of :func:`~.plans.inference_plan`."""
        plan = self.plan
        if plan is None and not torch.is_grad_enabled() and torch.compiler.is_compiling():
            # A graph traced once for every token count (vLLM) would keep the plan of the
            # size it was traced at; the op chooses at run time, by the call's token count.
            g = general or (None, None, None)
            return torch.ops.moce.inference_expert_outputs(
                h, groups, mask, routing.probs, routing.chosen, routing.weights, g[0], g[1],
                g[2], self._op_key)
        if plan is None and not torch.is_grad_enabled():
            plan = inference_plan(h.shape[0], self.slots_per_token, self.down.shape[0],
                                  self.adapter_dim, self.hidden_size, h.device.type,
                                  general=self.num_general > 0)
        plan = plan or choose_plan(self.top_k, self.experts_per_group, self.general_top_k,
                                        self.num_general, self.num_groups, h.shape[0],
                                        self.adapter_dim)
        return expert_outputs(self, plan, h, groups, mask, routing, general)


# MoCEExperts by key, for the op below (an op takes tensors and numbers, not modules).
_OP_LAYERS: weakref.WeakValueDictionary[int, MoCEExperts] = weakref.WeakValueDictionary()
_OP_KEYS = itertools.count()


@torch.library.custom_op("moce::inference_expert_outputs", mutates_args=())
def _inference_expert_outputs(
    h: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor,
    chosen: torch.Tensor | None, weights: torch.Tensor, general_probs: torch.Tensor | None,
    general_chosen: torch.Tensor | None, general_weights: torch.Tensor | None, layer: int,
) -> torch.Tensor:
    """A layer's expert outputs without autograd, its plan chosen here, at run time, from
    the call's token count (what the eager path does). Opaque to torch.compile."""
    experts = _OP_LAYERS[layer]
    general = (None if general_probs is None
               else Routing(general_probs, general_chosen, general_weights))
    with torch.no_grad():
        return MoCEExperts._expert_outputs(
            experts, h, groups, mask, Routing(probs, chosen, weights), general).to(h.dtype)


@_inference_expert_outputs.register_fake
def _(h, groups, mask, probs, chosen, weights, general_probs, general_chosen,
      general_weights, layer):
    return torch.empty_like(h)


class MoCEMLP(nn.Module):
    """Drop-in replacement of a decoder MLP: frozen ``base_mlp`` + ``moce_experts``.

    ``token_ids``: None (the ids come from the forward's routing context), or a
    ``[max_tokens]`` buffer of per-token cluster ids that the host writes in place before
    each forward (vLLM: one buffer shared by all layers), read as its first T entries, so
    a compiled graph sees each step's ids."""

    def __init__(
        self, base_mlp: nn.Module, hidden_size: int, config: MoCEConfig, layer_index: int
    ) -> None:
        super().__init__()
        self.base_mlp = base_mlp
        self.moce_experts = MoCEExperts(hidden_size, config, layer_index)
        self.layer_index = layer_index
        self.token_ids: torch.Tensor | None
        self.register_buffer("token_ids", None, persistent=False)  # never saved

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_mlp(hidden_states, *args, **kwargs)
        lead_shape = hidden_states.shape[:-1]
        if self.token_ids is not None:
            ids = self.token_ids[: lead_shape.numel()]
            valid = ids != IGNORE_CLUSTER_ID
        else:
            ids, valid = token_routing_ids(lead_shape, hidden_states.device)
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


# GROUP_PLANS, GENERAL_PLANS, choose_plan and plan_is_valid live in .plans; importable from
# here too, where bench scripts and docs name them.
__all__ = ["GENERAL_PLANS", "GROUP_PLANS", "MoCEExperts", "MoCEMLP", "RoutingRecord",
           "choose_plan", "plan_is_valid"]
