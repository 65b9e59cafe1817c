"""The MoCE layer the unit tests build: one ``MoCEExperts`` of width ``D`` with non-zero
up-projections (zero-initialised ones would make every adapter a no-op and every comparison
vacuous). Shared by test_layer, test_plans and test_teeth."""

from __future__ import annotations

import torch

from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.layer import MoCEExperts

D = 32


def make_config(top_k, general=0, groups=3, experts=4, general_top_k=None, seed=0,
                activation="sigmoid", router="linear") -> MoCEConfig:
    return MoCEConfig(
        num_clusters=groups,
        experts_per_group=experts,
        top_k=top_k,
        num_general_experts=general,
        general_top_k=general_top_k,
        adapter_dim=8,
        adapter_scaling=0.5,
        init_seed=seed,
        adapter_activation=activation,
        router=router,
    )


def make_experts(top_k, general=0, groups=3, experts=4, general_top_k=None, seed=0,
                 activation="sigmoid", router="linear") -> MoCEExperts:
    cfg = make_config(top_k, general, groups, experts, general_top_k, seed, activation, router)
    layer = MoCEExperts(D, cfg).train()
    with torch.no_grad():  # non-zero up-projections so the adapters matter
        layer.up.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return layer
