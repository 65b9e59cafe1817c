"""The axolotl plugin: ``plugins: [moce_plugin.MoCEPlugin]`` plus a ``moce:`` block."""

from __future__ import annotations

import os
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from .architectures import get_architecture
from .args import moce_config_from_cfg
from .config import MoCEConfig
from .cpu_dist import install_cpu_distributed_patches
from .data import check_prepared_dataset, install_dataset_patches
from .fsdp_save import install_fsdp2_adapter_save_patch
from .model import cast_moce_parameters, is_moce_model, moce_experts_modules, upcycle_model
from .trainer import MoCECheckpointCallback, attach_moce_to_trainer, save_moce_files

# Under the "axolotl." namespace so axolotl's logging config shows our INFO lines.
LOG = get_logger("axolotl.integrations.moce")

# PEFT keeps modules listed in modules_to_save trainable and saves them with the adapter,
# so LoRA/QLoRA checkpoints (and axolotl's resume / merge-lora) include MoCE.
MOCE_MODULE_NAME = "moce_experts"


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


class MoCEPlugin(BasePlugin):
    """Upcycles supported decoders into Mixture-of-Clustered-Experts adapter models."""

    _saved_final = False

    def get_input_args(self) -> str:
        return "moce_plugin.args.MoCEArgs"

    def register(self, cfg: dict) -> None:
        # Datasets are prepared before the model loads: hook cluster ids in now.
        install_dataset_patches()
        install_merge_lora_patch()
        install_cpu_distributed_patches()
        install_fsdp2_adapter_save_patch()

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> None:
        # Runs after axolotl normalised the config and before the model loader reads it;
        # returns None so axolotl loads the datasets itself (with our cluster-id hooks).
        if cfg.get("moce"):
            get_architecture(cfg.get("model_config_type"))
            device_map = cfg.get("device_map")
            if isinstance(device_map, dict) and not torch.cuda.is_available():
                # axolotl pins each DDP rank to {"": LOCAL_RANK}, a CUDA index; on a
                # CPU-only machine (gloo DDP) the ranks must load on the CPU instead.
                cfg["device_map"] = "cpu"
        return None

    # ---- model ---------------------------------------------------------------------------
    def pre_model_load(self, cfg: Any) -> None:
        if not cfg.get("moce"):
            return
        get_architecture(cfg.get("model_config_type"))  # clear error before loading weights
        if cfg.get("adapter") in ("lora", "qlora"):
            modules = list(cfg.get("lora_modules_to_save") or [])
            if MOCE_MODULE_NAME not in modules:
                modules.append(MOCE_MODULE_NAME)
            cfg["lora_modules_to_save"] = modules

    def post_model_build(self, cfg: Any, model: Any) -> None:
        if not cfg.get("moce"):
            return
        moce = moce_config_from_cfg(cfg)
        freeze = not (cfg.get("adapter") is None and moce.train_base_model)
        upcycle_model(model, moce, dtype=_compute_dtype(cfg), freeze_base=freeze)
        LOG.info(
            "MoCE: %s groups x %s experts (+%s general), top-k=%s, adapter dim %s, layers %s",
            moce.groups, moce.experts_per_group, moce.num_general_experts, moce.top_k,
            moce.adapter_dim, model._moce_layers,
        )

    def post_model_load(self, cfg: Any, model: Any) -> None:
        if not cfg.get("moce"):
            return
        if not is_moce_model(model):
            raise RuntimeError(
                "MoCE layers are missing after model load: the model was built by a path that "
                "skipped axolotl's post_model_build hook. Please report this configuration."
            )
        cast_moce_parameters(model, _compute_dtype(cfg))
        modules = list(moce_experts_modules(model))
        for _, module in modules:
            module.requires_grad_(True)
        mark_zero3_leaf_modules(model)
        moce_params = sum(p.numel() for _, m in modules for p in m.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        LOG.info(
            "MoCE parameters: %s (trainable in total: %s of %s, %.3f%%)",
            f"{moce_params:,}", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
        )

    # ---- trainer ---------------------------------------------------------------------------
    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if not cfg.get("moce"):
            return
        moce = moce_config_from_cfg(cfg)
        check_prepared_dataset(getattr(trainer, "train_dataset", None), "train", moce.groups)
        check_prepared_dataset(getattr(trainer, "eval_dataset", None), "eval", moce.groups)
        attach_moce_to_trainer(trainer, moce)

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        if not cfg.get("moce"):
            return []
        self._meta = output_meta(cfg, model)
        return [MoCECheckpointCallback(moce_config_from_cfg(cfg), self._meta)]

    def post_train(self, cfg: Any, model: Any) -> None:
        if not cfg.get("moce"):
            return
        from .plots import plot_routing_log

        moce: MoCEConfig = moce_config_from_cfg(cfg)
        # Called once right after trainer.train() (process group alive: every rank gathers
        # sharded weights) and again after axolotl tore it down; use the launcher's RANK.
        is_main = int(os.environ.get("RANK", "0")) == 0
        if self._saved_final and not torch.distributed.is_initialized():
            return
        meta = getattr(self, "_meta", None) or output_meta(cfg, model)
        save_moce_files(model, moce, cfg.output_dir, meta, write=is_main)
        self._saved_final = True
        if is_main:
            copy_cluster_artifact(moce, cfg.output_dir)
            plot_routing_log(cfg.output_dir)


def output_meta(cfg: Any, model: Any) -> dict:
    """Recorded next to the MoCE weights so inference can rebuild and check the model."""
    from .inference import base_config_summary

    datasets = cfg.get("datasets") or []
    first_type = str((datasets[0] or {}).get("type", "")) if datasets else ""
    prompt_format = {"alpaca": "alpaca", "chat_template": "chat"}.get(first_type, "raw")
    return {
        "base_model": cfg.get("base_model"),
        "base_config": base_config_summary(model.config),
        "adapter": cfg.get("adapter"),
        "prompt_format": prompt_format,
    }


def copy_cluster_artifact(moce: MoCEConfig, output_dir: str) -> None:
    """Make the output self-contained: inference assigns clusters with this copy."""
    import shutil
    from pathlib import Path

    from .inference import ARTIFACT_DIR_NAME

    if not moce.cluster_artifact or not Path(moce.cluster_artifact).is_dir():
        return
    dest = Path(output_dir) / ARTIFACT_DIR_NAME
    if Path(moce.cluster_artifact).resolve() == dest.resolve():
        return
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(moce.cluster_artifact, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def install_merge_lora_patch() -> None:
    """`axolotl merge-lora` merges shard by shard without building the model, which would drop
    the MoCE layers; for MoCE configs it runs moce_plugin.export instead (same destination,
    <output_dir>/merged)."""
    import axolotl.cli.merge_lora as merge_lora

    original = merge_lora.do_merge_lora
    if getattr(original, "_moce_patched", False):
        return

    def do_merge_lora(*, cfg: Any) -> None:
        if not cfg.get("moce"):
            return original(cfg=cfg)
        from pathlib import Path

        from .export import export_model

        dest = Path(cfg.output_dir) / "merged"
        LOG.info("MoCE: merging %s into %s with moce_plugin.export", cfg.lora_model_dir, dest)
        export_model(cfg.lora_model_dir, dest, base_model=cfg.base_model)

    do_merge_lora._moce_patched = True
    merge_lora.do_merge_lora = do_merge_lora


def mark_zero3_leaf_modules(model: Any) -> None:
    """Under DeepSpeed ZeRO-3, MoCE needs no leaf-module marking, and must not get one.

    ``MoCEExperts`` owns its routers and stacked expert tensors directly (no child module holds
    a parameter), so ZeRO-3's pre-forward hook gathers all of them at once on every call, on
    every rank, whatever the routing: nothing is fetched lazily and ranks cannot hang.
    Marking it a leaf (``deepspeed.utils.set_z3_leaf_modules``) was harmful: with DeepSpeed
    0.19 the expert parameter is already re-partitioned (size 0) when autograd accumulates its
    gradient (likely: leaf gradients are reduced from a module backward hook), and the first
    backward fails
    in ``torch::autograd::AccumulateGrad`` with ``The size of tensor a (0) must match the size
    of tensor b (32) at non-singleton dimension 2`` (seen with 2 gloo ranks, docs/scaling.md).
    This only checks the property that makes the marking unnecessary."""
    from .layer import MoCEExperts

    for module in model.modules():
        if isinstance(module, MoCEExperts) and any(
            True for child in module.children() for _ in child.parameters()
        ):
            raise RuntimeError(
                "MoCEExperts has a child module with parameters; ZeRO-3 would fetch it lazily "
                "per call. Keep expert parameters directly on MoCEExperts."
            )
