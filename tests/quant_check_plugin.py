"""Test-only axolotl plugin for quantized (QLoRA 4-bit / 8-bit) runs: after the model is
loaded it records what the base MLP became, the dtype of the MoCE parameters and how often the
frozen FFN runs per forward; writes <output_dir>/quant_check.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin

from moce_plugin.model.layer import MoCEMLP
from moce_plugin.model.upcycle import moce_experts_modules


class QuantCheckPlugin(BasePlugin):
    def post_model_load(self, cfg: Any, model: Any) -> None:
        self.mlps = mlps = [m for m in model.modules() if isinstance(m, MoCEMLP)]
        self.calls = [0]

        def count(*_: Any) -> None:
            self.calls[0] += 1

        mlps[0].base_mlp.register_forward_hook(count)
        self.info = {
            "ffn_classes": sorted({type(m.base_mlp.gate_proj).__name__ for m in mlps}),
            # storage bytes per weight: 0.5 for 4-bit (packed into any storage dtype), 1 for int8
            "ffn_bytes_per_weight": sorted({
                m.base_mlp.gate_proj.weight.numel() * m.base_mlp.gate_proj.weight.element_size()
                / (m.base_mlp.gate_proj.in_features * m.base_mlp.gate_proj.out_features)
                for m in mlps}),
            "moce_dtypes": sorted({str(p.dtype) for _, m in moce_experts_modules(model)
                                   for p in m.parameters()}),
            "moce_trainable": all(p.requires_grad for _, m in moce_experts_modules(model)
                                  for p in m.parameters()),
        }

    def post_train(self, cfg: Any, model: Any) -> None:
        # axolotl calls post_train twice; only the first (right after training, process group
        # still up) can run a forward, and under FSDP2 every rank must take part in it.
        if getattr(self, "done", False):
            return
        self.done = True
        # Under FSDP2 the FFN weight is a DTensor shard by now; its local tensor must still be
        # the bitsandbytes 4-bit / int8 parameter (axolotl's fsdp2_qlora patches).
        weight = self.mlps[0].base_mlp.gate_proj.weight
        self.info["ffn_weight_after_training"] = [
            type(weight).__name__, type(getattr(weight, "_local_tensor", weight)).__name__]
        before = self.calls[0]
        ids = torch.arange(4, 28).view(2, 12)
        # Training mode: bitsandbytes' CPU inference path (eval + no grad) repacks 4-bit weights
        # and fails for in_features < blocksize (64), which the tiny model's 32 hits.
        model.train()
        with torch.no_grad():
            model(input_ids=ids, moce_cluster_ids=torch.tensor([0, 2]))
        self.info["ffn_calls_per_forward"] = self.calls[0] - before
        if int(os.environ.get("RANK", "0")) == 0:
            (Path(cfg.output_dir) / "quant_check.json").write_text(json.dumps(self.info))
