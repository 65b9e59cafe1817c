"""moce-plugin: Mixture-of-Clustered-Experts fine-tuning as an axolotl plugin.

Enable with ``plugins: [moce_plugin.MoCEPlugin]`` and a ``moce:`` block in the YAML.
The sub-packages name the parts (map: ``moce_plugin/README.md``):

* :mod:`moce_plugin.integration`: everything that knows axolotl exists;
* :mod:`moce_plugin.model`: the MoCE layer, routers, expert compute, losses (torch only);
* :mod:`moce_plugin.clustering`: stage 1 and the request text every path shares;
* :mod:`moce_plugin.outputs`: the output-folder format and what reads it (load, generate,
  export, lm-eval, usage).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model.architectures import ArchitectureSpec, register_architecture, supported_model_types
from .model.config import MoCEConfig
from .model.routing import cluster_ids_context

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .integration.plugin import MoCEPlugin
    from .outputs.load import load_moce_model


def __getattr__(name: str) -> Any:
    # The plugin imports axolotl, which is heavy: load it only when asked for.
    if name == "MoCEPlugin":
        from .integration.plugin import MoCEPlugin

        return MoCEPlugin
    if name == "load_moce_model":
        from .outputs.load import load_moce_model

        return load_moce_model
    raise AttributeError(name)


__all__ = [
    "ArchitectureSpec",
    "MoCEConfig",
    "MoCEPlugin",
    "cluster_ids_context",
    "load_moce_model",
    "register_architecture",
    "supported_model_types",
]
