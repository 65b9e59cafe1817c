"""Running routing statistics between two logging steps (what the trainer logs)."""

from __future__ import annotations

import torch

from .routing import RoutingRecord


class RoutingMetrics:
    """Running sums of detached routing statistics between two logging steps.

    Updated on device without host syncs; read (and reset) at logging time.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # A tensor on the statistics' device, not an int: torch.compile specialises on int
        # attributes and would recompile the backbone's post-hook at every step.
        self._steps: torch.Tensor | None = None
        self.aux_sum: torch.Tensor | None = None
        self.load_sum: dict[int, torch.Tensor] = {}  # layer -> [C, E] token-weighted load
        self.tokens_sum: dict[int, torch.Tensor] = {}  # layer -> [C]
        self.entropy_sum: dict[int, torch.Tensor] = {}
        self.general_load_sum: dict[int, torch.Tensor] = {}

    def update(self, records: list[RoutingRecord]) -> None:
        records = [r for r in records if r.aux_loss is not None]
        if not records:
            return
        aux = torch.stack([r.aux_loss.detach() for r in records]).mean()
        self._steps = aux.new_ones(()) if self._steps is None else self._steps + 1
        self.aux_sum = aux if self.aux_sum is None else self.aux_sum + aux
        for r in records:
            i = r.layer_index
            weighted = r.expert_load * r.group_tokens[:, None]
            self.load_sum[i] = self.load_sum.get(i, 0) + weighted
            self.tokens_sum[i] = self.tokens_sum.get(i, 0) + r.group_tokens
            self.entropy_sum[i] = self.entropy_sum.get(i, 0) + r.entropy
            if r.general_load is not None:
                self.general_load_sum[i] = self.general_load_sum.get(i, 0) + r.general_load

    @property
    def steps(self) -> int:
        """Forwards counted since the last reset (one host read, at logging time)."""
        return 0 if self._steps is None else int(self._steps.item())

    def expert_load(self, layer: int) -> torch.Tensor:
        """Token-weighted mean expert load [C, E] of ``layer`` since the last reset."""
        return self.load_sum[layer] / self.tokens_sum[layer].clamp(min=1)[:, None]
