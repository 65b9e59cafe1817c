"""Test-only axolotl plugin: after every optimizer step, appends Dynamo's counters (graphs
compiled, graph breaks by reason, frames that failed to compile) to
``<output_dir>/dynamo_counters.jsonl``, so a test can check what ``torch_compile: true`` made
of a real ``axolotl train`` run (axolotl sets ``suppress_errors``: a failed compile falls
back to eager silently, so failures are counted too)."""

from __future__ import annotations

import json
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from torch._dynamo.utils import counters
from transformers import TrainerCallback


class _Dump(TrainerCallback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_step_end(self, args, state, control, **kwargs):
        row = {
            "step": state.global_step,
            "graphs": counters["stats"]["unique_graphs"],
            "frames": dict(counters["frames"]),
            "graph_breaks": {k.splitlines()[0]: v for k, v in counters["graph_break"].items()},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class DynamoCountersPlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        return [_Dump(Path(cfg.output_dir) / "dynamo_counters.jsonl")]
