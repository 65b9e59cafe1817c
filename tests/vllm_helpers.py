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
    message = (f"no vLLM environment at {VLLM_PYTHON}: run `bash scripts/install.sh --vllm` "
               "(or set MOCE_VLLM_PYTHON)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def build_export(root: Path, cfg=None) -> Path:
    """base (head_dim 64) -> 3-cluster artifact (real MiniLM) -> MoCE output -> export."""
    from hf_native_helpers import CFG

    from moce_plugin.export import export_model
    from moce_plugin.outputs.folder import base_config_summary  # noqa: F401

    base = tiny_base_64(root / "base")
    artifact = build_artifact(root / "artifact")
    build_output(base, root / "out", artifact, cfg=cfg or CFG)
    return export_model(root / "out", root / "dest")


def tiny_base_64(path: Path) -> Path:
    from axolotl_helpers import sample_rows
    from tiny_models import save_tiny_model_dir

    texts = [t for r in sample_rows(200) for t in (r["instruction"], r["output"])]
    return save_tiny_model_dir(path, texts, **HEAD_DIM_64)


def run_vllm(script: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` with the vLLM environment's python (a ``__main__`` guard is added by
    the caller: vLLM's engine starts child processes)."""
    python = require_vllm()
    proc = subprocess.run([str(python), "-c", script], cwd=cwd,
                          env={**os.environ, **VLLM_ENV}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM process failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return proc
