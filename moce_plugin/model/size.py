"""How many parameters and bytes the MoCE modules add, checked before they are allocated.

A typo such as ``adapter_dim: 1e9`` would otherwise surface as a bare allocation failure
(hundreds of GB) from deep inside torch; the message here names the figure and the options
that make it.
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import ConfigError
from .config import MoCEConfig

LOG = logging.getLogger(__name__)


class MoCESizeError(ConfigError):
    """The MoCE modules of a configuration cannot fit in memory."""


def moce_parameter_count(config: MoCEConfig, hidden_size: int, num_layers: int) -> int:
    """Parameters of the MoCE modules of ``num_layers`` layers (router, general router,
    down and up adapters of every expert), as :class:`~.layer.MoCEExperts` allocates them."""
    routed = config.groups * config.experts_per_group
    experts = routed + config.num_general_experts
    per_layer = (routed * hidden_size + config.num_general_experts * hidden_size
                 + 2 * experts * hidden_size * config.adapter_dim)
    if config.router == "acmoe":  # buffers: running dispersions and counts
        per_layer += routed * hidden_size + routed
    return per_layer * num_layers


def _memory_limit(device: torch.device | None) -> tuple[int | None, str]:
    """Total memory of the device the MoCE modules are built on (bytes, name)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory, str(device)
    if device is not None and device.type == "meta":
        return None, "meta"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the machine's RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_moce_size(config: MoCEConfig, hidden_size: int, num_layers: int,
                    dtype: torch.dtype, device: torch.device | None = None,
                    base_parameters: int | None = None) -> int:
    """Log how many parameters and bytes MoCE adds; refuse a size larger than the memory
    of the device it is built on. Returns the parameter count."""
    params = moce_parameter_count(config, hidden_size, num_layers)
    nbytes = params * torch.empty((), dtype=dtype).element_size()
    share = f" ({params / base_parameters:.2%} of the base's {base_parameters:,})" if (
        base_parameters) else ""
    LOG.info("MoCE adds %s parameters%s, %s in %s", f"{params:,}", share, _gb(nbytes), dtype)
    # Built on the default device (meta under from_pretrained: nothing allocated), then
    # moved to the base layer's device: both must hold it.
    built_on = torch.empty(()).device
    for place in {built_on, device} if built_on.type != "meta" else ():
        _refuse_if_larger(config, params, nbytes, dtype, hidden_size, num_layers, place)
    return params


def _refuse_if_larger(config: MoCEConfig, params: int, nbytes: int, dtype: torch.dtype,
                      hidden_size: int, num_layers: int, device: torch.device | None) -> None:
    limit, where = _memory_limit(device)
    if limit is not None and nbytes > limit:
        raise MoCESizeError(
            f"MoCE would add {params:,} parameters ({_gb(nbytes)} in {dtype}) over {num_layers} "
            f"layers, more than {where} holds ({_gb(limit)}): {config.groups} groups x "
            f"{config.experts_per_group} experts + {config.num_general_experts} general, "
            f"adapter_dim {config.adapter_dim}, hidden size {hidden_size}. Lower "
            "moce.adapter_dim / moce.experts_per_group, or convert fewer moce.layers."
        )
