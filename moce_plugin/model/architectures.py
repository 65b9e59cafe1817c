"""Registry of decoder families whose MLPs MoCE can upcycle.

A family is described by where its decoder layers live and what the MLP attribute of a
layer is called. Every family registered here has an MLP with signature
``mlp(hidden_states) -> hidden_states`` and decoder layers that receive the model's
``**kwargs`` (how the cluster ids reach them). To add one, check both in its
``modeling_*.py`` and call :func:`register_architecture` (and add it to the tiny-model
test in ``tests/unit/test_model.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    model_type: str
    layers_path: str = "model.layers"  # from the *ForCausalLM module
    mlp_attr: str = "mlp"


_REGISTRY: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec) -> None:
    _REGISTRY[spec.model_type] = spec


for _model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
    register_architecture(ArchitectureSpec(_model_type))


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture(model_type: str | None) -> ArchitectureSpec:
    spec = _REGISTRY.get(model_type or "")
    if spec is None:
        raise UnsupportedArchitectureError(
            f"MoCE does not support model_type '{model_type}'. Supported: "
            f"{', '.join(supported_model_types())}. To add a decoder family whose layers take "
            "**kwargs and whose MLP maps hidden_states -> hidden_states, call "
            "moce_plugin.register_architecture(moce_plugin.ArchitectureSpec("
            "'<model_type>', layers_path='model.layers', mlp_attr='mlp')) before training "
            "(see docs/architectures.md)."
        )
    return spec


def decoder_layers(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    module: nn.Module = model
    for part in spec.layers_path.split("."):
        if not hasattr(module, part):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no '{spec.layers_path}' for model_type "
                f"'{spec.model_type}'; MoCE expects a *ForCausalLM model."
            )
        module = getattr(module, part)
    if not isinstance(module, nn.ModuleList):
        raise UnsupportedArchitectureError(f"'{spec.layers_path}' is not a ModuleList")
    return module
