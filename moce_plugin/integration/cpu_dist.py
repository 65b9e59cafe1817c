"""Multi-process training on CPU-only machines (gloo): adjustments for axolotl / accelerate
code paths that assume CUDA. Each one names the exact call it works around; they are installed
by :mod:`.patches` only when CUDA is not available."""

from __future__ import annotations

import os
from typing import Any

import torch


def _multi_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) > 1


def wrap_build_device_mesh(original: Any) -> Any:
    """axolotl.utils.distributed.build_parallelism_config (FSDP2, 2+ ranks) calls
    ``ParallelismConfig.build_device_mesh("cuda")``; without CUDA, torch's DeviceMesh then
    calls ``torch.cuda.set_device`` and fails with ``AttributeError: module 'torch._C' has no
    attribute '_cuda_setDevice'``. Build the mesh on the CPU (gloo) instead."""
    def build_device_mesh(self: Any, device_type: str) -> Any:
        if device_type == "cuda" and not torch.cuda.is_available():
            device_type = "cpu"
        return original(self, device_type)

    return build_device_mesh


def wrap_prepare_backend(original: Any) -> Any:
    """accelerate's ``PartialState._prepare_backend`` finds no backend for a multi-process
    launch without CUDA unless ``ACCELERATE_USE_CPU`` is set, and the transformers Trainer does
    not pass ``ddp_backend`` under DeepSpeed; the state then has ``backend=None``, i.e. one
    process: DeepSpeed fails with ``train_batch_size is not equal to micro_batch_per_gpu *
    gradient_acc_step * world_size 4 != 2 * 2 * 2`` and FSDP with ``Using fsdp only works in
    distributed training``. Without CUDA, several ranks mean gloo (MULTI_CPU)."""
    from accelerate.utils import DistributedType

    def _prepare_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False,
                         backend: str | None = None) -> tuple[str | None, Any]:
        result = original(self, cpu, sagemaker_dp, backend)
        if result[1] == DistributedType.NO and not cpu and _multi_process():
            return original(self, True, sagemaker_dp, backend or "gloo")
        return result

    return _prepare_backend


def wrap_accelerator_state_init(original: Any) -> Any:
    """``AcceleratorState.__init__`` turns on FSDP only for GPU-like distributed types
    (MULTI_GPU, MULTI_XPU, ...), so on CPU (MULTI_CPU) ``ACCELERATE_USE_FSDP`` is ignored and
    axolotl then fails in save_trained_model with ``AttributeError: AcceleratorState object has
    no attribute fsdp_plugin`` after training unsharded. FSDP2 itself runs on gloo: switch the
    state to FSDP with the plugin the Accelerator passed."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

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

    return __init__


def wrap_set_device_map_config(original: Any) -> Any:
    """FSDP + QLoRA: ``ModelLoader._set_device_map_config`` (axolotl/loaders/model.py:708)
    pins each rank's model to ``{"": LOCAL_RANK}``, a CUDA index, whatever ``device_map`` the
    config has; without an accelerator transformers' ``caching_allocator_warmup``
    (``is_accelerator_device``, transformers/modeling_utils.py:5026) then fails with
    ``RuntimeError: Cannot access accelerator device when none is available``. Without CUDA
    the ranks load on the CPU (gloo)."""
    def _set_device_map_config(self: Any) -> None:
        original(self)
        device_map = self.model_kwargs.get("device_map")
        if isinstance(device_map, dict) and not torch.cuda.is_available():
            self.model_kwargs["device_map"] = {
                k: "cpu" if isinstance(v, int) else v for k, v in device_map.items()}

    return _set_device_map_config
