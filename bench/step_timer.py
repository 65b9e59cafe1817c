"""Axolotl plugin for the training benchmarks: each rank's optimizer-step times and peak RSS.

Used by bench_train_step.py, bench_sharded.py and bench_quantized_axolotl.py
(``plugins: [bench.step_timer.StepTimerPlugin]``, the repository root on PYTHONPATH).
Rank R writes ``$MOCE_BENCH_DIR/rank<R>.json`` after every step: wall and CPU seconds per
step (``on_step_begin`` -> ``on_step_end``) and the process's peak RSS so far
(``ru_maxrss``).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

try:  # only needed inside the axolotl processes; the drivers import rank_file alone
    from axolotl.integrations.base import BasePlugin
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    BasePlugin = object  # type: ignore[assignment,misc]
    TrainerCallback = object  # type: ignore[assignment,misc]


def rank_file(folder: str | Path, rank: int | str = 0) -> Path:
    return Path(folder) / f"rank{rank}.json"


class _StepTimer(TrainerCallback):  # type: ignore[misc,valid-type]
    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._t0 = self._c0 = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu_times.append(time.process_time() - self._c0)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.path.write_text(json.dumps({"step_times": self.times, "cpu_times": self.cpu_times,
                                         "peak_rss_mb": peak_kb / 1024}))


class StepTimerPlugin(BasePlugin):  # type: ignore[misc,valid-type]
    """Writes this rank's step times and peak RSS to $MOCE_BENCH_DIR/rank<RANK>.json."""

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        path = rank_file(os.environ["MOCE_BENCH_DIR"], os.environ.get("RANK", "0"))
        return [_StepTimer(path)]
