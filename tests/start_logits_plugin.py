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
        import os
        from contextlib import nullcontext

        gathered = nullcontext()
        params = list(model.parameters())
        if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: params loaded under zero.Init
            import deepspeed  # are shards; every rank gathers them (a collective) to probe

            gathered = deepspeed.zero.GatheredParameters(params)
        was_training = model.training
        model.eval()
        with torch.no_grad(), gathered:
            logits = model(input_ids=PROBE_IDS, moce_cluster_ids=PROBE_CLUSTERS).logits
        model.train(was_training)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        torch.save(logits.float().cpu(), Path(cfg.output_dir) / "start_logits.pt")
