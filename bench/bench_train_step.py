"""End-to-end `axolotl train` step time and peak RSS: MoCE vs LoRA-only vs PESC-style MoE.

    python -m bench.bench_train_step                 # 3 variants, 6 steps each, 2 warm-up
    python -m bench.bench_train_step --steps 8 --warmup 2 --csv out.csv

Variants (all on examples/models/SmolLM2-135M-Instruct, sequence_len 512, packed,
micro_batch 1, gradient accumulation 4, fp32 on CPU):

- ``lora``:  ``adapter: lora``, r = 64 on every linear layer (``lora_target_linear``), no MoCE.
- ``lora_mlp``: ``adapter: lora``, r = 64 on the MLP only (gate/up/down), no MoCE.
- ``pesc``:  MoCE with ``num_clusters: 1`` (one group of 4 experts, top-2): PESC-style MoE
             adapters without clustering; frozen base.
- ``moce``:  MoCE with 3 clusters from a ``cluster_id`` column (alpaca 0, code_alpaca 1,
             gsm8k 2), 4 experts per group, top-2, adapter_dim 64; frozen base.

Each variant runs ``python -m axolotl.cli.train`` in its own temp dir, in its own wrapper
process, so ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is that run's peak RSS (whole process:
model, optimizer state, activations, python/axolotl overhead). Step times come from a tiny
axolotl plugin in bench/step_timer.py (``StepTimerPlugin``), a TrainerCallback timing
``on_step_begin`` -> ``on_step_end`` (one optimizer step = 4 micro-batches fwd+bwd + AdamW).
and the process CPU time of the same span (``time.process_time``). The first ``--warmup``
steps are dropped; the median of the rest is reported. On a shared machine run with
``--threads 1``: then CPU time per step is the step's cost without the other tenants'
load (wall time is still printed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine_info import cpu_model, ensure_smollm2
from bench.step_timer import rank_file

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "SmolLM2-135M-Instruct"
DATA = ROOT / "examples" / "data" / "moce_sample.jsonl"
CLUSTER_OF_SOURCE = {"alpaca": 0, "code_alpaca": 1, "gsm8k": 2}

# --------------------------------------------------------------------------- driver
COMMON = f"""\
base_model: {MODEL}
datasets:
  - path: {{data}}
    type: alpaca
    ds_type: json
dataset_prepared_path: {{tmp}}/prepared
val_set_size: 0
output_dir: {{tmp}}/model
sequence_len: 512
sample_packing: true
micro_batch_size: 1
gradient_accumulation_steps: {{ga}}
max_steps: {{steps}}
learning_rate: 0.001
optimizer: adamw_torch
lr_scheduler: constant
logging_steps: 1
save_strategy: "no"
seed: 42
attn_implementation: sdpa
bf16: false
fp16: false
tf32: false
lora_mlp_kernel: false
lora_qkv_kernel: false
lora_o_kernel: false
lora_embedding_kernel: false
dataloader_num_workers: 0
"""

MOCE_BLOCK = """\
plugins:
  - moce_plugin.MoCEPlugin
  - bench.step_timer.StepTimerPlugin
moce:
  num_clusters: {k}
  experts_per_group: 4
  top_k: 2
  num_general_experts: 0
  adapter_dim: 64
  adapter_scaling: 1.0
  adapter_activation: sigmoid
  router_aux_loss_coef: 0.01
"""

LORA_BLOCK = """\
plugins:
  - bench.step_timer.StepTimerPlugin
adapter: lora
lora_r: 64
lora_alpha: 64
lora_dropout: 0.0
lora_target_linear: true
"""

LORA_MLP_BLOCK = """\
plugins:
  - bench.step_timer.StepTimerPlugin
adapter: lora
lora_r: 64
lora_alpha: 64
lora_dropout: 0.0
lora_target_modules:
  - gate_proj
  - up_proj
  - down_proj
