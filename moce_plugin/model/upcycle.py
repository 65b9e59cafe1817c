"""Upcycling a loaded decoder model into MoCE, and the hooks that drive routing.

``upcycle_model`` replaces the MLP of each selected decoder layer by a
:class:`~moce_plugin.model.layer.MoCEMLP` (the original MLP kept, frozen, inside it) and
installs three hooks:

* on the backbone (the module owning the decoder layers): checks the batch's
  ``moce_cluster_ids`` once per forward and collects the routing records of that
  forward (aux loss with grad, detached expert-load statistics);
* on each converted decoder layer: moves ``moce_cluster_ids`` from the layer's call
  kwargs into the thread-local routing context (see :mod:`moce_plugin.model.routing`).

The records of the last forward are kept per thread and per backbone, and read by the
trainer integration (:mod:`moce_plugin.integration.trainer`) to add the load-balancing loss.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .architectures import ArchitectureSpec, decoder_layers, get_architecture
from .config import MoCEConfig
from .layer import MoCEExperts, MoCEMLP
from .routers import LEGACY_KEYS
from .routing import (
    CLUSTER_IDS_KWARG,
    IGNORE_CLUSTER_ID,
    InvalidClusterIdsError,
    MissingClusterIdsError,
    RoutingRecord,
    collector_stack,
    current_cluster_ids,
    pop_cluster_ids,
    push_cluster_ids,
)
from .size import check_moce_size

_local = threading.local()


# ---- routing records of the last forward --------------------------------------------------
def _last_records() -> dict[int, list[RoutingRecord]]:
    if not hasattr(_local, "last"):
        _local.last = {}
    return _local.last


def pop_last_routing(model: nn.Module) -> list[RoutingRecord]:
    """Routing records of ``model``'s last forward on this thread (consumed)."""
    backbone = find_backbone(model)
    if backbone is None:
        return []
    return _last_records().pop(id(backbone), [])


def aux_loss_of(records: list[RoutingRecord]) -> torch.Tensor | None:
    """Load-balancing loss averaged over converted layers."""
    losses = [r.aux_loss for r in records if r.aux_loss is not None]
    if not losses:
        return None
    return torch.stack(losses).mean()


