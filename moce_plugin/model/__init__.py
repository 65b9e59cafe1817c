"""The MoCE model: torch only (no axolotl, no files).

:mod:`.config` the ``moce:`` hyper-parameters; :mod:`.layer` the upcycled MLP;
:mod:`.plans` the expert execution plans by name; :mod:`.dispatch` rows sorted by expert or
set; :mod:`.expert_ops` the grouped adapter compute; :mod:`.losses` load balancing;
:mod:`.cluster_ids` the cluster-id names and their one check; :mod:`.routing` the
per-forward cluster-id context and routing records (all per-thread state);
:mod:`.metrics` running routing statistics; :mod:`.architectures` the decoder families;
:mod:`.upcycle` turning a loaded decoder into MoCE (hooks, replacement); :mod:`.wrappers`
finding MoCE parts through PEFT/DDP/compile wrappers; :mod:`.state_dict` MoCE state dicts.
"""

from .config import MoCEConfig
from .layer import MoCEExperts, MoCEMLP
from .state_dict import load_moce_state_dict, moce_state_dict
from .upcycle import upcycle_model
from .wrappers import is_moce_model, moce_experts_modules, moce_layers

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
