"""Starting a run from a MoCE model: ``base_model:`` naming a MoCE output or export.

A full MoCE training output (``output_dir`` or a ``checkpoint-*``) or a ``moce-export``
folder is not a plain base: its FFN weights are stored as ``mlp.base_mlp.*``, its experts
and routers beside them, and its groups mean the clusters of its cluster artifact. Loaded as
a plain model, the FFN would start from random weights and MoCE would upcycle a second time.
Here the plugin recognises such a folder and:

* at config validation (:func:`prepare_continuation`): refuses LoRA outputs and folders whose
  weights are the start-of-training ones; reads an export's base-family config instead of
  its ``model_type: moce`` one; makes the FFN keys load into the plain architecture
  (``model_kwargs: {key_mapping: ...}``); fills the model-defining ``moce:`` keys the
  YAML leaves out from the loaded model and refuses, naming the keys, those that differ;
  uses the loaded model's cluster artifact (refusing another one);
* after the model is built (:func:`load_moce_source`): loads the experts and routers (the
  upcycled layers then compute exactly what the loaded model computed);
* when the datasets are read (:func:`assign_rows`): rows the artifact clustered keep their
  cluster, new rows get the nearest of its centroids, as inference assigns them; rows the
  artifact's text template cannot read are refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..clustering.errors import ClusteringError
from ..clustering.text import content_key, iter_rows, template_fields
from ..errors import ConfigError
from ..model.config import MoCEConfig
from ..model.upcycle import load_moce_state_dict
from ..outputs.folder import (
    ARTIFACT_DIR_NAME,
    MOCE_CONFIG_NAME,
    read_meta,
    read_moce_config,
    read_moce_weights,
)
from ..utils import atomic_write_text, read_json

LOG = logging.getLogger("axolotl.integrations.moce")

# The moce: keys that decide what the model computes: a continued run must keep them.
MODEL_KEYS = ("num_clusters", "experts_per_group", "top_k", "num_general_experts",
              "general_top_k", "adapter_dim", "adapter_scaling", "adapter_activation",
              "layers", "router", "acmoe_eps", "acmoe_clamp")


class MoCEContinuationError(ConfigError):
    """A run can't start from this MoCE model as configured (the message names the fix)."""


@dataclass(frozen=True)
class MoCESource:
    folder: Path  # what base_model names
    config_dir: Path  # where moce_config.json is (a checkpoint's run folder if not inside)
    config: MoCEConfig
    meta: dict
    artifact: Path | None
    export: bool


def _config_dir(path: Path) -> Path | None:
    if (path / MOCE_CONFIG_NAME).is_file():
        return path
    if path.name.startswith("checkpoint-") and (path.parent / MOCE_CONFIG_NAME).is_file():
        return path.parent
    return None


@functools.lru_cache(maxsize=8)
def _source(folder: str) -> MoCESource | None:
    path = Path(folder)
    config_dir = _config_dir(path)
    if config_dir is None:
        return None
    from ..outputs.hf_native import MODEL_TYPE

    model_config = path / "config.json"
    export = model_config.is_file() and read_json(
        model_config, "model config").get("model_type") == MODEL_TYPE
    artifact = next((d / ARTIFACT_DIR_NAME for d in (path, config_dir)
                     if (d / ARTIFACT_DIR_NAME).is_dir()), None)
    return MoCESource(path, config_dir, read_moce_config(config_dir), read_meta(config_dir),
                      artifact, export)


def moce_source(base_model: Any) -> MoCESource | None:
    """The MoCE model ``base_model`` names (a local output, checkpoint or export), or None."""
    if not base_model or not Path(str(base_model)).is_dir():
        return None
    return _source(str(Path(str(base_model)).resolve()))


