"""moce-plugin: Mixture-of-Clustered-Experts fine-tuning as an axolotl plugin.

Enable with ``plugins: [moce_plugin.MoCEPlugin]`` and a ``moce:`` block in the YAML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .architectures import ArchitectureSpec, register_architecture, supported_model_types
from .config import MoCEConfig
from .routing import cluster_ids_context

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .plugin import MoCEPlugin


def __getattr__(name: str) -> Any:
    # The plugin imports axolotl, which is heavy: load it only when asked for.
    if name == "MoCEPlugin":
        from .plugin import MoCEPlugin

        return MoCEPlugin
    raise AttributeError(name)


__all__ = [
    "ArchitectureSpec",
    "MoCEConfig",
    "MoCEPlugin",
    "cluster_ids_context",
    "register_architecture",
    "supported_model_types",
]
