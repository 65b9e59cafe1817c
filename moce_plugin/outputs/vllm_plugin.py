"""vLLM's entry point for MoCE exports (``vllm.general_plugins`` in pyproject.toml).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers)
before it reads a model's config. It teaches vLLM three things, all without
``--trust-remote-code``:

- the config of an export (``model_type: "moce"``): the base family's config plus the ``moce``
  block, with ``architectures`` read as ``MoCE<Base>ForCausalLM`` (the folder keeps
  ``["AutoModelForCausalLM"]`` for ``transformers serve``; only vLLM's view changes);
- those architectures (:mod:`.vllm_model`, imported lazily by vLLM's registry);
- their config hook: prefix caching off (a prefix's KV depends on its request's cluster), and
  eager execution where compiling is not supported: ACMoE routers (their statistics branch on
  data) and devices other than the CPU (CUDA graph capture of the MoCE layers is not tested).

This module imports vLLM only inside :func:`register`, so importing it never needs vLLM.
"""

from __future__ import annotations

import functools
from typing import Any

from ..model.architectures import supported_model_types
from .hf_native import BASE_TYPE_KEY, MOCE_KEY, MODEL_TYPE

#: The vLLM class of each MoCE family's base (``model_type`` -> vLLM architecture name).
VLLM_BASE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

#: The per-request field naming a cluster explicitly: ``SamplingParams(extra_args=...)``
#: offline, ``extra_body={"vllm_xargs": {"moce_cluster": 2}}`` with the OpenAI client.
CLUSTER_ARG = "moce_cluster"


def moce_architecture(base_model_type: str) -> str:
    """The vLLM architecture name of an export of a ``base_model_type`` model."""
    from ..errors import ExportError

    base = VLLM_BASE_ARCHITECTURES.get(base_model_type)
    if base is None:
        raise ExportError(
            f"MoCE exports of '{base_model_type}' models have no vLLM class. Served by vLLM: "
            f"{', '.join(sorted(VLLM_BASE_ARCHITECTURES))}; serve this one with `transformers "
            "serve EXPORT --trust-remote-code` instead.")
    return f"MoCE{base}"


def _config_class() -> type:
    """A config class registered for ``model_type: "moce"`` that builds the export's real
    config (the base family's, :func:`~.hf_native.moce_config_class`)."""
    from transformers import PretrainedConfig

    class MoCEVLLMConfig(PretrainedConfig):
        model_type = MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict: dict, **kwargs: Any) -> Any:
            base = config_dict.get(BASE_TYPE_KEY)
            moce_architecture(base)  # a family vLLM can't serve: say so before anything
            built = vllm_config_class(base).from_dict(config_dict, **kwargs)
            config = built[0] if isinstance(built, tuple) else built
            config.architectures = [moce_architecture(base)]
            return built

    return MoCEVLLMConfig


def _config_hook(base: type) -> type:
    """vLLM's per-architecture config hook (runs before the engine is built)."""
    import logging

    log = logging.getLogger("moce_plugin.vllm")

    class MoCEConfigHook(base):
        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            cache = vllm_config.cache_config
            if cache.enable_prefix_caching:
                # Two prompts sharing a prefix but not a cluster have different KV from the
                # first MoCE layer on: a cached prefix would leak one request's experts.
                cache.enable_prefix_caching = False
                log.info("MoCE: prefix caching off (the KV of a prefix depends on its cluster)")
            model = vllm_config.model_config
            reason = eager_reason(getattr(model.hf_config, MOCE_KEY, None) or {},
                                  str(vllm_config.device_config.device_type))
            if reason and not model.enforce_eager:
                model.enforce_eager = True
                log.info("MoCE: eager execution (%s)", reason)

    return MoCEConfigHook


def eager_reason(moce: dict, device_type: str) -> str | None:
    """Why an export must run eagerly in vLLM (None: vLLM may compile it)."""
    if moce.get("router") == "acmoe":
        return "the ACMoE router's statistics branch on data"
    if device_type != "cpu":
        return (f"compiled MoCE layers and CUDA graphs are tested on the CPU only, not "
                f"{device_type}")
    return None


_CONFIG_PREFIX = "MoCEVLLMConfig_"


@functools.cache
def vllm_config_class(base_model_type: str) -> type:
    """The export's config class (:func:`~.hf_native.moce_config_class`) under a name this
    module resolves, so vLLM can pickle configs to its engine process (spawned)."""
    from .hf_native import moce_config_class

    return type(f"{_CONFIG_PREFIX}{base_model_type}", (moce_config_class(base_model_type),),
                {"__module__": __name__})


def __getattr__(name: str) -> type:
    if name.startswith(_CONFIG_PREFIX):
        return vllm_config_class(name[len(_CONFIG_PREFIX):])
    raise AttributeError(name)


def register() -> None:
    """Register the MoCE config, architectures and config hook with vLLM (idempotent)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models import config as model_configs
    from vllm.transformers_utils import config as vllm_config

    if MODEL_TYPE not in vllm_config._CONFIG_REGISTRY:
        # dict.__setitem__: the registry's lazy __getitem__ returns classes as they are.
        vllm_config._CONFIG_REGISTRY[MODEL_TYPE] = _config_class()
    hook = _config_hook(model_configs.VerifyAndUpdateConfig)
    for model_type in supported_model_types():
        if model_type not in VLLM_BASE_ARCHITECTURES:
            continue
        arch = moce_architecture(model_type)
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"moce_plugin.outputs.vllm_model:{arch}")
        model_configs.MODELS_CONFIG_MAP[arch] = hook
