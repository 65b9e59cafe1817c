"""Test-only axolotl plugin: seed torch's global RNG (with the config's seed) right before PEFT
creates the LoRA weights.

PEFT draws LoRA's A matrices from the global RNG, whose state at that point depends on the
launch (one process vs DeepSpeed ranks consume different amounts of it before), so without
this a sharded LoRA run and its single-process reference start from different LoRA weights
(cosine ~0 between their lora_A) and only their step-1 losses agree (B = 0)."""

from __future__ import annotations

from typing import Any

import torch
from axolotl.integrations.base import BasePlugin


class SeedLoraPlugin(BasePlugin):
    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        torch.manual_seed(int(cfg.seed or 0))
