"""Token-level group routers of a MoCE layer.

A router maps the MLP input of each token to the logits of the E experts of that token's
own group ([T, E]); softmax, top-k and the balancing loss stay in the layer. Every group
has its own linear router; the C routers are one ``[C*E, d]`` matrix (one matmul for all
tokens, then each token keeps its group's E logits).

- :class:`LinearRouter`: the paper's router.
- :class:`ACMoERouter`: the same projection applied to the ACMoE-transformed input
  ``M_k x`` (Nielsen et al., ICLR 2025; maths in :mod:`moce_plugin.model.acmoe`), with the
  running per-(group, expert) dispersions as buffers.

:func:`build_router` picks the class from ``MoCEConfig.router``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .acmoe import cluster_mad, feature_weights, transform
from .config import MoCEConfig


class Router(nn.Module):
    """Interface: ``forward(x, groups, valid, prev_top1, recompute) -> logits [T, E]``."""

    def __init__(self, hidden_size: int, num_groups: int, experts_per_group: int) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.weight = nn.Parameter(torch.empty(num_groups * experts_per_group, hidden_size))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # nn.Linear's default bound (kaiming-uniform, a=sqrt(5)).
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        self.weight.copy_((torch.rand(self.weight.shape, generator=generator) * 2 - 1) * bound)

    def group_logits(self, route_input: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Each token's own group's E logits of ``route_input`` [T, d] -> [T, E]."""
        E = self.experts_per_group
        # All groups' logits in one matmul ([T, C*E], C*E is small), then a gather.
        logits = F.linear(route_input.to(self.weight.dtype), self.weight)
        logits = logits.view(route_input.shape[0], self.num_groups, E)
        return logits.gather(1, groups.view(-1, 1, 1).expand(-1, 1, E)).squeeze(1)

    def forward(
        self, x: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
        prev_top1: torch.Tensor | None = None, recompute: bool = False,
    ) -> torch.Tensor:
        """x: router input [T, d]; groups: [T] in [0, C) (padding mapped to any group);
        valid: [T] real tokens; prev_top1: [T] each token's expert (within its group) in
        the previous MoCE layer of this forward, None if there is none; recompute: this call
        replays the forward under gradient checkpointing."""
        raise NotImplementedError


class LinearRouter(Router):
    """The paper's router: a linear map per group, softmax over that group's experts."""

    def forward(
        self, x: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
        prev_top1: torch.Tensor | None = None, recompute: bool = False,
    ) -> torch.Tensor:
        return self.group_logits(x, groups)


class ACMoERouter(Router):
    """Linear routing of ``M_{k(t)} x_t``, k(t) = the token's cluster (group, previous expert).

    Without a previous assignment (the first converted layer) it routes like
    :class:`LinearRouter`. The feature weights are a stop-gradient transform.
    """

    def __init__(self, hidden_size: int, num_groups: int, experts_per_group: int,
                 eps: float, clamp: float, momentum: float) -> None:
        super().__init__(hidden_size, num_groups, experts_per_group)
        self.eps, self.clamp, self.momentum = eps, clamp, momentum
        n = num_groups * experts_per_group
        # Running per-(group, expert) feature dispersions: saved with the weights, used in
        # eval/generation and for clusters too small in a batch.
        self.register_buffer("dispersion", torch.zeros(n, hidden_size))
        self.register_buffer("seen", torch.zeros(n))
        # (feature weights, clusters) of the last training forward: a gradient-checkpointing
        # replay must route exactly as the forward did and not update the statistics again.
        self._replay: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def feature_weights(
        self, x: torch.Tensor, clusters: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Feature weights M [C*E, d] from the dispersion of each cluster's tokens.

        Training: this batch's estimate where a cluster has >= 2 real tokens (the running
        estimate elsewhere), which also updates the running estimate; eval: the running one.
        """
        running, seen = self.dispersion, self.seen
        # Both cases of "has anything been seen" are chosen with torch.where, not a Python
        # branch on a tensor: no host sync, no graph break under torch.compile.
        if self.training or torch.compiler.is_compiling() or not bool(seen.any()):
            batch, counts = cluster_mad(x, clusters, valid, running.shape[0])
            enough = counts >= 2
            if self.training:
                m = self.momentum
                blended = torch.where(seen[:, None] > 0, m * running + (1 - m) * batch, batch)
                running.copy_(torch.where(enough[:, None], blended.to(running.dtype), running))
                seen.add_(enough.to(seen.dtype))
            # The mean dispersion of the clusters with enough tokens (ones if there is none).
            weight = enough.to(batch.dtype)[:, None]
            batch_mean = (batch * weight).sum(0, keepdim=True) / weight.sum().clamp(min=1.0)
            batch_mean = torch.where(enough.any(), batch_mean, torch.ones_like(batch_mean))
            fallback = torch.where(seen[:, None] > 0, running.float(),
                                   batch_mean.expand_as(batch))
            dispersion = torch.where(enough[:, None], batch, fallback)
            if not self.training:  # eval: the running estimate once anything was seen
                dispersion = torch.where(seen.any(), running.float(), dispersion)
        else:
            dispersion = running.float()
        return feature_weights(dispersion, self.eps, self.clamp)

    def forward(
        self, x: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
        prev_top1: torch.Tensor | None = None, recompute: bool = False,
    ) -> torch.Tensor:
        if recompute and self._replay is not None:
            weights_m, clusters = self._replay
        elif prev_top1 is None:
            self._replay = None
            return self.group_logits(x, groups)
        else:
            clusters = groups * self.experts_per_group + prev_top1.to(groups.device)
            weights_m = self.feature_weights(x, clusters, valid)
            self._replay = (weights_m, clusters) if self.training else None
        return self.group_logits(transform(x, weights_m, clusters), groups)


def build_router(config: MoCEConfig, hidden_size: int) -> Router:
    """The token-level router named by ``config.router``."""
    if config.router == "acmoe":
        return ACMoERouter(hidden_size, config.groups, config.experts_per_group,
                           config.acmoe_eps, config.acmoe_clamp, config.acmoe_momentum)
    if config.router == "linear":
        return LinearRouter(hidden_size, config.groups, config.experts_per_group)
    raise ConfigError(f"unknown moce.router {config.router!r}: use 'linear' or 'acmoe'.")


# 0.1.0 output folders (a supported format, tests/data/legacy_v0_1) name the router tensors
# with flat keys; load_moce_state_dict maps them to the Router module's keys (relative to
# ``layers.<i>.``) so those folders keep loading.
LEGACY_KEYS = {"router": "router.weight", "acmoe_dispersion": "router.dispersion",
               "acmoe_seen": "router.seen"}

# The same renames for PEFT adapter files (modules_to_save keys end in moce_experts.<name>),
# as regexes for PeftModel.from_pretrained(key_mapping=...).
LEGACY_PEFT_KEY_MAPPING = {rf"(\.moce_experts\.){old}$": rf"\g<1>{new}"
                           for old, new in LEGACY_KEYS.items()}

__all__ = ["ACMoERouter", "LEGACY_KEYS", "LEGACY_PEFT_KEY_MAPPING", "LinearRouter", "Router",
           "build_router"]
