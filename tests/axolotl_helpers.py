"""Running the real axolotl on tiny models inside tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "data" / "moce_sample.jsonl"
SOURCE_TO_CLUSTER = {"alpaca": 0, "code_alpaca": 1, "gsm8k": 2}

CPU_SETTINGS = dict(
    attn_implementation="sdpa",
    lora_mlp_kernel=False,
    lora_qkv_kernel=False,
    lora_o_kernel=False,
    lora_embedding_kernel=False,
    bf16=False,
    fp16=False,
    tf32=False,
)


def sample_rows(limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    return rows[:limit] if limit else rows


def write_cluster_jsonl(path: Path, limit: int | None = None, fmt: str = "alpaca") -> Path:
    """The bundled sample with a `cluster_id` column (= its source domain)."""
    with open(path, "w") as f:
        for r in sample_rows(limit):
            cid = SOURCE_TO_CLUSTER[r["source"]]
            if fmt == "alpaca":
                row = {**r, "cluster_id": cid}
            elif fmt == "chat":
                row = {"messages": [
                    {"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()},
                    {"role": "assistant", "content": r["output"]},
                ], "cluster_id": cid}
            elif fmt == "completion":
                row = {"text": r["instruction"] + "\n" + r["output"], "cluster_id": cid}
            else:
                raise ValueError(fmt)
            f.write(json.dumps(row) + "\n")
    return path


def base_config(model_dir: Path, data: Path, out: Path, **overrides) -> dict:
    cfg = dict(
        base_model=str(model_dir),
        plugins=["moce_plugin.MoCEPlugin"],
        moce=dict(num_clusters=3, experts_per_group=2, top_k=1, adapter_dim=8),
        datasets=[dict(path=str(data), type="alpaca", ds_type="json")],
        dataset_prepared_path=str(out / "prepared"),
        val_set_size=0.05,
        sequence_len=256,
        sample_packing=False,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=0.03,
        optimizer="adamw_torch",
        lr_scheduler="constant",
        logging_steps=1,
        save_steps=4,
        output_dir=str(out / "model"),
        seed=42,
        dataloader_num_workers=0,
        **CPU_SETTINGS,
    )
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def qlora_example_settings() -> dict:
    """The quantization + LoRA target settings of examples/llama2-moce-qlora.yml."""
    example = yaml.safe_load((ROOT / "examples" / "llama2-moce-qlora.yml").read_text())
    return {k: example[k] for k in ("adapter", "load_in_4bit", "lora_target_linear")}


def env() -> dict:
    e = dict(os.environ)
    e.update(
        AXOLOTL_DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")]),
    )
    return e


def run_train(
    cfg: dict, workdir: Path, nproc: int = 1, timeout: int = 900
) -> subprocess.CompletedProcess:
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    if nproc == 1:
        cmd = [sys.executable, "-m", "axolotl.cli.train", str(path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", "29517", "-m", "axolotl.cli.train", str(path)]
    e = env()
    if nproc > 1:
        e["ACCELERATE_USE_CPU"] = "true"
    proc = subprocess.run(cmd, cwd=workdir, env=e, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"axolotl train failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
            f"{proc.stderr[-8000:]}"
        )
    return proc


def train_losses(checkpoint_dir: Path) -> dict[int, float]:
    state = json.loads((checkpoint_dir / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
