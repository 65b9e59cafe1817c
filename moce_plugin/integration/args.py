"""Pydantic input arguments that axolotl merges into its config schema.

Everything that can be checked without loading a model is checked here, so a bad
``moce:`` block fails at config load with a message that names the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_serializer, field_validator, model_validator

from ..clustering import ClusteringOptions, ClusterModel
from ..model.architectures import get_architecture
from ..model.config import MoCEConfig
from ..utils import read_json
from .continuation import prepare_continuation

SUPPORTED_ADAPTERS = (None, "lora", "qlora")

# (option, the one allowed value besides unset/false, why MoCE can't honour anything else)
#: Preference tuning axolotl runs with MoCE: each row's cluster (its prompt's) reaches the
#: policy's and the reference's forwards (integration/preference.py).
SUPPORTED_RL = ("dpo", "ipo", "orpo", "kto")

UNSUPPORTED_OPTIONS = (
    ("streaming", None, "streamed datasets bypass the step that attaches cluster ids; "
     "prepare the dataset (streaming: false)."),
    ("pretraining_dataset", None, "pretraining streams bypass the cluster-id step; use "
     "`datasets:` with a completion type."),
    ("batch_flattening", None, "its collator concatenates a batch into one row without the "
     "per-token ids; use sample_packing: true."),
    ("tensor_parallel_size", 1, "MoCE experts are not tensor-parallel; use DDP, FSDP or "
     "DeepSpeed."),
    ("context_parallel_size", 1, "sequence splitting across ranks does not split the per-token "
     "cluster ids; use sample_packing with DDP/FSDP/DeepSpeed."),
)


class MoCEOptions(MoCEConfig):
    """The ``moce:`` block as axolotl validates it: :class:`MoCEConfig` with ``clustering``
    typed as :class:`ClusteringOptions` (stage 1's options, checked at config load).

    It serialises ``clustering`` back to the options the YAML set (those differing from their
    defaults), so the ``moce_config.json`` a run writes stays readable by :class:`MoCEConfig`
    alone: :mod:`moce_plugin.outputs` loads it without importing the integration."""

    clustering: ClusteringOptions = Field(  # type: ignore[assignment]
        default_factory=ClusteringOptions,
        description="Options of stage 1 (moce-cluster / preprocess/cluster.py): embedding "
        "model, text template, k_max, seed, ...; see docs/clustering.md. Training reads only "
        "the artifact.",
    )

    @field_validator("clustering", mode="before")
    @classmethod
    def _clustering_options(cls, value: Any) -> ClusteringOptions:
        if value is None or isinstance(value, ClusteringOptions):
            return value or ClusteringOptions()
        if not isinstance(value, Mapping):
            raise ValueError(
                f"moce.clustering must be a mapping of options (see docs/clustering.md), got "
                f"{type(value).__name__}: {value!r}."
            )
        return ClusteringOptions.from_dict(value)

    @field_serializer("clustering")
    def _clustering_as_set(self, options: ClusteringOptions) -> dict[str, Any]:
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                if getattr(options, f.name) != f.default}


class MoCEArgs(BaseModel):
    """``moce:`` block of the axolotl YAML (see :class:`MoCEOptions`)."""

    moce: MoCEOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_axolotl_options(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("moce"):
            return data
        moce = data["moce"]
        if isinstance(moce, dict):
            # base_model may be a MoCE output: its moce keys and artifact, before resolving.
            prepare_continuation(data)
            moce = dict(data["moce"])
            _resolve_num_clusters(moce)
            data["moce"] = moce
        _check_local_architecture(data)
        adapter = data.get("adapter")
        if adapter not in SUPPORTED_ADAPTERS:
            raise ValueError(
                f"moce: adapter '{adapter}' is not supported with MoCE; use no adapter (only "
                "MoCE trains), 'lora' or 'qlora'."
            )
        if data.get("gradient_checkpointing"):
            gc_kwargs = dict(data.get("gradient_checkpointing_kwargs") or {})
            if gc_kwargs.get("use_reentrant") is True:
                raise ValueError(
                    "moce: gradient_checkpointing_kwargs.use_reentrant: true runs the forward "
                    "under no_grad, so the load-balancing loss would get no gradient. Remove it "
                    "or set use_reentrant: false."
                )
            gc_kwargs["use_reentrant"] = False
            data["gradient_checkpointing_kwargs"] = gc_kwargs
        _check_rl(data)
        for key, value, why in UNSUPPORTED_OPTIONS:
            if data.get(key) not in (None, False) and data.get(key) != value:
                raise ValueError(
                    f"moce: `{key}: {data.get(key)}` is not supported with MoCE: {why}"
                )
        if data.get("activation_offloading") not in (None, False):
            raise ValueError(
                "moce: activation_offloading replaces the checkpointing path that carries the "
                "per-token cluster ids; use gradient_checkpointing: true instead."
            )
        return data


def _check_rl(data: dict) -> None:
    rl = data.get("rl")
    if rl in (None, False):
        return
    name = str(getattr(rl, "value", rl)).lower()
    if data.get("precompute_ref_log_probs"):
        raise ValueError(
            "moce: precompute_ref_log_probs is not supported with MoCE: TRL computes the "
            "reference log-probs while building the trainer, before the plugin's collator "
            "adds the cluster ids (and TRL's KTO precompute calls the model with input_ids and "
            "attention_mask only, trl/trainer/kto_trainer.py compute_ref_log_probs). Remove it "
            "(the reference forward then runs each step)."
        )
    if name not in SUPPORTED_RL:
        raise ValueError(
            f"moce: `rl: {name}` is not supported with MoCE: its rows are generated during "
            f"training (or it has no preference dataset) and carry no cluster id. Use one of "
            f"{', '.join(SUPPORTED_RL)}, or SFT."
        )


def _check_local_architecture(data: dict) -> None:
    """Unsupported model types fail here when the base model is a local folder (hub models are
    checked by the plugin right after axolotl resolves their config, still before loading)."""
    source = data.get("base_model_config") or data.get("base_model")
    config_file = Path(str(source)) / "config.json" if source else None
    if config_file is None or not config_file.is_file():
        return
    model_type = read_json(config_file, "model config").get("model_type")
    get_architecture(model_type)


def _resolve_num_clusters(moce: dict) -> None:
    """Fill/check num_clusters from the cluster artifact (it is the source of truth)."""
    artifact = moce.get("cluster_artifact")
    if not artifact:
        return
    if not Path(artifact).exists():
        raise ValueError(
            f"moce.cluster_artifact '{artifact}' does not exist. Run "
            "`python preprocess/cluster.py <this yaml>` (or `axolotl preprocess <this yaml>`) "
            "first (relative paths are relative to the working directory)."
        )
    model = _load_artifact(str(Path(artifact).resolve()))
    model.check_settings(ClusteringOptions.from_dict(moce.get("clustering")))
    moce["num_clusters"] = model.check_num_clusters(moce.get("num_clusters"))


@functools.lru_cache(maxsize=8)
def _load_artifact(path: str) -> ClusterModel:
    # One load per artifact and process: every hook and dataset reads the same object.
    return ClusterModel.load(path)


def cluster_model_of(moce: MoCEConfig) -> ClusterModel:
    """The cluster artifact of a resolved config (loaded once per process)."""
    if not moce.cluster_artifact:
        raise ValueError("moce.cluster_artifact is not set")
    return _load_artifact(str(Path(moce.cluster_artifact).resolve()))


@functools.lru_cache(maxsize=8)
def _resolved(block_json: str) -> MoCEConfig:
    raw = json.loads(block_json)
    _resolve_num_clusters(raw)
    return MoCEOptions(**raw)


def moce_config_from_cfg(cfg: Any) -> MoCEConfig:
    """The validated MoCEConfig of an axolotl cfg (DictDefault or dict), resolved once per
    ``moce:`` block and process: the hooks and dataset patches all get the same object."""
    raw = cfg.get("moce") if hasattr(cfg, "get") else getattr(cfg, "moce", None)
    if raw is None:
        raise ValueError("the axolotl config has no `moce:` block")
    if isinstance(raw, MoCEConfig):
        return raw
    return _resolved(json.dumps(dict(raw), sort_keys=True, default=str))