"""

VARIANTS = {
    "lora": LORA_BLOCK,
    "lora_mlp": LORA_MLP_BLOCK,
    "pesc": MOCE_BLOCK.format(k=1),
    "moce": MOCE_BLOCK.format(k=3),
}

# Peak-RSS wrapper: a fresh process whose only child is the training run.
WRAPPER = """
import resource, subprocess, sys, json
rc = subprocess.call(sys.argv[1:])
print(json.dumps({"rc": rc, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def write_data(path: Path, variant: str) -> None:
    with open(DATA) as src, open(path, "w") as dst:
        for line in src:
            row = json.loads(line)
            if variant == "moce":
                row["cluster_id"] = CLUSTER_OF_SOURCE[row["source"]]
            elif variant == "pesc":
                row["cluster_id"] = 0  # one group: no clustering
            dst.write(json.dumps(row) + "\n")


def run_variant(name: str, steps: int, ga: int, keep_logs: Path | None,
                threads: int | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"moce_bench_{name}_"))
    data = tmp / "data.jsonl"
    write_data(data, name)
    cfg = COMMON.format(data=data, tmp=tmp, ga=ga, steps=steps) + VARIANTS[name]
    cfg_path = tmp / "config.yml"
    cfg_path.write_text(cfg)
    times_path = rank_file(tmp)
    env = dict(os.environ)
    env.update(
        AXOLOTL_DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MOCE_BENCH_DIR=str(tmp),
        **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    log_path = tmp / "train.log"
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-c", WRAPPER, sys.executable, "-m", "axolotl.cli.train",
             str(cfg_path)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
        )
    wall = time.perf_counter() - t0
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["rc"] != 0 or not times_path.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"variant {name} failed (rc={res['rc']}), log {log_path}:\n{tail}")
    timing = json.loads(times_path.read_text())
    times, cpu_times = timing["step_times"], timing["cpu_times"]
    if keep_logs:
        keep_logs.mkdir(parents=True, exist_ok=True)
        (keep_logs / f"{name}.yml").write_text(cfg)
        (keep_logs / f"{name}.log").write_text(log_path.read_text())
    return {
        "variant": name,
        "step_times": times,
        "cpu_times": cpu_times,
        "peak_rss_mb": res["maxrss_kb"] / 1024,
        "wall_s": wall,
        "loadavg_1m": (load_before, os.getloadavg()[0]),
        "tmp": str(tmp),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--variants", default="lora,lora_mlp,pesc,moce")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads of each run (default: torch's default)")
    p.add_argument("--csv", default=None)
    p.add_argument("--json", default=None, help="raw per-step times")
    p.add_argument("--keep-logs", default=None, help="folder for configs + train logs")
    args = p.parse_args()

    ensure_smollm2(MODEL)
    import torch

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {args.threads or torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")
    results = []
    for name in args.variants.split(","):
        print(f"running {name} ...", flush=True)
        r = run_variant(name, args.steps, args.grad_accum,
                        Path(args.keep_logs) if args.keep_logs else None, args.threads)
        kept = r["step_times"][args.warmup:]
        r["median_step_s"] = statistics.median(kept)
        r["mean_step_s"] = statistics.fmean(kept)
        r["min_step_s"] = min(kept)
        r["median_cpu_s"] = statistics.median(r["cpu_times"][args.warmup:])
        results.append(r)
        print(f"  {name}: steps {[round(t, 2) for t in r['step_times']]}  "
              f"cpu {[round(t, 2) for t in r['cpu_times']]}  "
              f"median {r['median_step_s']:.2f} s  peak RSS {r['peak_rss_mb']:.0f} MB  "
              f"load avg {r['loadavg_1m'][0]:.1f} -> {r['loadavg_1m'][1]:.1f}", flush=True)

    base = next((r for r in results if r["variant"] == "lora"), results[0])
    print()
    print(f"{'variant':8s} {'median step s':>14s} {'min step s':>11s} {'median cpu s':>13s} "
          f"{'peak RSS MB':>12s} {'time / lora':>12s} {'cpu / lora':>11s} {'RSS / lora':>11s}")
    for r in results:
        print(f"{r['variant']:8s} {r['median_step_s']:14.2f} {r['min_step_s']:11.2f} "
              f"{r['median_cpu_s']:13.2f} {r['peak_rss_mb']:12.0f} "
              f"{r['median_step_s'] / base['median_step_s']:12.2f} "
              f"{r['median_cpu_s'] / base['median_cpu_s']:11.2f} "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:11.2f}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "median_step_s", "mean_step_s", "median_cpu_s", "peak_rss_mb",
                        "time_vs_lora", "cpu_vs_lora", "rss_vs_lora", "step_times",
                        "cpu_times"])
            for r in results:
                w.writerow([r["variant"], f"{r['median_step_s']:.4f}", f"{r['mean_step_s']:.4f}",
                            f"{r['median_cpu_s']:.4f}", f"{r['peak_rss_mb']:.1f}",
                            f"{r['median_step_s'] / base['median_step_s']:.4f}",
                            f"{r['median_cpu_s'] / base['median_cpu_s']:.4f}",
                            f"{r['peak_rss_mb'] / base['peak_rss_mb']:.4f}",
                            " ".join(f"{t:.3f}" for t in r["step_times"]),
                            " ".join(f"{t:.3f}" for t in r["cpu_times"])])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
