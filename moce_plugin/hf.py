"""The stable import path of exported folders' remote code.

An export (``moce-export OUTPUT_DIR DEST``) writes ``configuration_moce.py`` and
``modeling_moce.py`` that import :func:`moce_config_class` and :func:`moce_causal_lm_class`
from here. Those files live on disk and on the Hub long after the package that wrote them, so
this module is a promise: these names keep their meaning and this path never moves, whatever
happens to the modules behind it (today :mod:`moce_plugin.outputs.hf_native`).

Exports written by 0.1.x import ``moce_plugin.outputs.hf_native`` directly; that path is kept
working too (``tests/unit/test_public_surface.py`` loads both kinds of remote code).

Use it yourself only to build the classes without an export folder::

    from moce_plugin.hf import moce_causal_lm_class, moce_config_class

    config_class = moce_config_class("llama")
    model_class = moce_causal_lm_class(config_class)
"""

from __future__ import annotations

from .outputs.hf_native import (
    MODEL_TYPE,
    MoCECausalLMMixin,
    MoCEExportError,
    moce_causal_lm_class,
    moce_config_class,
)

__all__ = [
    "MODEL_TYPE",
    "MoCECausalLMMixin",
    "MoCEExportError",
    "moce_causal_lm_class",
    "moce_config_class",
]