class RoutingMetrics:
    """Running sums of detached routing statistics between two logging steps.

    Updated on device without host syncs; read (and reset) at logging time.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.aux_sum: torch.Tensor | None = None
        self.load_sum: dict[int, torch.Tensor] = {}  # layer -> [C, E] token-weighted load
        self.tokens_sum: dict[int, torch.Tensor] = {}  # layer -> [C]
        self.entropy_sum: dict[int, torch.Tensor] = {}
        self.general_load_sum: dict[int, torch.Tensor] = {}

    def update(self, records: list[RoutingRecord]) -> None:
        records = [r for r in records if r.aux_loss is not None]
        if not records:
            return
        self.steps += 1
        aux = torch.stack([r.aux_loss.detach() for r in records]).mean()
        self.aux_sum = aux if self.aux_sum is None else self.aux_sum + aux
        for r in records:
            i = r.layer_index
            weighted = r.expert_load * r.group_tokens[:, None]
            self.load_sum[i] = self.load_sum.get(i, 0) + weighted
            self.tokens_sum[i] = self.tokens_sum.get(i, 0) + r.group_tokens
            self.entropy_sum[i] = self.entropy_sum.get(i, 0) + r.entropy
            if r.general_load is not None:
                self.general_load_sum[i] = self.general_load_sum.get(i, 0) + r.general_load

    def expert_load(self, layer: int) -> torch.Tensor:
        """Token-weighted mean expert load [C, E] of ``layer`` since the last reset."""
        return self.load_sum[layer] / self.tokens_sum[layer].clamp(min=1)[:, None]


# ---- finding things ---------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
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
    return getattr(_unwrap(model), "_moce_backbone", None)


def moce_layers(model: nn.Module) -> Iterator[MoCEMLP]:
    for module in model.modules():
        if isinstance(module, MoCEMLP):
            yield module


def moce_experts_modules(model: nn.Module) -> Iterator[tuple[str, MoCEExperts]]:
    """Trainable MoCE modules, by name (the active copy under PEFT's modules_to_save)."""
    for name, module in model.named_modules():
        if isinstance(module, MoCEExperts) and "original_module" not in name:
            yield name, module


def is_moce_model(model: nn.Module) -> bool:
    return find_backbone(model) is not None


def metrics_of(model: nn.Module) -> RoutingMetrics | None:
    backbone = find_backbone(model)
    return getattr(backbone, "_moce_metrics", None)


def config_of(model: nn.Module) -> MoCEConfig | None:
    return getattr(_unwrap(model), "_moce_config", None)


# ---- hooks --------------------------------------------------------------------------------
def validate_cluster_ids(ids: Any, num_groups: int) -> torch.Tensor:
    if ids is None:
        raise MissingClusterIdsError(
            "The MoCE model was called without `moce_cluster_ids`. Pass cluster ids per "
            "sequence ([B]) or per token ([B, S], -1 for padding) to forward/generate; "
            "moce_plugin.inference assigns them from text. In axolotl training the MoCE "
            "collator adds them: check `plugins: [moce_plugin.MoCEPlugin]` is in the YAML."
        )
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InvalidClusterIdsError(
            f"moce_cluster_ids must be integers, got dtype {ids.dtype}"
        )
    bad = (ids != IGNORE_CLUSTER_ID) & ((ids < 0) | (ids >= num_groups))
    if ids.device.type == "cpu":
        if bool(bad.any()):
            raise InvalidClusterIdsError(
                f"moce_cluster_ids contains {sorted(set(ids[bad].tolist()))[:5]}, outside "
                f"[0, {num_groups}) (moce.num_clusters={num_groups}). The cluster ids do not "
                "match the model: re-run preprocess/cluster.py with this k, or fix the data's "
                "cluster column."
            )
    else:  # no host sync on accelerators
        torch._assert_async(~bad.any(), "moce_cluster_ids outside [0, num_clusters)")
    return ids


def _backbone_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    validate_cluster_ids(kwargs.get(CLUSTER_IDS_KWARG), module._moce_config.groups)
    collector_stack().append([])


def _backbone_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    stack = collector_stack()
    records = stack.pop() if stack else []
    _last_records()[id(module)] = records
    if module.training:
        module._moce_metrics.update(records)


def _layer_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    ids = kwargs.pop(CLUSTER_IDS_KWARG, None)
    # Always push (re-pushing the current ids if the call carried none) so the post-hook's
    # pop stays balanced.
    push_cluster_ids(ids if ids is not None else current_cluster_ids())
    return args, kwargs


def _layer_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    pop_cluster_ids()


# ---- upcycling ---------------------------------------------------------------------------
def upcycle_model(
    model: nn.Module,
    config: MoCEConfig,
    dtype: torch.dtype | None = None,
    freeze_base: bool = True,
) -> nn.Module:
    """Convert ``model`` (a supported *ForCausalLM) in place; returns it.

    Args:
        config: resolved MoCE config (num_clusters an int).
        dtype: dtype of the new MoCE parameters (default: the embedding's dtype; for a
            quantized base pass the compute dtype).
        freeze_base: freeze every non-MoCE parameter (the paper's setting).
    """
    causal_lm = _unwrap(model)
    if is_moce_model(causal_lm):
        return model
    # An exported MoCE config (model_type "moce") records its base family beside it.
    model_type = getattr(causal_lm.config, "moce_base_model_type", None) or getattr(
        causal_lm.config, "model_type", None)
    spec: ArchitectureSpec = get_architecture(model_type)
    layers = decoder_layers(causal_lm, spec)
    hidden_size = causal_lm.config.hidden_size
    if dtype is None:
        dtype = causal_lm.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
    selected = config.resolve_layers(len(layers))
    check_moce_size(config, hidden_size, len(selected), dtype,
                    _module_device(getattr(layers[selected[0]], spec.mlp_attr)),
                    sum(p.numel() for p in causal_lm.parameters()))
    for index in selected:
        layer = layers[index]
        base_mlp = getattr(layer, spec.mlp_attr)
        device = _module_device(base_mlp)
        moce_mlp = MoCEMLP(base_mlp, hidden_size, config, index)
        if next(moce_mlp.moce_experts.parameters()).is_meta:  # under from_pretrained's meta
            device = torch.device("meta")
        moce_mlp.moce_experts.to(device=device, dtype=dtype)
        moce_mlp.train(base_mlp.training)  # new modules start in the model's mode
        setattr(layer, spec.mlp_attr, moce_mlp)
        layer.register_forward_pre_hook(_layer_pre_hook, with_kwargs=True)
        layer.register_forward_hook(_layer_post_hook, with_kwargs=True, always_call=True)
    # The backbone is the module that owns the layers list (LlamaModel, ...).
    parent_path = spec.layers_path.rsplit(".", 1)[0] if "." in spec.layers_path else ""
    backbone = causal_lm
    for part in filter(None, parent_path.split(".")):
        backbone = getattr(backbone, part)
    backbone._moce_config = config
    backbone._moce_metrics = RoutingMetrics()
    backbone.register_forward_pre_hook(_backbone_pre_hook, with_kwargs=True)
    backbone.register_forward_hook(_backbone_post_hook, with_kwargs=True, always_call=True)
    # Plain attribute, not a registered submodule (that would duplicate every weight in
    # state_dict under a second name).
    object.__setattr__(causal_lm, "_moce_backbone", backbone)
    _accept_cluster_ids_in_generate(causal_lm)
    causal_lm._moce_config = config
    causal_lm._moce_layers = selected
    if freeze_base:
        for name, param in causal_lm.named_parameters():
            param.requires_grad_(".moce_experts." in name)
    else:
        for module in moce_layers(causal_lm):
            module.moce_experts.requires_grad_(True)
    return model


def _accept_cluster_ids_in_generate(causal_lm: nn.Module) -> None:
    """`generate` rejects kwargs that are not named in forward's signature; ours travels in
    **kwargs, so let it through (it is then passed to every forward step)."""
    original = getattr(causal_lm, "_validate_model_kwargs", None)
    if original is None:
        return

    def _validate_model_kwargs(model_kwargs: dict) -> None:
        ids = model_kwargs.pop(CLUSTER_IDS_KWARG, None)
        try:
            original(model_kwargs)
        finally:
            if ids is not None:
                model_kwargs[CLUSTER_IDS_KWARG] = ids

    causal_lm._validate_model_kwargs = _validate_model_kwargs


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def cast_moce_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep MoCE in the training dtype: PEFT's prepare_model_for_kbit_training upcasts every
    non-quantized parameter to float32, which on GPUs would also push the experts off the
    bf16 grouped-GEMM kernel."""
    for _, module in moce_experts_modules(model):
        module.to(dtype=dtype)


def _full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter, also when sharded: FSDP2 DTensors and DeepSpeed ZeRO-3
    partitions are gathered (a collective: every rank must call this)."""
    if hasattr(p, "full_tensor"):  # FSDP2 / DTensor
        return p.full_tensor()
    if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().clone()
    return p


def moce_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the MoCE parameters, keyed ``layers.<i>.<param>`` (independent of wrappers).

    Under FSDP2 / ZeRO-3 this gathers the shards, so call it on every rank."""
    out = {}
    for _, module in moce_experts_modules(model):
        for pname, p in module.named_parameters():
            full = _full_tensor(p)
            out[f"layers.{module.layer_index}.{pname}"] = full.detach().cpu().contiguous()
        for bname, b in module.named_buffers():  # ACMoE running statistics
            out[f"layers.{module.layer_index}.{bname}"] = b.detach().cpu().contiguous()
    return out


def _remap_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys saved before the router was a module (``layers.<i>.router``,
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
        raise ValueError(
            f"MoCE weights do not match this model: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}. Was it trained with another moce config "
            "(layers, groups, experts, general experts)?"
        )
    with torch.no_grad():
        for i, module in modules.items():
            for n, p in tensors(module):
                src = state[f"layers.{i}.{n}"]
                if src.shape != p.shape:
                    raise ValueError(
                        f"MoCE weight layers.{i}.{n} has shape {tuple(src.shape)}, the model "
                        f"expects {tuple(p.shape)}: the moce config differs from training."
                    )
                p.copy_(src.to(p.dtype))
