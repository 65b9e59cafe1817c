"""The MoCE model: torch only (no axolotl, no files).

:mod:`.config` the ``moce:`` hyper-parameters; :mod:`.layer` the upcycled MLP;
:mod:`.plans` the expert execution plans by name; :mod:`.dispatch` rows sorted by expert or
set; :mod:`.expert_ops` the grouped adapter compute; :mod:`.losses` load balancing;
:mod:`.routing` the per-forward cluster-id context; :mod:`.architectures` the decoder
families; :mod:`.upcycle` turning a loaded decoder into MoCE and MoCE state dicts.
"""

from .config import MoCEConfig
from .layer import MoCEExperts, MoCEMLP
from .upcycle import (
    is_moce_model,
    load_moce_state_dict,
    moce_experts_modules,
    moce_layers,
    moce_state_dict,
    upcycle_model,
)

__all__ = [
    "MoCEConfig",
    "MoCEExperts",
    "MoCEMLP",
    "is_moce_model",
    "load_moce_state_dict",
    "moce_experts_modules",
    "moce_layers",
    "moce_state_dict",
    "upcycle_model",
]
