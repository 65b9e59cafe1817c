"""The MoCE output-folder format: file names, metadata, and how the files are written.

A MoCE output folder (a training's ``output_dir``, one of its ``checkpoint-*`` folders, or
an export) holds, besides whatever transformers/PEFT wrote:

* ``moce_config.json``: the ``moce:`` block (:class:`~moce_plugin.model.config.MoCEConfig`)
  plus ``_meta`` (base model, its config summary and weight fingerprint, adapter, prompt
  format, and ``saved``: when the folder was written: start / checkpoint / interrupted /
  final / export, with the ``step``);
* ``moce_weights.safetensors``: the MoCE parameters and buffers only, keyed
  ``layers.<i>.<name>`` (:func:`~moce_plugin.model.state_dict.moce_state_dict`); when it is
  missing (a run interrupted by SIGINT), the same tensors are read from the model's own
  weights (:func:`read_moce_weights`);
* ``cluster_artifact/``: a copy of the stage-1 artifact (written when training starts), so
  the folder and its checkpoints assign clusters alone;
* ``moce_routing.jsonl`` / ``moce_expert_usage.png``: the training-time routing log and plot.

Every file is written to a temporary name and renamed into place, so a reader or an
interrupted run never sees half a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..model.config import MoCEConfig
from ..utils import (
    FileFormatError,
    FolderKind,
    atomic_dir,
    atomic_write_text,
    atomic_write_with,
    check_replaceable,
    read_json,
)

if TYPE_CHECKING:
    import torch

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
    from .fingerprint import base_fingerprint

    datasets = cfg.get("datasets") or []
    first_type = str((datasets[0] or {}).get("type", "")) if datasets else ""
    prompt_format = {"alpaca": "alpaca", "chat_template": "chat"}.get(first_type, "raw")
    return {
        "base_model": cfg.get("base_model"),
        "base_config": base_config_summary(model.config),
        "base_fingerprint": base_fingerprint(model),
        "adapter": cfg.get("adapter"),
        "prompt_format": prompt_format,
    }


def saved_meta(meta: dict | None, saved: str, step: int | None = None) -> dict:
    """``meta`` stamped with when the folder was written (start / checkpoint / interrupted /
    final); the loader refuses a folder whose model weights are the start-of-training ones."""
    out = dict(meta or {})
    out["saved"] = saved
    if step is not None:
        out["step"] = int(step)
    return out


# _meta entry: the fingerprint of the cluster artifact the run was trained with; a loader
# (or a resume) refuses another artifact (re-clustered since: other ids for the same text).
ARTIFACT_META_KEY = "cluster_artifact_fingerprint"
WEIGHTS_META_KEY = "moce_weights"  # _meta entry: {"sha256": ..., "tensors": n}


def moce_weights_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the MoCE tensors (names, dtypes, shapes, bytes), independent of how the
    file lays them out; recorded in ``_meta`` and compared at load."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_RESTORE = "Restore the folder from a copy, or use another checkpoint-* of the run."
_EARLIER_CHECKPOINT = ("Use an earlier checkpoint-* of the run (or train again with a lower "
                       "learning rate).")


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``: min and max propagate both, and are ~15x faster than
    ``isfinite(t).all()`` (which writes a mask as large as the tensor) on a loaded CPU."""
    import torch

    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_moce_weights(state: Mapping[str, torch.Tensor], source: str | os.PathLike,
                       meta: dict | None = None, names: Mapping[str, str] | None = None,
                       fix: str | None = None) -> None:
    """Refuse MoCE tensors that are not the ones saved (``meta``'s checksum, when given and
    recorded) or hold NaN/inf: either would generate garbage for some clusters only.
    ``names``: how to name a tensor in the error (its file and key there), when not ``key``;
    ``fix``: what to do instead of the checkpoint advice (an export is re-exported)."""
    import torch

    recorded = (meta or {}).get(WEIGHTS_META_KEY, {}).get("sha256")
    if recorded and moce_weights_checksum(state) != recorded:
        raise FileFormatError(
            f"{source} is damaged: its MoCE tensors differ from the checksum recorded in "
            f"{MOCE_CONFIG_NAME} when they were saved (changed or overwritten since). "
            f"{fix or _RESTORE}"
        )
    for key in sorted(state):
        t = state[key]
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise FileFormatError(
                f"{source}: MoCE tensor {(names or {}).get(key, key)} holds {bad} non-finite "
                f"values (NaN/inf) of {t.numel()}: the weights are damaged or training "
                f"diverged. {fix or _EARLIER_CHECKPOINT}"
            )


def save_moce_files(
    model: Any, config: MoCEConfig, directory: str | os.PathLike, meta: dict | None = None,
    write: bool = True,
) -> None:
    """Write moce_config.json (+ meta) and moce_weights.safetensors (MoCE params only).

    With sharded parameters (FSDP2, ZeRO-3) every rank must call this (the gather is a
    collective); only those with ``write=True`` write files."""
    from safetensors.torch import save_file

    from ..model.state_dict import moce_state_dict

    state = moce_state_dict(model)
    if not write:
        return
    directory = Path(directory)
    meta = {**(meta or {}),
            WEIGHTS_META_KEY: {"sha256": moce_weights_checksum(state), "tensors": len(state)}}
    write_moce_config(directory, config, meta)
    atomic_write_with(
        directory / MOCE_WEIGHTS_NAME,
        lambda tmp: save_file(state, str(tmp),
                              metadata={"format": "pt", "moce_layers": str(len(state))}),
    )


