"""Test-only axolotl plugin: gives the ranks different cluster mixes. Rank 0 sees only
cluster 0 (every id becomes 0), rank 1 never sees cluster 0 (0 becomes 1). Padding (-1) is
kept. Used to check that ranks with different routing neither hang under ZeRO-3 / FSDP2 nor
log rank 0's routing statistics only."""

from __future__ import annotations

import os
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin

from moce_plugin.model.routing import CLUSTER_IDS_KWARG


def remap_for_rank(ids: torch.Tensor, rank: int) -> torch.Tensor:
    valid = ids >= 0
    if rank == 0:
        return torch.where(valid, torch.zeros_like(ids), ids)
    return torch.where(valid & (ids == 0), torch.ones_like(ids), ids)


class _RankClusterCollator:
    def __init__(self, inner: Any, rank: int) -> None:
        self.inner = inner
        self.rank = rank

    def __call__(self, features: Any) -> dict:
        batch = self.inner(features)
        batch[CLUSTER_IDS_KWARG] = remap_for_rank(batch[CLUSTER_IDS_KWARG], self.rank)
        return batch


class RankClusterPlugin(BasePlugin):
    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        # Runs after MoCEPlugin's hook (plugins are called in the YAML's order), so the
        # collator being wrapped already adds moce_cluster_ids.
        trainer.data_collator = _RankClusterCollator(
            trainer.data_collator, int(os.environ.get("RANK", "0"))
        )
