"""The MoCE output-folder format: file names, metadata, and how the files are written.

A MoCE output folder (a training's ``output_dir``, one of its ``checkpoint-*`` folders, or
an export) holds, besides whatever transformers/PEFT wrote:

* ``moce_config.json``: the ``moce:`` block (:class:`~moce_plugin.model.config.MoCEConfig`)
  plus ``_meta`` (base model, its config summary, adapter, prompt format);
* ``moce_weights.safetensors``: the MoCE parameters and buffers only, keyed
  ``layers.<i>.<name>`` (:func:`~moce_plugin.model.upcycle.moce_state_dict`);
* ``cluster_artifact/``: a copy of the stage-1 artifact, so the folder assigns clusters alone;
* ``moce_routing.jsonl`` / ``moce_expert_usage.png``: the training-time routing log and plot.

Every file is written to a temporary name and renamed into place, so a reader or an
interrupted run never sees half a file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..model.config import MoCEConfig
from ..utils import FileFormatError, atomic_write_text, atomic_write_with, read_json

MOCE_CONFIG_NAME = "moce_config.json"
MOCE_WEIGHTS_NAME = "moce_weights.safetensors"
ARTIFACT_DIR_NAME = "cluster_artifact"
ROUTING_LOG_NAME = "moce_routing.jsonl"
EXPERT_USAGE_PNG = "moce_expert_usage.png"
# Keys of a model config that identify a base model for the MoCE weights.
BASE_CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "vocab_size")


def write_moce_config(directory: str | os.PathLike, config: MoCEConfig,
                      meta: dict | None = None) -> Path:
    payload = config.model_dump(mode="json")
    if meta:
        payload["_meta"] = meta
    return atomic_write_text(Path(directory) / MOCE_CONFIG_NAME,
                             json.dumps(payload, indent=2, sort_keys=True))


def _config_payload(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MOCE_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a MoCE output (no {MOCE_CONFIG_NAME})."
        )
    payload = read_json(path, "MoCE config")
    if not isinstance(payload, dict):
        raise FileFormatError(f"MoCE config {path} is damaged (not a JSON object).")
    return payload


def read_moce_config(directory: str | os.PathLike) -> MoCEConfig:
    payload = dict(_config_payload(directory))
    payload.pop("_meta", None)
    return MoCEConfig(**payload)


def read_meta(directory: str | os.PathLike) -> dict:
    """The ``_meta`` recorded beside the config (empty for folders written without it)."""
    return dict(_config_payload(directory).get("_meta", {}))


def base_config_summary(model_config: Any) -> dict:
    """What identifies a base model for the MoCE weights (saved in moce_config.json)."""
    return {k: getattr(model_config, k, None) for k in BASE_CONFIG_KEYS}


def output_meta(cfg: Any, model: Any) -> dict:
    """Recorded next to the MoCE weights so inference can rebuild and check the model."""
    datasets = cfg.get("datasets") or []
    first_type = str((datasets[0] or {}).get("type", "")) if datasets else ""
    prompt_format = {"alpaca": "alpaca", "chat_template": "chat"}.get(first_type, "raw")
    return {
        "base_model": cfg.get("base_model"),
        "base_config": base_config_summary(model.config),
        "adapter": cfg.get("adapter"),
        "prompt_format": prompt_format,
    }


def save_moce_files(
    model: Any, config: MoCEConfig, directory: str | os.PathLike, meta: dict | None = None,
    write: bool = True,
) -> None:
    """Write moce_config.json (+ meta) and moce_weights.safetensors (MoCE params only).

    With sharded parameters (FSDP2, ZeRO-3) every rank must call this (the gather is a
    collective); only those with ``write=True`` write files."""
    from safetensors.torch import save_file

    from ..model.upcycle import moce_state_dict

    state = moce_state_dict(model)
    if not write:
        return
    directory = Path(directory)
    write_moce_config(directory, config, meta)
    atomic_write_with(
        directory / MOCE_WEIGHTS_NAME,
        lambda tmp: save_file(state, str(tmp),
                              metadata={"format": "pt", "moce_layers": str(len(state))}),
    )


def copy_cluster_artifact(artifact: str | os.PathLike | None, output_dir: str | os.PathLike
                          ) -> Path | None:
    """Copy the cluster artifact into ``output_dir`` so the folder is self-contained."""
    if not artifact or not Path(artifact).is_dir():
        return None
    dest = Path(output_dir) / ARTIFACT_DIR_NAME
    if Path(artifact).resolve() == dest.resolve():
        return dest
    from ..utils import atomic_dir

    return atomic_dir(dest, lambda tmp: shutil.copytree(artifact, tmp, dirs_exist_ok=True))
