"""Multi-process training on CPU-only machines (gloo): adjustments for axolotl code paths that
assume CUDA. Each one names the exact call it works around; nothing changes when CUDA is
available."""

from __future__ import annotations

import os
from typing import Any

import torch


def install_cpu_distributed_patches() -> None:
    """Idempotent; a no-op on machines with CUDA."""
    if torch.cuda.is_available():
        return
    _patch_device_mesh_device_type()
    _patch_accelerate_cpu_backend()
    _patch_accelerate_cpu_fsdp()


def _multi_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) > 1


def _patch_device_mesh_device_type() -> None:
    """axolotl.utils.distributed.build_parallelism_config (FSDP2, 2+ ranks) calls
    ``ParallelismConfig.build_device_mesh("cuda")``; without CUDA, torch's DeviceMesh then
    calls ``torch.cuda.set_device`` and fails with ``AttributeError: module 'torch._C' has no
    attribute '_cuda_setDevice'``. Build the mesh on the CPU (gloo) instead."""
    from accelerate.parallelism_config import ParallelismConfig

    original = ParallelismConfig.build_device_mesh
    if getattr(original, "_moce_patched", False):
        return

    def build_device_mesh(self: Any, device_type: str) -> Any:
        if device_type == "cuda" and not torch.cuda.is_available():
            device_type = "cpu"
        return original(self, device_type)

    build_device_mesh._moce_patched = True  # type: ignore[attr-defined]
    ParallelismConfig.build_device_mesh = build_device_mesh  # type: ignore[method-assign]


def _patch_accelerate_cpu_backend() -> None:
    """accelerate's ``PartialState._prepare_backend`` finds no backend for a multi-process
    launch without CUDA unless ``ACCELERATE_USE_CPU`` is set, and the transformers Trainer does
    not pass ``ddp_backend`` under DeepSpeed; the state then has ``backend=None``, i.e. one
    process: DeepSpeed fails with ``train_batch_size is not equal to micro_batch_per_gpu *
    gradient_acc_step * world_size 4 != 2 * 2 * 2`` and FSDP with ``Using fsdp only works in
    distributed training``. Without CUDA, several ranks mean gloo (MULTI_CPU)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_moce_patched", False):
        return

    def _prepare_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False,
                         backend: str | None = None) -> tuple[str | None, Any]:
        result = original(self, cpu, sagemaker_dp, backend)
        if result[1] == DistributedType.NO and not cpu and _multi_process():
            return original(self, True, sagemaker_dp, backend or "gloo")
        return result

    _prepare_backend._moce_patched = True  # type: ignore[attr-defined]
    PartialState._prepare_backend = _prepare_backend  # type: ignore[method-assign]


def _patch_accelerate_cpu_fsdp() -> None:
    """``AcceleratorState.__init__`` turns on FSDP only for GPU-like distributed types
    (MULTI_GPU, MULTI_XPU, ...), so on CPU (MULTI_CPU) ``ACCELERATE_USE_FSDP`` is ignored and
    axolotl then fails in save_trained_model with ``AttributeError: AcceleratorState object has
    no attribute fsdp_plugin`` after training unsharded. FSDP2 itself runs on gloo: switch the
    state to FSDP with the plugin the Accelerator passed."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_moce_patched", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        fsdp_plugin = kwargs.get("fsdp_plugin") or self.__dict__.get("fsdp_plugin")
        if (
            fsdp_plugin is not None
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and getattr(self, "distributed_type", None) == DistributedType.MULTI_CPU
        ):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # as accelerate does for GPUs, so that later AcceleratorState() calls keep FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._moce_patched = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = __init__  # type: ignore[method-assign]
