"""Finding MoCE parts through wrappers: PEFT, DDP and ``torch.compile`` wrap the upcycled
model, and every question about it (is it MoCE, its config, backbone, metrics, last routing
records, its MoCE modules) is asked of the unwrapped ``*ForCausalLM``, where
:func:`~moce_plugin.model.upcycle.upcycle_model` left its attributes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import nn

from .layer import MoCEExperts, MoCEMLP
from .routing import RoutingRecord, pop_last_records

if TYPE_CHECKING:
    from .config import MoCEConfig
    from .metrics import RoutingMetrics


def unwrap_model(model: nn.Module) -> nn.Module:
    """PeftModel / DDP / compiled wrappers -> the underlying *ForCausalLM."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            get_base = getattr(model, "get_base_model", None)
            if callable(get_base):
                model = get_base()
    return model


def find_backbone(model: nn.Module) -> nn.Module | None:
    """The module owning the decoder layers (LlamaModel, ...), which runs the routing hooks."""
    return getattr(unwrap_model(model), "_moce_backbone", None)


def is_moce_model(model: nn.Module) -> bool:
    return find_backbone(model) is not None


def metrics_of(model: nn.Module) -> RoutingMetrics | None:
    backbone = find_backbone(model)
    return getattr(backbone, "_moce_metrics", None)


def config_of(model: nn.Module) -> MoCEConfig | None:
    return getattr(unwrap_model(model), "_moce_config", None)


def pop_last_routing(model: nn.Module) -> list[RoutingRecord]:
    """Routing records of ``model``'s last forward on this thread (consumed)."""
    return pop_last_records(find_backbone(model))


def moce_layers(model: nn.Module) -> Iterator[MoCEMLP]:
    for module in model.modules():
        if isinstance(module, MoCEMLP):
            yield module


def moce_experts_modules(model: nn.Module) -> Iterator[tuple[str, MoCEExperts]]:
    """Trainable MoCE modules, by name (the active copy under PEFT's modules_to_save)."""
    for name, module in model.named_modules():
        if isinstance(module, MoCEExperts) and "original_module" not in name:
            yield name, module
