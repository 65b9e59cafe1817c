"""The final LoRA/QLoRA adapter save under FSDP2 keeps the MoCE modules.

axolotl 0.19's ``save_trained_model`` writes the final adapter of an FSDP2 LoRA run with
``axolotl.integrations.expert_parallel.shard.save_fsdp2_lora_adapter``, which gathers only the
parameters named ``lora_*`` and then asks PEFT for the adapter state dict; PEFT also wants the
``modules_to_save`` copies (MoCE's ``moce_experts``), so every rank fails with
``KeyError: 'modules_to_save.default.router'`` (and MoCE would be missing from the adapter).
For MoCE models the same save gathers both (GPU or CPU alike).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ..model.state_dict import full_tensor


def save_fsdp2_adapter_with_moce(model: Any, output_dir: str) -> bool:
    """Every rank gathers (collective); rank 0 writes adapter_model.safetensors + config."""
    from peft.utils.save_and_load import get_peft_model_state_dict
    from safetensors.torch import save_file

    names = [n for n, _ in model.named_parameters()]
    if not any("lora_" in n for n in names):
        return False
    state = {n: full_tensor(p) for n, p in model.named_parameters()
             if "lora_" in n or "modules_to_save" in n}
    adapter_state = get_peft_model_state_dict(model, state_dict=state)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in adapter_state.items()},
                  str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        active = getattr(model, "active_adapter", "default")
        if isinstance(active, (list, tuple)):
            active = active[0]
        model.peft_config[active].save_pretrained(str(out))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return True


def wrap_save_fsdp2_lora_adapter(original: Any) -> Any:
    """axolotl's FSDP2 LoRA save gathers only ``lora_*`` parameters (KeyError on PEFT's
    modules_to_save copy of MoCE); for MoCE models the adapter is saved with MoCE gathered."""

    @functools.wraps(original)
    def save_fsdp2_lora_adapter(model: Any, output_dir: str) -> bool:
        from ..model.wrappers import is_moce_model

        if is_moce_model(model):
            return save_fsdp2_adapter_with_moce(model, output_dir)
        return original(model, output_dir)

    return save_fsdp2_lora_adapter
