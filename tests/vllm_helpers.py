"""A tiny MoCE export vLLM's CPU attention accepts (head_dim 64), and scripts run in the
separate vLLM environment (``.venv-vllm``, made by ``scripts/install.sh``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hf_native_helpers import ROOT, build_artifact, build_output, tiny_base  # noqa: F401

VLLM_PYTHON = Path(os.environ.get("MOCE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
# CPU attention needs head_dim 64 (it refuses 8 or 16).
HEAD_DIM_64 = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=64)
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def require_vllm() -> Path:
    """The vLLM environment's python; in CI its absence fails the test, locally it skips."""
    if VLLM_PYTHON.is_file():
        return VLLM_PYTHON
    message = (f"no vLLM environment at {VLLM_PYTHON}: run `bash scripts/install_vllm.sh` "
               "(or set MOCE_VLLM_PYTHON)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def build_exports(root: Path, configs: dict) -> dict[str, Path]:
    """base (head_dim 64) -> 3-cluster artifact (real MiniLM) -> one MoCE output and export
    per ``{name: MoCEConfig}``."""
    from moce_plugin.export import export_model

    base = tiny_base_64(root / "base")
    artifact = build_artifact(root / "artifact")
    exports = {}
    for name, cfg in configs.items():
        build_output(base, root / f"out_{name}", artifact, cfg=cfg)
        exports[name] = export_model(root / f"out_{name}", root / f"export_{name}")
    return exports


def tiny_base_64(path: Path) -> Path:
    from axolotl_helpers import sample_rows
    from tiny_models import save_tiny_model_dir

    texts = [t for r in sample_rows(200) for t in (r["instruction"], r["output"])]
    return save_tiny_model_dir(path, texts, **HEAD_DIM_64)


def run_vllm(script: Path, cwd: Path, *args: str, timeout: int = 900,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the file ``script`` (with a ``__main__`` guard: vLLM's engine starts child
    processes) with the vLLM environment's python."""
    python = require_vllm()
    proc = subprocess.run([str(python), str(script), *args], cwd=cwd,
                          env={**os.environ, **VLLM_ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM process failed:\n{proc.stderr[-6000:]}")
    return proc
