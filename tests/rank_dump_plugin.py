"""Test-only axolotl plugin: every rank writes its MoCE weights after training, so the
DDP test can check that all ranks ended with identical weights."""

from __future__ import annotations

import os
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from safetensors.torch import save_file

from moce_plugin.model import moce_state_dict


class RankDumpPlugin(BasePlugin):
    def post_train(self, cfg, model):
        rank = int(os.environ.get("RANK", "0"))
        out = Path(cfg.output_dir) / f"rank{rank}_moce.safetensors"
        if not out.exists():
            save_file(moce_state_dict(model), str(out))
