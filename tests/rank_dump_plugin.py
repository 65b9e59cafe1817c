"""Test-only axolotl plugin: after training, every rank writes its MoCE weights and the
logits of its in-training model on a fixed input, so tests can check that ranks agree and
that a reloaded output reproduces the in-training model exactly."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin
from safetensors.torch import save_file

from moce_plugin.model.upcycle import moce_state_dict

PROBE_IDS = torch.arange(4, 28).view(2, 12)
PROBE_CLUSTERS = torch.tensor([0, 2])


class RankDumpPlugin(BasePlugin):
    def post_train(self, cfg, model):
        rank = int(os.environ.get("RANK", "0"))
        out = Path(cfg.output_dir) / f"rank{rank}_moce.safetensors"
        if out.exists():
            return
        save_file(moce_state_dict(model), str(out))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=PROBE_IDS, moce_cluster_ids=PROBE_CLUSTERS).logits
        model.train(was_training)
        torch.save(logits.cpu(), Path(cfg.output_dir) / f"rank{rank}_logits.pt")
