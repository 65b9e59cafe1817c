"""MoCE state dicts: only the MoCE tensors, keyed ``layers.<i>.<name>`` (independent of
wrappers and of which layers of which family were converted), gathered when sharded, and
read back also from files saved with the pre-router-module key names."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LoadError
from .routers import LEGACY_KEYS
from .wrappers import moce_experts_modules


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached, also when sharded: FSDP2 DTensors and DeepSpeed ZeRO-3
    partitions are gathered (a collective: every rank must call this)."""
    if hasattr(p, "full_tensor"):  # FSDP2 / DTensor
        return p.full_tensor().detach()
    if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().clone()
    return p.detach()


def moce_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the MoCE parameters, keyed ``layers.<i>.<param>`` (independent of wrappers).

    Under FSDP2 / ZeRO-3 this gathers the shards, so call it on every rank."""
    out = {}
    for _, module in moce_experts_modules(model):
        for pname, p in module.named_parameters():
            out[f"layers.{module.layer_index}.{pname}"] = full_tensor(p).cpu().contiguous()
        for bname, b in module.named_buffers():  # ACMoE running statistics
            out[f"layers.{module.layer_index}.{bname}"] = b.detach().cpu().contiguous()
    return out


def _remap_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of the 0.1.0 weights format (``layers.<i>.router``,
    ``layers.<i>.acmoe_dispersion``, ``layers.<i>.acmoe_seen``) -> current names."""
    out = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        if prefix.startswith("layers.") and prefix.count(".") == 1 and name in LEGACY_KEYS:
            key = f"{prefix}.{LEGACY_KEYS[name]}"
        out[key] = value
    return out


def load_moce_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`moce_state_dict` (also reads files saved with the pre-router-module
    key names); shape mismatches are explained."""
    modules = {m.layer_index: m for _, m in moce_experts_modules(model)}
    state = _remap_legacy_keys(state)

    def tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return list(m.named_parameters()) + list(m.named_buffers())

    expected = {f"layers.{i}.{n}" for i, m in modules.items() for n, _ in tensors(m)}
    missing = expected - set(state)
    unexpected = set(state) - expected
    if missing or unexpected:
        raise LoadError(
            f"MoCE weights do not match this model: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}. Was it trained with another moce config "
            "(layers, groups, experts, general experts)?"
        )
    with torch.no_grad():
        for i, module in modules.items():
            for n, p in tensors(module):
                src = state[f"layers.{i}.{n}"]
                if src.shape != p.shape:
                    raise LoadError(
                        f"MoCE weight layers.{i}.{n} has shape {tuple(src.shape)}, the model "
                        f"expects {tuple(p.shape)}: the moce config differs from training."
                    )
                p.copy_(src.to(p.dtype))
