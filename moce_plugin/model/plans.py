"""Expert execution plans: how one MoCE layer's routed adapters are computed, by name.

Every plan computes the same function, ``sum over each token's experts of weight *
adapter(h)`` (see :mod:`.layer`); they differ in how the work is laid out for the grouped
products, and :func:`choose_plan` picks one by measurement (bench/bench_expert_plans.py,
docs/performance.md). Like transformers' ``ExpertsInterface``, the plans are registered by
name (:data:`GROUP_PLANS`, :data:`GENERAL_PLANS`) and :func:`eager_expert_outputs` is the
readable reference every registered plan is tested against.

Glossary:

- **slot**: one (token, expert) pair with its routing weight; top-k gives a token k slots,
  soft merging E. Slots are sorted by expert (:func:`~.expert_ops.routed_adapter_sum`).
- **set**: the experts a token uses together: its group's E experts, or its k chosen ones.
  Tokens of one set run it as one merged adapter of rank B*r (B experts), sorted by set
  (:func:`~.expert_ops.block_adapter_sum`).
- **block**: r columns of a merged adapter's bottleneck, i.e. one expert of a set, scaled by
  the token's weight for that expert (a zero weight leaves the expert out).
- **shared**: experts every token uses (the general experts of the (V) variant): G more
  blocks of every set from one plain product, not stacked into each set.
- **fold**: running the general experts as shared blocks inside the group's block call
  instead of a call of their own.

A plan is a pair (group plan, general plan or None). Group plans, for each token's group
experts: ``slots`` (the token's slots), ``blocks`` (its group's E experts as one set,
unchosen ones at weight 0), ``sets`` (its (group, chosen k-subset) as one set). General
plans, for the general experts: ``slots`` (more slots in the same routed call as the
group's), ``blocks`` (one dense call, every token one set), ``fold`` (shared blocks of the
group's block call; needs ``blocks`` or ``sets``). A plan turns the routing into calls
(:class:`SlotCall`, :class:`BlockCall`); :func:`expert_outputs` runs them. ``"eager"``
names the reference.

``"gather"`` is the few-token plan (a decode step: one token per sequence): each slot's
adapter weights are gathered and run as one batched product, with no sort, no bins and no
plan choice; ``"dense"`` runs every expert on every token as two plain products. Without
autograd the layer asks :func:`inference_plan`: one of these two for at most
:data:`GATHER_MAX_SLOTS` slots, where dispatching into bins costs more than the arithmetic;
dense on CUDA up to :data:`CUDA_DENSE_MAX_WORK`; the plain sorted slots on the CPU for a
few hundred tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Literal, NamedTuple, Protocol, TypeVar

import torch
import torch.nn.functional as F

from .expert_ops import block_adapter_sum, routed_adapter_sum


class Routing(NamedTuple):
    """One router's decision for T tokens over its E experts."""

    probs: torch.Tensor  # [T, E] float32 softmax
    chosen: torch.Tensor | None  # [T, k] expert indices; None: soft merging (every expert)
    weights: torch.Tensor  # [T, k] weights of the chosen experts; soft: [T, E] = probs

    def dense(self) -> torch.Tensor:
        """[T, E] weight of every expert: the routing weights at the chosen ones, 0 elsewhere."""
        if self.chosen is None:
            return self.weights
        return torch.zeros_like(self.probs).scatter(-1, self.chosen, self.weights)

    def experts(self) -> torch.Tensor:
        """[T, k] the experts ``weights`` belong to (soft: 0..E-1 for every token)."""
        if self.chosen is not None:
            return self.chosen
        tokens, experts = self.probs.shape
        return torch.arange(experts, device=self.probs.device).expand(tokens, -1)


