"""Per-rank step time and peak RSS of `axolotl train` with MoCE on the CPU SmolLM2 example:
one process vs 2 processes under DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (gloo).

    python -m bench.bench_sharded                      # 30 timed steps (+2 warm-up), seq 128
    python -m bench.bench_sharded --steps 10 --modes single,zero3 --seq 256 --json out.json

Every run is examples/cpu-smollm2-moce.yml (SmolLM2-135M-Instruct, MoCE 3 clusters x 4
experts, top-2, adapter_dim 64, packed, fp32) with: the 3 clusters from a ``cluster_id``
column (no clustering step), ``sequence_len`` --seq, ``max_steps`` warm-up + --steps, no
evaluation and no checkpoints, and the same global batch in every mode (micro-batch 1 x
accumulation 4 on one process = 2 ranks x 1 x 2). Sharding settings are the examples'
(``fsdp_config`` of examples/llama2-moce-fsdp.yml, examples/deepspeed/zero2.json /
zero3_bf16.json). The one process gets all --threads (default: all cores), each of the 2
ranks half of them.

Per rank, the plugin in bench/step_timer.py records each optimizer step's wall and CPU time
(``on_step_begin`` -> ``on_step_end``) and the process's peak RSS (``ru_maxrss``: model,
optimizer state, activations, gathered shards, python/axolotl/deepspeed overhead). Printed:
median over the timed steps per rank, and the peak RSS per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from bench.launch import module_command
from bench.machine_info import cpu_model, ensure_smollm2
from bench.step_timer import rank_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cpu-smollm2-moce.yml"
MODEL = ROOT / "examples" / "models" / "SmolLM2-135M-Instruct"
DATA = ROOT / "examples" / "data" / "moce_sample.jsonl"
CLUSTER_OF_SOURCE = {"alpaca": 0, "code_alpaca": 1, "gsm8k": 2}
MODES = ("single", "ddp", "fsdp2", "zero2", "zero3")

# --------------------------------------------------------------------------- driver
def write_data(path: Path) -> None:
    with open(DATA) as src, open(path, "w") as dst:
        for line in src:
            row = json.loads(line)
            row["cluster_id"] = CLUSTER_OF_SOURCE[row["source"]]
            dst.write(json.dumps(row) + "\n")


def make_config(mode: str, tmp: Path, data: Path, steps: int, seq: int,
                model: Path = MODEL) -> dict:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["base_model"] = str(model)
    cfg["plugins"] = ["moce_plugin.MoCEPlugin", "bench.step_timer.StepTimerPlugin"]
    moce = dict(cfg["moce"])
    moce.update(num_clusters=3)
    moce.pop("cluster_artifact", None)
    moce.pop("clustering", None)
    cfg["moce"] = moce
    cfg.update(
        datasets=[{"path": str(data), "type": "alpaca", "ds_type": "json"}],
        dataset_prepared_path=str(tmp / "prepared"), output_dir=str(tmp / "model"),
        val_set_size=0, sequence_len=seq, max_steps=steps, save_strategy="no",
        lr_scheduler="constant", warmup_steps=0, micro_batch_size=1, save_steps=None,
        gradient_accumulation_steps=4 if mode == "single" else 2,
    )
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if mode == "fsdp2":
        example = yaml.safe_load((ROOT / "examples" / "llama2-moce-fsdp.yml").read_text())
        cfg["fsdp_version"] = example["fsdp_version"]
        cfg["fsdp_config"] = dict(example["fsdp_config"],
                                  transformer_layer_cls_to_wrap="LlamaDecoderLayer")
    elif mode == "zero2":
        cfg["deepspeed"] = str(ROOT / "examples" / "deepspeed" / "zero2.json")
    elif mode == "zero3":
        cfg["deepspeed"] = str(ROOT / "examples" / "deepspeed" / "zero3_bf16.json")
    return cfg


def run_mode(mode: str, steps: int, seq: int, threads: int, keep: Path | None,
             model: Path = MODEL) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"moce_bench_sharded_{mode}_"))
    data = tmp / "data.jsonl"
    write_data(data)
    cfg = make_config(mode, tmp, data, steps, seq, model)
    cfg_path = tmp / "config.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    nproc = 1 if mode == "single" else 2
    per_rank_threads = max(1, threads // nproc)
    env = dict(os.environ)
    env.update(
        AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS=str(per_rank_threads), MKL_NUM_THREADS=str(per_rank_threads),
        MOCE_BENCH_DIR=str(tmp),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = module_command("axolotl.cli.train", [str(cfg_path)], nproc)
    log_path = tmp / "train.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{mode}.yml").write_text(cfg_path.read_text())
        (keep / f"{mode}.log").write_text(log_path.read_text())
    ranks = [json.loads(rank_file(tmp, r).read_text())
             for r in range(nproc) if rank_file(tmp, r).exists()]
    if rc != 0 or len(ranks) != nproc:
        raise RuntimeError(f"{mode} failed (rc={rc}), log {log_path}:\n"
                           f"{log_path.read_text()[-4000:]}")
    return {"mode": mode, "nproc": nproc, "threads_per_rank": per_rank_threads, "ranks": ranks,
            "wall_s": wall, "tmp": str(tmp)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq", type=int, default=128, help="sequence_len")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads in total (one process: all; 2 ranks: half each)")
    p.add_argument("--model", default=str(MODEL),
                   help="base model folder (default: SmolLM2; a tiny llama for a smoke run)")
    p.add_argument("--json", default=None, help="raw per-step times")
    p.add_argument("--keep-logs", default=None, help="folder for configs + train logs")
    args = p.parse_args()

    model = Path(args.model)
    ensure_smollm2(model)
    import torch


    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"model {model.name}, sequence_len {args.seq}, global batch 4 sequences, "
          f"{args.steps} timed steps (+{args.warmup} warm-up), "
          f"load avg {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for mode in args.modes.split(","):
        print(f"running {mode} ...", flush=True)
        r = run_mode(mode, args.warmup + args.steps, args.seq, args.threads,
                     Path(args.keep_logs) if args.keep_logs else None, model)
        for rank in r["ranks"]:
            kept = rank["step_times"][args.warmup:]
            rank["median_step_s"] = statistics.median(kept)
            rank["median_cpu_s"] = statistics.median(rank["cpu_times"][args.warmup:])
        results.append(r)
        print(f"  {mode}: " + "; ".join(
            f"rank {i}: median {k['median_step_s']:.2f} s/step (cpu {k['median_cpu_s']:.2f} s),"
            f" peak RSS {k['peak_rss_mb']:.0f} MB" for i, k in enumerate(r["ranks"])),
            flush=True)
    single = next((r for r in results if r["mode"] == "single"), None)
    print()
    print(f"{'mode':7s} {'ranks':>5s} {'thr/rank':>8s} {'s/step r0':>9s} {'s/step r1':>9s} "
          f"{'cpu s r0':>8s} {'RSS MB r0':>9s} {'RSS MB r1':>9s} {'time/1p':>8s} {'RSS/1p':>7s}")
    for r in results:
        ks = r["ranks"]
        step = max(k["median_step_s"] for k in ks)
        rss = max(k["peak_rss_mb"] for k in ks)
        rel_t = step / single["ranks"][0]["median_step_s"] if single else float("nan")
        rel_m = rss / single["ranks"][0]["peak_rss_mb"] if single else float("nan")
        r1_step = f"{ks[1]['median_step_s']:9.2f}" if len(ks) > 1 else f"{'-':>9s}"
        r1_rss = f"{ks[1]['peak_rss_mb']:9.0f}" if len(ks) > 1 else f"{'-':>9s}"
        print(f"{r['mode']:7s} {r['nproc']:5d} {r['threads_per_rank']:8d} "
              f"{ks[0]['median_step_s']:9.2f} {r1_step} "
              f"{ks[0]['median_cpu_s']:8.2f} {ks[0]['peak_rss_mb']:9.0f} {r1_rss} "
              f"{rel_t:8.2f} {rel_m:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