def _output_artifact_kind() -> FolderKind:
    from ..clustering.artifact import ARTIFACT_KIND

    return dataclasses.replace(ARTIFACT_KIND, fix=(
        f"An output folder keeps a copy of its cluster artifact in {ARTIFACT_DIR_NAME}/: move "
        "this one away, or choose another output_dir."))


def check_artifact_copy_target(artifact: str | os.PathLike | None,
                               output_dir: str | os.PathLike) -> None:
    """Refuse, before training loads anything, an ``output_dir/cluster_artifact`` that is not
    an earlier copy of an artifact (:func:`copy_cluster_artifact` would replace it)."""
    dest = Path(output_dir) / ARTIFACT_DIR_NAME
    if artifact and Path(artifact).resolve() != dest.resolve():
        check_replaceable(dest, _output_artifact_kind())


def copy_cluster_artifact(artifact: str | os.PathLike | None, output_dir: str | os.PathLike
                          ) -> Path | None:
    """Copy the cluster artifact into ``output_dir`` so the folder is self-contained."""
    if not artifact or not Path(artifact).is_dir():
        return None
    dest = Path(output_dir) / ARTIFACT_DIR_NAME
    if Path(artifact).resolve() == dest.resolve():
        return dest
    return atomic_dir(dest, lambda tmp: shutil.copytree(artifact, tmp, dirs_exist_ok=True),
                      _output_artifact_kind())


# ---- MoCE tensors inside the model's own weights ------------------------------------------
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"
MODEL_WEIGHTS_INDEX = "model.safetensors.index.json"
_MOCE_MODULE = ".moce_experts."
_PEFT_PREFIX = "base_model.model."
_PEFT_COPY = re.compile(r"^modules_to_save\.[^.]+\.")


def _unreadable(file: Path, exc: Exception) -> FileFormatError:
    return FileFormatError(
        f"{file} is damaged (safetensors cannot read it: {' '.join(str(exc).split())}); "
        "restore it from a copy, or load the newest checkpoint-* of the run instead."
    )


def load_safetensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``; a truncated or damaged file is reported with its
    name (safetensors' own error names no file and is no ValueError / OSError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(file)
    try:
        return load_file(str(file))
    except (SafetensorError, RuntimeError) as exc:
        raise _unreadable(file, exc) from exc


def model_weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files holding the model (PEFT adapter, single or sharded full save)."""
    directory = Path(directory)
    if (directory / ADAPTER_WEIGHTS).is_file():
        return [directory / ADAPTER_WEIGHTS]
    if (directory / MODEL_WEIGHTS).is_file():
        return [directory / MODEL_WEIGHTS]
    index = directory / MODEL_WEIGHTS_INDEX
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map", {})
        shards = {f for k, f in weight_map.items() if _MOCE_MODULE in k}
        return [directory / f for f in sorted(shards)]
    return []


def _module_path(name: str) -> str:
    """A module's name in a full save: PEFT's wrapper prefix and modules_to_save copy removed."""
    name = name.removeprefix(_PEFT_PREFIX)
    return re.sub(r"\.modules_to_save\.[^.]+$", "", name)


def moce_weights_from_model_files(directory: str | os.PathLike, model: Any,
                                  origins: dict[str, str] | None = None
                                  ) -> dict[str, torch.Tensor]:
    """The MoCE tensors of ``model``'s layout (keys ``layers.<i>.<name>``, as
    moce_weights.safetensors) read from the folder's model or adapter safetensors, where a
    full save names them ``<layers path>.<i>.<mlp>.moce_experts.<name>`` and PEFT's adapter
    file ``base_model.model.<same>``. Empty when the folder has none. ``origins`` (when
    given) receives ``"<its key there> in <file>"`` per returned key, for errors."""
    from safetensors import safe_open

    from ..model.upcycle import MOCE_MODULE_NAME
    from ..model.wrappers import moce_experts_modules

    layer_of = {_module_path(n).removesuffix(f".{MOCE_MODULE_NAME}"): m.layer_index
                for n, m in moce_experts_modules(model)}
    out: dict[str, torch.Tensor] = {}
    from safetensors import SafetensorError

    for file in model_weight_files(directory):
        try:
            with safe_open(str(file), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if _MOCE_MODULE not in key:
                        continue
                    module, rest = key.split(_MOCE_MODULE, 1)
                    layer = layer_of.get(_module_path(module))
                    if layer is not None:
                        name = f"layers.{layer}.{_PEFT_COPY.sub('', rest)}"
                        out[name] = st.get_tensor(key)
                        if origins is not None:
                            origins[name] = f"{key} in {file}"
        except (SafetensorError, RuntimeError) as exc:
            raise _unreadable(file, exc) from exc
    return out


def read_moce_weights(directory: str | os.PathLike, model: Any
                      ) -> tuple[dict[str, torch.Tensor], str]:
    """(MoCE state dict, the file it came from): moce_weights.safetensors when present,
    else the model's own weights (an output_dir or checkpoint whose run was interrupted)."""
    directory = Path(directory)
    if (directory / MOCE_WEIGHTS_NAME).is_file():
        return load_safetensors(directory / MOCE_WEIGHTS_NAME), MOCE_WEIGHTS_NAME
    files = model_weight_files(directory)
    return moce_weights_from_model_files(directory, model), ", ".join(f.name for f in files)