def route(logits: torch.Tensor, top_k: int | str) -> Routing:
    """Softmax over the experts, then top-k (or every expert, ``"soft"``)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_k == "soft":
        return Routing(probs, None, probs)
    weights, chosen = probs.topk(int(top_k), dim=-1)
    if top_k > 1:
        # Renormalised over the chosen k (Mixtral/PESC style), so the k weights sum to 1
        # like the paper's weighted sum of adapters.
        weights = weights / weights.sum(dim=-1, keepdim=True)
    # top-1 keeps the raw probability (Switch Transformer): renormalising would make the
    # weight a constant 1 and cut the router off from the language-modelling gradient.
    return Routing(probs, chosen, weights)


class Experts(Protocol):
    """What a plan reads of the layer (:class:`~.layer.MoCEExperts`)."""

    num_groups: int
    experts_per_group: int
    num_general: int
    down: torch.Tensor  # [N, d, r], N = num_groups * experts_per_group + num_general
    up: torch.Tensor  # [N, r, d]
    act: Callable[[torch.Tensor], torch.Tensor]

    def down_rows(self) -> torch.Tensor:
        """``down`` as one linear weight [N*r, d] (row e*r + j: expert e's column j)."""
        ...


class SlotCall(NamedTuple):
    """One :func:`~.expert_ops.routed_adapter_sum` call."""

    expert_ids: torch.Tensor  # [T, k] in [0, N)
    weights: torch.Tensor  # [T, k]


class BlockCall(NamedTuple):
    """One :func:`~.expert_ops.block_adapter_sum` call."""

    sets: torch.Tensor | None  # [T] in [0, S); None: one set
    members: torch.Tensor  # [S, B] expert ids of each set
    weights: torch.Tensor  # [T, B (+ G shared)]
    shared: torch.Tensor | None = None  # [G] expert ids every token uses


Call = SlotCall | BlockCall
# (experts, group routing, token groups [T], mask [T, 1]) -> the group experts' call
GroupPlan = Callable[[Experts, Routing, torch.Tensor, torch.Tensor], Call]
# (experts, general routing, mask [T, 1], the group's call) -> every call of the layer
GeneralPlan = Callable[[Experts, Routing, torch.Tensor, Call], list[Call]]
Plan = tuple[str, str | None] | Literal["eager", "gather", "dense"]

#: The layer runs the ``"gather"`` plan without autograd up to this many (token, expert)
#: slots in a call: measured on the CPU against the sorted plans (docs/performance.md,
#: "Decode"); beyond it the gathered weight copies ([slots, d, r] twice) cost more than
#: the sort they save.
GATHER_MAX_SLOTS = 32

#: Few-token calls run every expert (``"dense"``) once their slots reach ``N /
#: DENSE_SLOT_FACTOR`` (N: the layer's experts): gathering copies each slot's weights out
#: and reads them again, the dense plan reads each of the N experts' once, in place.
#: Measured on the CPU (SmolLM2-135M, 3 x 4 experts, top-2; docs/performance.md, "Decode"):
#: dense faster at 8 tokens (16 slots) in vLLM and `generate`, gather at 1 and 4.
DENSE_SLOT_FACTOR = 1

#: On a CUDA device, every call without autograd beyond :data:`GATHER_MAX_SLOTS` slots
#: also runs ``"dense"`` while each of its two products does at most this many
#: multiply-adds (tokens x experts x rank x hidden): the GPU is bound by launches and host
#: time there, and the sorted plans launch many more kernels than two plain products.
#: Measured on an H200 (bf16, torch 2.11, ``bench_expert_plans --inference --device cuda``;
#: docs/performance.md, "Decode on a GPU"): dense was the fastest plan at every size up to
#: 6.9e10 (4096 tokens x 64 experts x r 64 x d 4096: 0.84 ms, best sorted plan 0.93) and
#: 1.6x slower than the sorted plans at 2.7e11 (16384 tokens). The bound sits a factor 2
#: below that crossover, for hosts that launch kernels faster than the one measured.
CUDA_DENSE_MAX_WORK = 2**35


#: On the CPU, calls without autograd beyond :data:`GATHER_MAX_SLOTS` slots and of at most
#: this many tokens per adapter of the layer run the plain sorted slots (``("slots",
#: "slots")``), whatever :func:`choose_plan` would take: its block, set and fold plans win
#: with autograd and at many tokens, but building their stacked weights costs more than it
#: saves in a forward of a few hundred tokens. Measured on the 2-core AMD EPYC (1 thread,
#: ``bench_expert_plans --inference``, d 576, soft, soft + (V)2, top-2 + (V)2;
#: docs/performance.md, "Decode"): 1.2-1.4x faster than the former choice at 64 tokens with
#: 3 x 4 experts, 1.5-3.4x at 8-256 tokens with 8 x 8; the block plans caught up at ~256
#: tokens (3 x 4) and ~700 (8 x 8), 1.6x ahead at 1024 (8 x 8, soft).
CPU_SLOTS_MAX_TOKENS_PER_EXPERT = 8


def inference_plan(tokens: int, slots_per_token: int, experts: int, rank: int, hidden: int,
                   device_type: str = "cpu", general: bool = False) -> Plan | None:
    """The plan of a call without autograd of ``tokens`` tokens, each with
    ``slots_per_token`` (token, expert) slots, in a layer of ``experts`` adapters of
    ``rank`` on ``hidden`` features (``general``: some of them general experts), on a
    ``device_type`` device: ``"gather"`` or ``"dense"`` up to :data:`GATHER_MAX_SLOTS`
    slots; on CUDA ``"dense"`` up to :data:`CUDA_DENSE_MAX_WORK`; on the CPU the sorted
    slots up to :data:`CPU_SLOTS_MAX_TOKENS_PER_EXPERT`; else None (the measured choice of
    :func:`choose_plan`)."""
    slots = tokens * slots_per_token
    if slots <= GATHER_MAX_SLOTS:
        return "dense" if experts <= DENSE_SLOT_FACTOR * slots else "gather"
    if device_type == "cuda" and tokens * experts * rank * hidden <= CUDA_DENSE_MAX_WORK:
        return "dense"
    if device_type == "cpu" and tokens <= CPU_SLOTS_MAX_TOKENS_PER_EXPERT * experts:
        return ("slots", "slots" if general else None)
    return None

P = TypeVar("P")


class PlanRegistry(Mapping[str, P]):
    """Name -> plan function; ``register`` adds one (a decorator)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._plans: dict[str, P] = {}

    def register(self, name: str) -> Callable[[P], P]:
        def add(fn: P) -> P:
            self._plans[name] = fn
            return fn
        return add

    def __getitem__(self, name: str) -> P:
        try:
            return self._plans[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} plan {name!r}; registered: "
                           f"{', '.join(self._plans)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._plans)

    def __len__(self) -> int:
        return len(self._plans)


GROUP_PLANS: PlanRegistry[GroupPlan] = PlanRegistry("group")
GENERAL_PLANS: PlanRegistry[GeneralPlan] = PlanRegistry("general")


# ---- group plans --------------------------------------------------------------------------
@GROUP_PLANS.register("slots")
def group_slots(experts: Experts, routing: Routing, groups: torch.Tensor,
                mask: torch.Tensor) -> Call:
    """Each token's slots (soft: E of them) in its group's experts."""
    return SlotCall(groups[:, None] * experts.experts_per_group + routing.experts(),
                    routing.weights * mask)


@GROUP_PLANS.register("blocks")
def group_blocks(experts: Experts, routing: Routing, groups: torch.Tensor,
                 mask: torch.Tensor) -> Call:
    """Group c's E experts as one set (unchosen experts: weight 0)."""
    C, E = experts.num_groups, experts.experts_per_group
    members = torch.arange(C * E, device=groups.device).view(C, E)
    return BlockCall(groups, members, routing.dense() * mask)


@GROUP_PLANS.register("sets")
def group_sets(experts: Experts, routing: Routing, groups: torch.Tensor,
               mask: torch.Tensor) -> Call:
    """Each (group, chosen k-subset) as one set (soft: the one subset of all E)."""
    C, E = experts.num_groups, experts.experts_per_group
    subset, weights, subsets = chosen_sets(routing.experts(), routing.weights, E)
    members = (torch.arange(C, device=groups.device)[:, None, None] * E
               + subsets).reshape(-1, subsets.shape[1])
    return BlockCall(groups * subsets.shape[0] + subset, members, weights * mask)


# ---- general plans ------------------------------------------------------------------------
def _general_ids(experts: Experts, device: torch.device) -> torch.Tensor:
    """The general experts' ids: they follow the C*E group experts."""
    first = experts.num_groups * experts.experts_per_group
    return torch.arange(first, first + experts.num_general, device=device)


@GENERAL_PLANS.register("slots")
def general_slots(experts: Experts, routing: Routing, mask: torch.Tensor,
                  group_call: Call) -> list[Call]:
    """The general slots: in the group's routed call if it has one, else a call of their own."""
    first = experts.num_groups * experts.experts_per_group
    call = SlotCall(first + routing.experts(), routing.weights * mask)
    if isinstance(group_call, SlotCall):
        return [SlotCall(torch.cat([group_call.expert_ids, call.expert_ids], 1),
                         torch.cat([group_call.weights, call.weights], 1))]
    # The routed call first: the call order fixes the order in which autograd sums the two
    # calls' gradients (float rounding), and this is the order every measured and recorded
    # number was taken with (bitwise).
    return [call, group_call]


@GENERAL_PLANS.register("blocks")
def general_blocks(experts: Experts, routing: Routing, mask: torch.Tensor,
                   group_call: Call) -> list[Call]:
    """The G general experts as one set of every token, in a dense call of their own."""
    members = _general_ids(experts, mask.device)[None]
    return [group_call, BlockCall(None, members, routing.dense() * mask)]


@GENERAL_PLANS.register("fold")
def general_fold(experts: Experts, routing: Routing, mask: torch.Tensor,
                 group_call: Call) -> list[Call]:
    """The general experts as G shared blocks of every set of the group's block call."""
    if not isinstance(group_call, BlockCall):
        raise ValueError("the 'fold' general plan needs a block call to fold into: "
                         "use it with the 'blocks' or 'sets' group plan")
    weights = torch.cat([group_call.weights, routing.dense() * mask], 1)
    return [group_call._replace(weights=weights,
                                shared=_general_ids(experts, mask.device))]


def plan_is_valid(plan: tuple[str, str | None]) -> bool:
    """Folding needs a block or set call to fold into."""
    return plan[1] != "fold" or plan[0] in ("blocks", "sets")


def all_plans(general: bool) -> list[tuple[str, str | None]]:
    """Every registered (group, general) plan for a layer with or without general experts."""
    if not general:
        return [(group, None) for group in GROUP_PLANS]
    return [(group, gen) for group in GROUP_PLANS for gen in GENERAL_PLANS
            if plan_is_valid((group, gen))]


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


def chosen_sets(
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


def run_call(experts: Experts, h: torch.Tensor, call: Call) -> torch.Tensor:
    if isinstance(call, SlotCall):
        return routed_adapter_sum(h, call.expert_ids, call.weights, experts.down, experts.up,
                                  experts.act)
    return block_adapter_sum(h, call.sets, call.weights, experts.down, experts.up,
                             experts.act, call.members, call.shared)


def expert_outputs(
    experts: Experts, plan: Plan, h: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor,
    routing: Routing, general: Routing | None,
) -> torch.Tensor:
    """sum over each token's experts of weight * adapter(h), weights times ``mask`` [T, 1],
    computed by ``plan``. h: [T, d]; groups: [T] in [0, C); general: the general router's
    decision (None without general experts)."""
    if plan == "eager":
        return eager_expert_outputs(experts, h, groups, mask, routing, general)
    if plan == "gather":
        return gathered_expert_outputs(experts, h, groups, mask, routing, general)
    if plan == "dense":
        return dense_expert_outputs(experts, h, groups, mask, routing, general)
    group_plan, general_plan = plan
    calls = [GROUP_PLANS[group_plan](experts, routing, groups, mask)]
    if general is not None:
        if general_plan is None:
            raise ValueError(f"plan {plan!r} has no general plan but the layer has general "
                             f"experts: name one of {', '.join(GENERAL_PLANS)}")
        calls = GENERAL_PLANS[general_plan](experts, general, mask, calls[0])
    out = run_call(experts, h, calls[0])
    for call in calls[1:]:
        out = out + run_call(experts, h, call)
    return out


def slots_of(top_k: int | str, experts: int, general_top_k: int | str = 0,
             general: int = 0) -> int:
    """(token, expert) slots per token: k (soft: every expert of the group), plus the general
    experts' (soft: all of them)."""
    group = experts if top_k == "soft" else int(top_k)
    if not general:
        return group
    return group + (general if general_top_k == "soft" else int(general_top_k))


def _slot_ids_and_weights(
    experts: Experts, groups: torch.Tensor, mask: torch.Tensor, routing: Routing,
    general: Routing | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, slots] expert ids in [0, N), [T, slots] weights times ``mask``) of every token."""
    ids = groups[:, None] * experts.experts_per_group + routing.experts()
    weights = routing.weights * mask
    if general is not None:
        first = experts.num_groups * experts.experts_per_group
        ids = torch.cat([ids, first + general.experts()], 1)
        weights = torch.cat([weights, general.weights * mask], 1)
    return ids, weights


def gathered_expert_outputs(
    experts: Experts, h: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor,
    routing: Routing, general: Routing | None,
) -> torch.Tensor:
    """The few-token plan: each (token, expert) slot's ``down``/``up`` gathered ([A, d, r],
    [A, r, d], A = T * slots) and applied as two batched products, then each token's slots
    summed. Plain differentiable ops (no custom backward): meant for inference steps."""
    ids, weights = _slot_ids_and_weights(experts, groups, mask, routing, general)
    down, up = experts.down, experts.up
    (tokens, slots), (_, rank, dim) = ids.shape, up.shape
    flat = ids.reshape(-1)
    rows = h.to(down.dtype)[:, None, None, :].expand(tokens, slots, 1, dim)
    z = experts.act(torch.bmm(rows.reshape(tokens * slots, 1, dim), down.index_select(0, flat)))
    z = z.view(tokens, slots, rank) * weights.to(down.dtype)[:, :, None]
    # A token's slots side by side are one adapter of rank slots*r: the product sums them.
    gathered_up = up.index_select(0, flat).view(tokens, slots * rank, dim)
    return torch.bmm(z.view(tokens, 1, slots * rank), gathered_up).view(tokens, dim)


def dense_expert_outputs(
    experts: Experts, h: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor,
    routing: Routing, general: Routing | None,
) -> torch.Tensor:
    """The few-token plan: every expert's adapter on every token as two plain products
    ([T, d] x [d, N*r], then [T, N*r] x [N*r, d]), each token's unchosen experts at weight 0.
    The N experts' weights are read once per call, in place: gathering them per slot copies
    them per token, and sorting slots into bins costs more than the arithmetic of a decode
    step. Plain differentiable ops; the layer takes it without autograd."""
    ids, weights = _slot_ids_and_weights(experts, groups, mask, routing, general)
    up = experts.up
    total, rank, dim = up.shape
    tokens = h.shape[0]
    dense = torch.zeros(tokens, total, dtype=up.dtype, device=h.device)
    dense = dense.scatter_add(1, ids, weights.to(up.dtype))
    z = experts.act(F.linear(h.to(up.dtype), experts.down_rows()))  # [T, N*r]
    z = (z.view(tokens, total, rank) * dense[:, :, None]).view(tokens, total * rank)
    return torch.mm(z, up.reshape(total * rank, dim))


def eager_expert_outputs(
    experts: Experts, h: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor,
    routing: Routing, general: Routing | None,
) -> torch.Tensor:
    """The reference: every expert on every token, weighted by a dense [T, N] weight matrix
    (0 for experts outside the token's group or not chosen). Slow, plain autograd."""
    C, E = experts.num_groups, experts.experts_per_group
    down, up = experts.down, experts.up
    weights = torch.zeros(h.shape[0], down.shape[0], device=h.device)
    columns = groups[:, None] * E + torch.arange(E, device=h.device)  # the token's group
    weights = weights.scatter(1, columns, routing.dense())
    if general is not None:
        weights = torch.cat([weights[:, :C * E], general.dense()], 1)
    weights = (weights * mask).to(down.dtype)
    h = h.to(down.dtype)
    out = torch.zeros_like(h)
    for e in range(down.shape[0]):
        out = out + weights[:, e, None] * (experts.act(h @ down[e]) @ up[e])
    return out


__all__ = [
    "CPU_SLOTS_MAX_TOKENS_PER_EXPERT",
    "CUDA_DENSE_MAX_WORK",
    "DENSE_SLOT_FACTOR",
    "GATHER_MAX_SLOTS",
    "GENERAL_PLANS",
    "GROUP_PLANS",
    "BlockCall",
    "Plan",
    "PlanRegistry",
    "Routing",
    "SlotCall",
    "all_plans",
    "choose_plan",
    "chosen_sets",
    "dense_expert_outputs",
    "eager_expert_outputs",
    "expert_outputs",
    "gathered_expert_outputs",
    "inference_plan",
    "plan_is_valid",
    "route",
    "slots_of",
]
