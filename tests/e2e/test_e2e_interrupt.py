"""A real `axolotl train` stopped by SIGINT (axolotl saves the model and exits 0) or SIGTERM
after its first checkpoint: what it left is loadable and generates (or, where its weights are
the start-of-training ones, refused with the checkpoint to use instead)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from axolotl_helpers import base_config, env, sample_rows
from safetensors.torch import load_file
from tiny_models import save_tiny_model_dir

from moce_plugin.clustering import ClusteringOptions, rows_from_examples, run_clustering
from moce_plugin.outputs.folder import ARTIFACT_DIR_NAME, MOCE_WEIGHTS_NAME, read_meta
from moce_plugin.outputs.load import MoCELoadError, load_moce_model

pytestmark = pytest.mark.slow


class HashEncoder:
    """A text-seeded random vector: a cheap stand-in for MiniLM (this test is about what an
    interrupted run leaves, not about cluster quality), so generation gets explicit ids."""

    signature = "hash-encoder-v1"

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=8)
                         for t in texts]).astype(np.float32)


@pytest.fixture(scope="module")
def clustered_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt_data")
    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in sample_rows(120)]
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    opts = ClusteringOptions(cache_dir=str(root / "cache"), report=False)
    run_clustering(rows_from_examples(str(data), rows, "auto"), root / "clusters", 3, opts,
                   encoder=HashEncoder(), progress=False)
    return data, root / "clusters"


def _train_until_checkpoint(tmp_path: Path, cfg: dict, sig: int) -> subprocess.CompletedProcess:
    """Start `axolotl train`, wait for checkpoint-2 to be complete, send ``sig``."""
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "axolotl.cli.train", str(path)],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ready = Path(cfg["output_dir"]) / "checkpoint-2" / MOCE_WEIGHTS_NAME
    deadline = time.monotonic() + 300
    while not ready.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()[-4000:]}"
    time.sleep(0.5)  # a step or two later: output_dir's snapshot is newer than the checkpoint
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_is_loadable_and_generates(tmp_path, model_dir, clustered_data, sig):
    data, clusters = clustered_data
    cfg = base_config(model_dir, data, tmp_path, max_steps=2000, save_steps=2, val_set_size=0,
                      micro_batch_size=1, gradient_accumulation_steps=1, sequence_len=128)
    cfg["moce"] = dict(cfg["moce"], cluster_artifact=str(clusters))
    proc = _train_until_checkpoint(tmp_path, cfg, sig)
    out = Path(cfg["output_dir"])
    # Written when training started: config + meta, and the cluster artifact.
    assert (out / ARTIFACT_DIR_NAME / "centroids.npy").is_file()
    assert not (out / MOCE_WEIGHTS_NAME).exists()  # post_train never ran
    prompt = sample_rows(3)[2]["instruction"]
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    newest = checkpoints[-1]
    if (newest / MOCE_WEIGHTS_NAME).is_file() is False:  # killed between two saves
        newest = checkpoints[-2]

    # Every checkpoint loads alone: config, weights, and the run's cluster artifact.
    from_ckpt = load_moce_model(newest)
    assert from_ckpt.cluster_model.path.resolve() == (out / ARTIFACT_DIR_NAME).resolve()
    assert len(from_ckpt.generate([prompt], cluster=1, max_new_tokens=4)) == 1

    if sig == signal.SIGINT:
        assert proc.returncode == 0, proc.stdout[-4000:]
        meta = read_meta(out)
        assert meta["saved"] == "interrupted" and meta["step"] >= 2
        assert sorted(meta["base_fingerprint"]["tensors"]) == [
            "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.mlp.down_proj.weight"]
        texts = [t for r in sample_rows() for t in (r["instruction"], r["input"], r["output"])]
        other = save_tiny_model_dir(tmp_path / "other_base", texts, seed=1)  # same config
        with pytest.raises(MoCELoadError, match="other weights"):
            load_moce_model(out, base_model=str(other))
        moce = load_moce_model(out)  # MoCE tensors come from model.safetensors
        saved = load_file(str(out / "model.safetensors"))
        up = next(m for n, m in moce.model.named_modules() if n.endswith("0.mlp.moce_experts")).up
        assert torch.equal(up, saved["model.layers.0.mlp.moce_experts.up"])
        at_step_2 = load_file(str(checkpoints[0] / MOCE_WEIGHTS_NAME))["layers.0.up"]
        assert not torch.equal(up, at_step_2) or meta["step"] == 2  # the newer snapshot
        assert moce.cluster_model is not None
        assert len(moce.generate([prompt], cluster=2, max_new_tokens=4)) == 1
    else:
        assert proc.returncode == -signal.SIGTERM
        assert read_meta(out)["saved"] == "start"
        # axolotl pre-saved no weights here (single process): the error names the checkpoint
        with pytest.raises(MoCELoadError, match=f"stopped before.*{checkpoints[-1].name}"):
            load_moce_model(out)
