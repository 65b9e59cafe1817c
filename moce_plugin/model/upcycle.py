"""Upcycling a loaded decoder model into MoCE, and the hooks that drive routing.

``upcycle_model`` replaces the MLP of each selected decoder layer by a
:class:`~moce_plugin.model.layer.MoCEMLP` (the original MLP kept, frozen, inside it) and
installs three hooks:

* on the backbone (the module owning the decoder layers): checks the batch's
  ``moce_cluster_ids`` once per forward and collects the routing records of that
  forward (aux loss with grad, detached expert-load statistics);
* on each converted decoder layer: moves ``moce_cluster_ids`` from the layer's call
  kwargs into the thread-local routing context (see :mod:`moce_plugin.model.routing`).

The records of the last forward are kept per thread and per backbone
(:mod:`moce_plugin.model.routing`) and read by the trainer integration
(:mod:`moce_plugin.integration.trainer`) to add the load-balancing loss. Finding the MoCE parts
of a wrapped model is :mod:`.wrappers`' job, the running statistics :mod:`.metrics`', the MoCE
state dicts :mod:`.state_dict`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures import ArchitectureSpec, decoder_layers, get_architecture
from .cluster_ids import check_cluster_ids
from .config import MoCEConfig
from .layer import MoCEMLP
from .metrics import RoutingMetrics
from .routing import (
    CLUSTER_IDS_KWARG,
    MissingClusterIdsError,
    aux_loss_of,  # noqa: F401 - re-exported, see below
    collector_stack,
    current_cluster_ids,
    keep_last_records,
    pop_cluster_ids,
    push_cluster_ids,
)
from .size import check_moce_size

# The routing records, metrics, wrapper lookups and state dicts have their own modules; their
# names stay importable from here for the code and tests that read them here.
from .state_dict import load_moce_state_dict, moce_state_dict  # noqa: F401
from .wrappers import (  # noqa: F401
    config_of,
    find_backbone,
    is_moce_model,
    metrics_of,
    moce_experts_modules,
    moce_layers,
    pop_last_routing,
    unwrap_model,
)

#: The attribute of :class:`~moce_plugin.model.layer.MoCEMLP` holding the trainable part:
#: every MoCE parameter's name contains ``.moce_experts.`` (how saves and freezing find them).
MOCE_MODULE_NAME = "moce_experts"


# ---- hooks --------------------------------------------------------------------------------
def validate_cluster_ids(ids: Any, num_groups: int) -> torch.Tensor:
    """The forward's ``moce_cluster_ids``, checked once per forward (dtype and values)."""
    if ids is None:
        raise MissingClusterIdsError()
    return check_cluster_ids(
        ids, num_groups,
        fix=f". The cluster ids do not match the model (moce.num_clusters={num_groups}): "
            "re-run preprocess/cluster.py with this k, or fix the data's cluster column.")


def _backbone_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    validate_cluster_ids(kwargs.get(CLUSTER_IDS_KWARG), module._moce_config.groups)
    collector_stack().append([])


def _backbone_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    stack = collector_stack()
    records = stack.pop() if stack else []
    if module.training and not torch.is_grad_enabled():
        # A training-mode forward without grad is a preference trainer's reference forward
        # through this same model (DPO with the LoRA adapter disabled): not the policy's
        # routing, so it neither replaces the records whose aux loss the trainer adds nor
        # counts in the routing metrics.
        return
    keep_last_records(module, records)
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
    causal_lm = unwrap_model(model)
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
            param.requires_grad_(f".{MOCE_MODULE_NAME}." in name)
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