# ---- config validation -------------------------------------------------------------------
def prepare_continuation(data: dict) -> MoCESource | None:
    """Adapt the raw config ``data`` (with a ``moce:`` block) to start from the MoCE model
    its ``base_model`` names; nothing for a plain base. Runs before num_clusters is resolved
    from the artifact, so the loaded model's artifact is the one resolved."""
    source = moce_source(data.get("base_model"))
    if source is None:
        return None
    folder = source.folder
    if (folder / "adapter_config.json").is_file():
        raise MoCEContinuationError(
            f"base_model {folder} is a LoRA/QLoRA MoCE output (adapter weights only). Merge it "
            f"into a self-contained model first: `moce-export {folder} DEST`, then set "
            "base_model: DEST."
        )
    from ..outputs.load import MoCELoadError, _check_weights_present

    try:
        _check_weights_present(folder, source.meta, own_config=source.config_dir == folder)
    except MoCELoadError as exc:
        raise MoCEContinuationError(f"base_model: {exc}") from exc
    if source.export and not data.get("base_model_config"):
        data["base_model_config"] = str(_plain_config_dir(folder))
        data.setdefault("tokenizer_config", str(folder))
    moce = dict(data["moce"])
    _agree_on_model_keys(moce, source)
    _keep_artifact(moce, source)
    data["moce"] = moce
    from ..outputs.load import BASE_MLP_KEY_MAPPING

    # axolotl's YAML key is `model_kwargs` (its field overrides_of_model_kwargs).
    key = "overrides_of_model_kwargs" if "overrides_of_model_kwargs" in data else "model_kwargs"
    overrides = dict(data.get(key) or {})
    overrides["key_mapping"] = {**(overrides.get("key_mapping") or {}), **BASE_MLP_KEY_MAPPING}
    data[key] = overrides
    return source


def _agree_on_model_keys(moce: dict, source: MoCESource) -> None:
    loaded = source.config.model_dump(mode="json")
    differ = []
    for key in MODEL_KEYS:
        given = moce.get(key)
        if given is None or (key == "num_clusters" and given == "auto"):
            moce[key] = loaded[key]
        elif given != loaded[key]:
            differ.append(f"moce.{key}: {given!r} here, {loaded[key]!r} in the loaded model")
    if differ:
        raise MoCEContinuationError(
            f"base_model {source.folder} is a MoCE model whose shape and routing this run must "
            f"keep, but {'; '.join(differ)}. Remove these keys from the moce: block (they are "
            "taken from the loaded model) or set them to the loaded values."
        )


def _artifact_fingerprint(path: Path) -> str | None:
    meta = Path(path) / "metadata.json"
    return read_json(meta, "cluster artifact metadata").get("fingerprint") if meta.is_file() \
        else None


def _keep_artifact(moce: dict, source: MoCESource) -> None:
    given = moce.get("cluster_artifact")
    if source.artifact is None:
        if given:
            raise MoCEContinuationError(
                f"base_model {source.folder} was trained on a cluster column, without a cluster "
                f"artifact, so its groups are not the clusters of {given}. Remove "
                f"moce.cluster_artifact and give the new data the same "
                f"'{source.config.cluster_column}' column."
            )
        return
    if given and Path(given).resolve() != source.artifact.resolve() and (
            _artifact_fingerprint(Path(given)) != _artifact_fingerprint(source.artifact)):
        raise MoCEContinuationError(
            f"moce.cluster_artifact {given} is not the cluster artifact of base_model "
            f"{source.folder} ({source.artifact}): the loaded model's groups are that "
            "artifact's clusters. Remove moce.cluster_artifact (the loaded model's is used)."
        )
    moce["cluster_artifact"] = str(source.artifact)
    _take_clustering_settings(moce, source.artifact)


