"""A cheap fingerprint of the base weights, recorded at training time and checked at load.

A config summary cannot tell two models of the same shape apart (a base and its instruct
variant, two seeds); MoCE weights trained on one are meaningless on the other. The fingerprint
is a few fixed, evenly spaced values of three base tensors (the input embedding and one MLP
weight of the first and the last decoder layer), compared with a tolerance so that loading
the base in another dtype (bf16 at training, fp32 at inference) still matches.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..model.upcycle import MOCE_MODULE_NAME

METHOD = "samples-v1"
SAMPLES = 16
# bf16 keeps ~3 significant digits; other weights of the same shape differ far more.
RTOL, ATOL = 2e-2, 1e-5
_WRAPPERS = re.compile(r"\.(base_mlp|base_layer)(?=\.)")


def _canonical(name: str) -> str:
    """Parameter name as in a plain from_pretrained model: PEFT's prefix, the upcycled
    ``base_mlp`` and LoRA's ``base_layer`` removed."""
    return _WRAPPERS.sub("", name.removeprefix("base_model.model."))


def _why_unreadable(p: torch.Tensor) -> str | None:
    # bitsandbytes 4-bit weights may be packed into a float quant_storage dtype: the class
    # (Params4bit / Int8Params) or its quant_state says so, not the dtype.
    if hasattr(p, "quant_state") or type(p).__name__ in ("Params4bit", "Int8Params"):
        return f"quantized ({type(p).__name__})"
    if not p.dtype.is_floating_point:
        return f"quantized ({p.dtype})"
    if p.device.type == "meta":
        return "on the meta device"
    if hasattr(p, "ds_id") or hasattr(p, "full_tensor"):
        return "sharded (ZeRO-3 / FSDP)"
    if p.numel() == 0:
        return "empty (sharded)"
    return None


def _chosen(model: Any) -> list[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) of the embedding and the first MLP weight of the first and
    the last decoder layer; MoCE and LoRA parameters are never chosen."""
    params = [(_canonical(n), p) for n, p in model.named_parameters()
              if MOCE_MODULE_NAME not in n and "lora_" not in n and "modules_to_save" not in n]
    chosen = []
    try:
        emb_weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):  # architectures without the accessor
        emb_weight = None
    for name, p in params:
        if p is emb_weight:
            chosen.append((name, p))
            break
    layer_mlp = re.compile(r"\.(\d+)\.mlp\.")
    layers = sorted({int(m.group(1)) for n, _ in params if (m := layer_mlp.search(n))})
    for index in dict.fromkeys(layers[:1] + layers[-1:]):
        names = sorted((n, p) for n, p in params if f".{index}.mlp." in n and
                       n.endswith(".weight"))
        chosen.extend(names[:1])
    return chosen


def _samples(p: torch.Tensor) -> list[float]:
    flat = p.detach().reshape(-1)
    # float64 positions: in float32, numel - 1 of a large embedding (over 2**24 values)
    # rounds up past the last index.
    last = flat.numel() - 1
    idx = torch.linspace(0, last, SAMPLES, dtype=torch.float64).round().long()
    idx = idx.clamp_(0, last).to(flat.device)
    return [float(v) for v in flat.index_select(0, idx).float().cpu()]


def base_fingerprint(model: Any) -> dict:
    """``{"method", "tensors": {name: {"shape", "values"}}, "skipped": {name: reason}}``;
    tensors that cannot be read cheaply (quantized, sharded) are skipped and named."""
    tensors: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    with torch.no_grad():
        for name, p in _chosen(model):
            reason = _why_unreadable(p)
            if reason:
                skipped[name] = reason
            else:
                tensors[name] = {"shape": list(p.shape), "values": _samples(p)}
    return {"method": METHOD, "tensors": tensors, "skipped": skipped}


def fingerprint_difference(recorded: dict | None, model: Any) -> str | None:
    """None when ``model``'s weights match the recorded fingerprint (or nothing can be
    compared), else a description of the first difference."""
    if not recorded or recorded.get("method") != METHOD or not recorded.get("tensors"):
        return None
    params = {_canonical(n): p for n, p in model.named_parameters()}
    for name, want in recorded["tensors"].items():
        p = params.get(name)
        if p is None:
            return f"it has no tensor {name}"
        if list(p.shape) != want["shape"]:
            return f"{name} has shape {list(p.shape)}, trained {want['shape']}"
        if _why_unreadable(p):
            continue
        got = torch.tensor(_samples(p))
        if not torch.allclose(got, torch.tensor(want["values"]), rtol=RTOL, atol=ATOL):
            worst = int((got - torch.tensor(want["values"])).abs().argmax())
            return (f"{name} differs (sample {worst}: {got[worst].item():.6g}, trained "
                    f"{want['values'][worst]:.6g})")
    return None


def fingerprint_checked(recorded: dict | None) -> bool:
    return bool(recorded and recorded.get("method") == METHOD and recorded.get("tensors"))
