"""Test-only axolotl plugin: the logits of the freshly loaded model (before any training step)
on a fixed input, written to ``<output_dir>/start_logits.pt``: a run started from a MoCE
model must compute exactly what that model computed."""

from __future__ import annotations

from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin

PROBE_IDS = torch.arange(4, 28).view(2, 12)
PROBE_CLUSTERS = torch.tensor([0, 2])


class StartLogitsPlugin(BasePlugin):
    def post_model_load(self, cfg, model):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=PROBE_IDS, moce_cluster_ids=PROBE_CLUSTERS).logits
        model.train(was_training)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        torch.save(logits.float().cpu(), Path(cfg.output_dir) / "start_logits.pt")