def _take_clustering_settings(moce: dict, artifact: Path) -> None:
    """The ``moce.clustering`` keys this run leaves unset are the loaded artifact's: its
    clusters are kept, so its settings are the run's (keys the YAML sets are still compared
    with the artifact, and a difference refused)."""
    from ..clustering.artifact import CLUSTER_SETTINGS

    meta = read_json(Path(artifact) / "metadata.json", "cluster artifact metadata")
    clustering = dict(moce.get("clustering") or {})
    for name, (section, key) in CLUSTER_SETTINGS.items():
        recorded = meta.get(section) or {}
        if name not in clustering and key in recorded:
            if name == "k_max" and recorded.get("requested") != "auto":
                continue
            clustering[name] = recorded[key]
    moce["clustering"] = clustering


def _plain_config_dir(folder: Path) -> Path:
    """An export's config as its base family's (``model_type: moce`` -> e.g. llama), in a
    folder of its own: axolotl reads the model config from ``base_model_config``."""
    from ..outputs.hf_native import plain_base_config

    config = plain_base_config(folder)["config"]
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    dest = Path(tempfile.gettempdir()) / f"moce_export_config_{key}"
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest / "config.json", json.dumps(config.to_dict(), indent=2))
    return dest


# ---- model -------------------------------------------------------------------------------
def load_moce_source(model: Any, source: MoCESource) -> str:
    """Load the experts and routers of ``source`` into the freshly upcycled ``model``;
    returns the file they came from."""
    from ..outputs.load import _forget_base_mlp_mapping

    # The FFN came in through the base_mlp key mapping; the model saves its own names.
    _forget_base_mlp_mapping(model)
    state, file = read_moce_weights(source.folder, model)
    if not state:
        raise MoCEContinuationError(
            f"base_model {source.folder}: {file} holds no MoCE tensors (moce_experts); the "
            "folder was not saved from a MoCE model."
        )
    try:
        load_moce_state_dict(model, state)
    except ValueError as exc:
        raise MoCEContinuationError(f"base_model {source.folder}: {exc}") from exc
    return file


# ---- data --------------------------------------------------------------------------------
def assign_rows(cluster_model: Any, dataset: Any, name: str,
                view: Callable[[Any], Any] = lambda row: row) -> list[int]:
    """Cluster of every row under the loaded model's artifact: its stored cluster for a row
    it clustered, else the nearest centroid of the row's request text (as at inference).
    ``view`` is the dataset's row view (its own chat roles), as clustering read the rows."""
    template = cluster_model.template
    columns = list(getattr(dataset, "column_names", None) or [])
    if template != "auto" and columns:
        absent = [f for f in template_fields(template) if f not in columns]
        if absent:
            raise MoCEContinuationError(
                f"dataset '{name}' does not fit the cluster artifact of the loaded model "
                f"({cluster_model.path}): its text template {template!r} reads {absent}, which "
                f"the rows lack (columns: {columns}). Continue with data in the format the "
                "model was clustered on (or map the columns to those fields)."
            )
    table = cluster_model.assignments
    texts = []
    for i, row in enumerate(iter_rows(dataset)):
        try:
            text = cluster_model.text_of(view(row))
        except ClusteringError as exc:
            raise MoCEContinuationError(
                f"dataset '{name}' row {i} does not fit the cluster artifact of the loaded "
                f"model ({cluster_model.path}): {exc}") from exc
        if not text:
            raise MoCEContinuationError(
                f"dataset '{name}' row {i} has an empty request text under the loaded model's "
                f"text template {template!r}: nothing to assign a cluster from. Continue with "
                "data in the format the model was clustered on."
            )
        texts.append(text)
    ids: list[int | None] = [table.get(content_key(t)) for t in texts]
    new = [i for i, c in enumerate(ids) if c is None]
    if new:
        assigned = cluster_model.assign_texts([texts[i] for i in new])
        for i, c in zip(new, assigned, strict=True):
            ids[i] = int(c)
    LOG.info("MoCE: dataset '%s': %d rows kept their cluster, %d new rows assigned by the "
             "loaded model's artifact", name, len(ids) - len(new), len(new))
    return [int(c) for c in ids]  # type: ignore[arg-type]
