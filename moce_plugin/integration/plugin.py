"""The axolotl plugin: ``plugins: [moce_plugin.MoCEPlugin]`` plus a ``moce:`` block.

The hooks are thin: the ``moce:`` block is resolved once (:func:`moce_config_from_cfg`) and
handed to the model, data and trainer code; hooks of configs without a ``moce:`` block do
nothing.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger
from transformers import TrainerCallback

from ..errors import ConfigError
from ..model.architectures import get_architecture
from ..model.config import MoCEConfig
from ..model.upcycle import (
    MOCE_MODULE_NAME,
    cast_moce_parameters,
    is_moce_model,
    moce_experts_modules,
    upcycle_model,
)
from ..outputs.folder import (
    ARTIFACT_META_KEY,
    MOCE_WEIGHTS_NAME,
    check_artifact_copy_target,
    copy_cluster_artifact,
    output_meta,
    save_moce_files,
    saved_meta,
    write_moce_config,
)
from ..utils import describe_difference, give_weights_new_file_mode
from .args import cluster_model_of, moce_config_from_cfg
from .continuation import load_moce_source, moce_source
from .datasets import check_prepared_dataset
from .inference import (
    attach_eval_generation_clusters,
    attach_inference_clusters,
    check_eval_generation,
    check_inference_config,
    is_inference,
)
from .patches import install_patches
from .preference import check_preference_dataset, is_preference_trainer
from .trainer import MoCECheckpointCallback, attach_moce_to_trainer

# Under the "axolotl." namespace so axolotl's logging config shows our INFO lines.
LOG = get_logger("axolotl.integrations.moce")

# PEFT keeps modules listed in modules_to_save trainable and saves them with the adapter,
# so LoRA/QLoRA checkpoints (and axolotl's resume / merge-lora) include MoCE.


def _compute_dtype(cfg: Any) -> torch.dtype:
    bf16 = cfg.get("bf16")
    if bf16 is True or (bf16 == "auto" and torch.cuda.is_available()):
        return torch.bfloat16
    if cfg.get("fp16"):
        return torch.float16
    dtype = cfg.get("torch_dtype")
    if dtype == torch.float16 and cfg.get("load_in_8bit") and not cfg.get("float16"):
        # axolotl loads int8 bases with torch_dtype float16 even without fp16 training; MoCE
        # trained in pure fp16 (no loss scaling) turns NaN within steps (tiny llama, CPU).
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.float32


def _moce_only(default: Any = None) -> Callable:
    """Run the hook only for configs with a ``moce:`` block; pass it the resolved config."""

    def decorate(hook: Callable) -> Callable:
        @functools.wraps(hook)
        def wrapper(self: MoCEPlugin, cfg: Any, *args: Any, **kwargs: Any) -> Any:
            if not cfg.get("moce"):
                return default() if callable(default) else default
            return hook(self, cfg, moce_config_from_cfg(cfg), *args, **kwargs)

        return wrapper

    return decorate


class MoCEPlugin(BasePlugin):
    """Upcycles supported decoders into Mixture-of-Clustered-Experts adapter models."""

    _saved_final = False
    _meta: dict | None = None

    def get_input_args(self) -> str:
        return "moce_plugin.integration.args.MoCEArgs"

    def register(self, cfg: dict) -> None:
        # Datasets are prepared before the model loads: hook cluster ids in now.
        install_patches()
        if _is_preprocess(cfg) and _artifact_missing(cfg):
            # `axolotl preprocess CFG` prepares everything: stage 1 first (register runs
            # before config validation, which needs the artifact to resolve num_clusters).
            from ..clustering.cli import cluster_config

            LOG.info("MoCE: %s does not exist; clustering the datasets first (stage 1)",
                     cfg["moce"]["cluster_artifact"])
            cluster_config(cfg, source=str(cfg.get("axolotl_config_path") or "the config"),
                           log=LOG.info)

    @_moce_only()
    def load_datasets(self, cfg: Any, moce: MoCEConfig, preprocess: bool = False) -> None:
        # Runs after axolotl normalised the config and before the model loader reads it;
        # returns None so axolotl loads the datasets itself (with our cluster-id hooks).
        get_architecture(cfg.get("model_config_type"))
        if not preprocess and cfg.get("output_dir"):
            # training will copy the artifact there: refuse a user's folder before any work
            check_artifact_copy_target(moce.cluster_artifact, cfg.output_dir)
        if not preprocess:
            check_resume_config(cfg, moce)
            check_eval_generation(cfg, moce)
        device_map = cfg.get("device_map")
        if isinstance(device_map, dict) and not torch.cuda.is_available():
            # axolotl pins each DDP rank to {"": LOCAL_RANK}, a CUDA index; on a
            # CPU-only machine (gloo DDP) the ranks must load on the CPU instead.
            cfg["device_map"] = "cpu"
        return None

    # ---- model ---------------------------------------------------------------------------
    @_moce_only()
    def pre_model_load(self, cfg: Any, moce: MoCEConfig) -> None:
        get_architecture(cfg.get("model_config_type"))  # clear error before loading weights
        if is_inference(cfg):
            check_inference_config(cfg, moce)
        if cfg.get("adapter") in ("lora", "qlora"):
            modules = list(cfg.get("lora_modules_to_save") or [])
            if MOCE_MODULE_NAME not in modules:
                modules.append(MOCE_MODULE_NAME)
            cfg["lora_modules_to_save"] = modules

    @_moce_only()
    def post_model_build(self, cfg: Any, moce: MoCEConfig, model: Any) -> None:
        freeze = not (cfg.get("adapter") is None and moce.train_base_model)
        upcycle_model(model, moce, dtype=_compute_dtype(cfg), freeze_base=freeze)
        source = moce_source(cfg.get("base_model"))
        if source is not None:  # a MoCE model: its experts and routers, not fresh ones
            file = load_moce_source(model, source)
            LOG.info("MoCE: continuing from %s: FFN, experts and routers loaded (%s), cluster "
                     "artifact %s", source.folder, file, moce.cluster_artifact or "none")
        LOG.info(
            "MoCE: %s groups x %s experts (+%s general), top-k=%s, adapter dim %s, layers %s",
            moce.groups, moce.experts_per_group, moce.num_general_experts, moce.top_k,
            moce.adapter_dim, model._moce_layers,
        )

    @_moce_only()
    def post_model_load(self, cfg: Any, moce: MoCEConfig, model: Any) -> None:
        if not is_moce_model(model):
            raise RuntimeError(
                "MoCE layers are missing after model load: the model was built by a path that "
                "skipped axolotl's post_model_build hook. Please report this configuration."
            )
        cast_moce_parameters(model, _compute_dtype(cfg))
        modules = list(moce_experts_modules(model))
        for _, module in modules:
            module.requires_grad_(True)
        moce_params = sum(p.numel() for _, m in modules for p in m.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        LOG.info(
            "MoCE parameters: %s (trainable in total: %s of %s, %.3f%%)",
            f"{moce_params:,}", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
        )
        if is_inference(cfg):  # axolotl inference: generate gets token ids only
            attach_inference_clusters(cfg, moce, model)

    # ---- trainer ---------------------------------------------------------------------------
    @_moce_only(default=list)
    def add_callbacks_post_trainer(self, cfg: Any, moce: MoCEConfig, trainer: Any) -> list:
        # axolotl's trainer builder calls this for every trainer it builds (`axolotl train`,
        # `axolotl evaluate`); post_trainer_create is called by `axolotl train` only.
        self.post_trainer_create(cfg, trainer)
        return []

    @_moce_only()
    def post_trainer_create(self, cfg: Any, moce: MoCEConfig, trainer: Any) -> None:
        if getattr(trainer, "_moce_attached", False):
            return
        keep_moce_trainable(cfg.get("unfrozen_parameters"), trainer.model)
        attach_eval_generation_clusters(cfg, moce, trainer)
        if is_preference_trainer(trainer):
            for split in ("train", "eval"):
                check_preference_dataset(getattr(trainer, f"{split}_dataset", None),
                                         moce.cluster_column, split)
        else:
            check_prepared_dataset(getattr(trainer, "train_dataset", None), "train")
            check_prepared_dataset(getattr(trainer, "eval_dataset", None), "eval")
        attach_moce_to_trainer(trainer, moce)

    @_moce_only(default=list)
    def add_callbacks_pre_trainer(self, cfg: Any, moce: MoCEConfig, model: Any) -> list:
        self._meta = output_meta(cfg, model)
        if moce.cluster_artifact:
            self._meta[ARTIFACT_META_KEY] = cluster_model_of(moce).fingerprint
        return [MoCECheckpointCallback(moce, self._meta), MoCEOutputDirCallback(moce, self._meta)]

    @_moce_only()
    def post_train(self, cfg: Any, moce: MoCEConfig, model: Any) -> None:
        from ..outputs.plots import plot_routing_log

        # Called once right after trainer.train() (process group alive: every rank gathers
        # sharded weights) and again after axolotl tore it down; use the launcher's RANK.
        is_main = int(os.environ.get("RANK", "0")) == 0
        if is_main:  # the second call comes after axolotl saved the final weights
            give_weights_new_file_mode(cfg.output_dir)
        if self._saved_final and not torch.distributed.is_initialized():
            return
        meta = saved_meta(self._meta or output_meta(cfg, model), "final")
        save_moce_files(model, moce, cfg.output_dir, meta, write=is_main)
        self._saved_final = True
        if is_main:
            copy_cluster_artifact(moce.cluster_artifact, cfg.output_dir)
            plot_routing_log(cfg.output_dir)


def keep_moce_trainable(unfrozen_parameters: Any, model: Any) -> None:
    """axolotl's ``unfrozen_parameters`` freezes every parameter its patterns do not match,
    after the plugin made the experts and routers trainable: patterns written for the base
    (``model.layers.[0-9]+.self_attn``) would silently leave MoCE at its initialisation (the
    adapters' zero ``up``: no MoCE at all). When no pattern matches a MoCE tensor, the experts
    and routers train as always, besides what the patterns unfreeze; when some do, the user
    chose among MoCE's tensors (router-only training) and the selection holds."""
    if not unfrozen_parameters:
        return
    from axolotl.utils.freeze import LayerNamePattern

    raw = [unfrozen_parameters] if isinstance(unfrozen_parameters, str) else unfrozen_parameters
    patterns = [LayerNamePattern(str(p)) for p in raw]
    modules = list(moce_experts_modules(model))
    names = [f"{name}.{p_name}" for name, m in modules for p_name, _ in m.named_parameters()]
    if any(pattern.match(n) for n in names for pattern in patterns):
        return
    for _, module in modules:
        module.requires_grad_(True)
    LOG.info("MoCE: unfrozen_parameters names no MoCE tensor, so the MoCE experts and routers "
             "(%d tensors) train as always, besides the base tensors it unfreezes; to train "
             "only some of them, name them there (e.g. model.layers.[0-9]+.mlp.moce_experts."
             "router).", len(names))


# moce: keys a resumed run may change: where the artifact is (its content is compared by
# fingerprint), the stage-1 options (compared with the artifact), the initialisation seed
# (the checkpoint's weights replace the initialisation).
RESUME_FREE_KEYS = ("cluster_artifact", "clustering", "init_seed")


def _resume_checkpoint(cfg: Any) -> Path | None:
    """The checkpoint training will resume from: ``resume_from_checkpoint``, or with
    ``auto_resume_from_checkpoints`` the newest ``checkpoint-*`` (as axolotl picks it later)."""
    if cfg.get("resume_from_checkpoint"):
        return Path(str(cfg["resume_from_checkpoint"]))
    if cfg.get("auto_resume_from_checkpoints") and cfg.get("output_dir"):
        steps = [(int(p.name.split("-")[-1]), p) for p in Path(cfg.output_dir).glob("checkpoint-*")
                 if p.name.split("-")[-1].isdigit()]
        return max(steps)[1] if steps else None
    return None


def check_resume_config(cfg: Any, moce: MoCEConfig) -> None:
    """Refuse, before anything is loaded, to resume a checkpoint trained with another
    ``moce:`` block: a shape change would fail deep in torch, a behaviour change (top_k,
    adapter_activation, ...) would silently train another model for the remaining steps."""
    from ..outputs.folder import MOCE_CONFIG_NAME, read_meta, read_moce_config

    checkpoint = _resume_checkpoint(cfg)
    if checkpoint is None:
        return
    config_dir = next((d for d in (checkpoint, checkpoint.parent)
                       if (d / MOCE_CONFIG_NAME).is_file()), None)
    if config_dir is None:
        return  # not a MoCE checkpoint: nothing recorded to compare (axolotl reports it)
    trained = read_moce_config(config_dir).model_dump(mode="json")
    given = moce.model_dump(mode="json")
    diff = {k: (trained.get(k), v) for k, v in given.items()
            if k not in RESUME_FREE_KEYS and trained.get(k) != v}
    recorded = read_meta(config_dir).get(ARTIFACT_META_KEY)
    if recorded and moce.cluster_artifact:
        current = cluster_model_of(moce).fingerprint
        if current != recorded:  # re-clustered since: the same rows now have other ids
            diff["cluster_artifact"] = (f"fingerprint {recorded[:12]}",
                                        f"{moce.cluster_artifact} (fingerprint {current[:12]})")
    if diff:
        details = describe_difference(diff, "checkpoint")
        raise ConfigError(
            f"resume_from_checkpoint {checkpoint}: the YAML's moce: block differs from the one "
            f"the checkpoint was trained with ({details}); resuming would train another model "
            f"(or fail to load it). Set moce.{', moce.'.join(diff)} back to the values in "
            f"{config_dir / MOCE_CONFIG_NAME}, or start a new run (another output_dir, "
            "without resume_from_checkpoint)."
        )


def _is_preprocess(cfg: Any) -> bool:
    # load_cfg(is_preprocess=True) sets cfg.is_preprocess; axolotl's preprocess CLI also sets
    # the environment variable (cfg keys are dropped when the YAML has `strict: true`).
    return bool(cfg.get("is_preprocess")) or os.environ.get("AXOLOTL_IS_PREPROCESS") == "1"


def _artifact_missing(cfg: Any) -> bool:
    moce = cfg.get("moce")
    artifact = moce.get("cluster_artifact") if isinstance(moce, dict) else None
    return bool(artifact) and not os.path.exists(str(artifact))


class MoCEOutputDirCallback(TrainerCallback):
    """Keeps ``output_dir`` loadable whenever the run stops.

    When training starts (after axolotl pre-saved the model config and weights there) the
    MoCE config, its meta and the cluster artifact are written into ``output_dir``, as
    axolotl pre-saves the model config, so checkpoints and interrupted runs find them; a
    ``moce_weights.safetensors`` left by an earlier run is removed (axolotl has just replaced
    the model weights beside it). On SIGINT axolotl's handler saves the model and exits 0:
    ours runs first and stamps the meta "interrupted" (the loader then reads the MoCE tensors
    from the saved model). A folder still stamped "start" (SIGTERM) is refused by the loader.
    """

    def __init__(self, config: MoCEConfig, meta: dict) -> None:
        self.config = config
        self.meta = meta
        self.step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self.step = state.global_step
        if not state.is_world_process_zero:
            return control
        out = Path(args.output_dir)
        write_moce_config(out, self.config, saved_meta(self.meta, "start", state.global_step))
        (out / MOCE_WEIGHTS_NAME).unlink(missing_ok=True)
        copy_cluster_artifact(self.config.cluster_artifact, out)
        self._chain_sigint(out)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self.step = state.global_step
        return control

    def _chain_sigint(self, out: Path) -> None:
        previous = signal.getsignal(signal.SIGINT)
        # Only axolotl's saving handler (a Python callable) leaves weights to stamp.
        if threading.current_thread() is not threading.main_thread() or not callable(
                previous) or previous is signal.default_int_handler:
            return

        def on_sigint(signum: int, frame: Any) -> None:
            try:
                write_moce_config(out, self.config,
                                  saved_meta(self.meta, "interrupted", self.step))
            finally:
                previous(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)


def wrap_merge_lora(original: Callable) -> Callable:
    """`axolotl merge-lora` for MoCE configs runs moce_plugin.outputs.export instead (same
    destination, <output_dir>/merged); see integration/patches.py."""

    @functools.wraps(original)
    def do_merge_lora(*, cfg: Any) -> None:
        if not cfg.get("moce"):
            return original(cfg=cfg)
        from ..outputs.export import export_model

        dest = Path(cfg.output_dir) / "merged"
        LOG.info("MoCE: merging %s into %s with moce_plugin.export", cfg.lora_model_dir, dest)
        # axolotl's layout puts merged/ inside the run; a previous merge is replaced like
        # axolotl does (overwrite replaces only an earlier export: anything else in merged/
        # is refused by export_model itself).
        export_model(cfg.lora_model_dir, dest, base_model=cfg.base_model, overwrite=True,
                     allow_inside_source=True)

    return do_merge_lora
