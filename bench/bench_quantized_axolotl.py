"""QLoRA (4-bit NF4) and 8-bit bases with MoCE through the real `axolotl train` CLI on the CPU
SmolLM2 example (one process, bitsandbytes' CPU backend), then reload and export the output.

    python -m bench.bench_quantized_axolotl                 # both, 15 steps, sequence_len 256
    python -m bench.bench_quantized_axolotl --bits 4 --steps 20 --json out.json

Each run is examples/cpu-smollm2-moce.yml (SmolLM2-135M-Instruct, MoCE 3 clusters x 4
experts, top-2, adapter_dim 64, packed, fp32, the bundled example data) with the 3 clusters
from a ``cluster_id`` column (no clustering step), ``sequence_len`` --seq, micro-batch 1,
``max_steps`` --steps, no evaluation, one save at the end, and the quantization + LoRA
settings of examples/llama2-moce-qlora.yml (``adapter: qlora``, ``load_in_4bit``, ``lora_r``,
``lora_alpha``, ``lora_dropout``, ``lora_target_linear``, ``gradient_checkpointing``); for 8
bits ``adapter: lora`` + ``load_in_8bit`` instead.

Checked (a failed check raises): the frozen FFN's linears are bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` and the FFN runs once per forward, MoCE parameters are float32 and trainable
(tests/quant_check_plugin.py), the loss falls (mean of the first 3 steps > mean of the
last 3; of the first/last half in runs under 6 steps), the adapter holds the MoCE tensors,
``load_moce_model`` reloads the output and ``python -m moce_plugin.export`` exports it.
Printed: per-step loss, median s/step (wall and CPU, bench_sharded.py's step timer; the
first step is left out) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.bench_sharded import MODEL, make_config, write_data
from bench.machine_info import cpu_model, ensure_smollm2

ROOT = Path(__file__).resolve().parents[1]

QLORA_EXAMPLE = ROOT / "examples" / "llama2-moce-qlora.yml"
EXAMPLE_KEYS = ("adapter", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout",
                "lora_target_linear", "gradient_checkpointing")
FFN_CLASS = {4: "Linear4bit", 8: "Linear8bitLt"}


def quant_config(bits: int, tmp: Path, data: Path, steps: int, seq: int, model: Path) -> dict:
    cfg = make_config("single", tmp, data, steps, seq, model)
    example = yaml.safe_load(QLORA_EXAMPLE.read_text())
    cfg.update({k: example[k] for k in EXAMPLE_KEYS})
    if bits == 8:
        cfg.update(adapter="lora", load_in_8bit=True)
        cfg.pop("load_in_4bit")
    cfg.update(
        plugins=["moce_plugin.MoCEPlugin", "bench.step_timer.StepTimerPlugin",
                 "quant_check_plugin.QuantCheckPlugin"],
        save_strategy="steps", save_steps=steps,
    )
    return cfg


def run(bits: int, steps: int, seq: int, threads: int, model: Path) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"moce_bench_q{bits}_"))
    data = tmp / "data.jsonl"
    write_data(data)
    cfg_path = tmp / "config.yml"
    cfg_path.write_text(yaml.safe_dump(quant_config(bits, tmp, data, steps, seq, model)))
    env = dict(os.environ)
    env.update(
        AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MOCE_BENCH_DIR=str(tmp),
        # tests/ for the QuantCheckPlugin the suite uses too.
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                    env.get("PYTHONPATH", "")]),
    )
    log_path = tmp / "train.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call([sys.executable, "-m", "axolotl.cli.train", str(cfg_path)],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{bits}-bit run failed (rc={rc}), log {log_path}:\n"
                           f"{log_path.read_text()[-4000:]}")
    out = tmp / "model"
    timing = json.loads((tmp / "rank0.json").read_text())
    quant = json.loads((out / "quant_check.json").read_text())
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    problems = check(bits, quant, losses, out)
    t1 = time.perf_counter()
    export = subprocess.run([sys.executable, "-m", "moce_plugin.export", str(out),
                             str(tmp / "exported")], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    if export.returncode != 0 or not (tmp / "exported" / "moce_weights.safetensors").is_file():
        problems.append(f"export failed: {export.stderr[-2000:]}")
    return {"bits": bits, "tmp": str(tmp), "train_wall_s": wall, "losses": losses,
            "median_step_s": statistics.median(timing["step_times"][1:]),
            "median_cpu_s": statistics.median(timing["cpu_times"][1:]),
            "peak_rss_mb": timing["peak_rss_mb"], "quant_check": quant,
            "export_s": time.perf_counter() - t1, "problems": problems}


def check(bits: int, quant: dict, losses: list[float], out: Path) -> list[str]:
    """What must hold for a quantized MoCE run; returns the problems found."""
    import torch
    from safetensors.torch import load_file

    from moce_plugin.inference import load_moce_model

    problems = []
    if quant["ffn_classes"] != [FFN_CLASS[bits]]:
        problems.append(f"FFN linears are {quant['ffn_classes']}, not {FFN_CLASS[bits]}")
    if quant["ffn_bytes_per_weight"] != [bits / 8]:
        problems.append(f"FFN storage {quant['ffn_bytes_per_weight']} bytes/weight")
    if quant["moce_dtypes"] != ["torch.float32"] or not quant["moce_trainable"]:
        problems.append(f"MoCE {quant['moce_dtypes']}, trainable {quant['moce_trainable']}")
    if quant["ffn_calls_per_forward"] != 1:
        problems.append(f"FFN ran {quant['ffn_calls_per_forward']} times per forward")
    k = max(1, min(3, len(losses) // 2))  # first/last 3 steps; fewer in a short run
    if not losses or sum(losses[-k:]) / k >= sum(losses[:k]) / k:
        problems.append(f"loss did not fall: {losses}")
    adapter = load_file(str(out / "adapter_model.safetensors"))
    if not any("moce_experts" in k for k in adapter):
        problems.append("no MoCE tensors in adapter_model.safetensors")
    reloaded = load_moce_model(out)
    with torch.no_grad():
        logits = reloaded.model(input_ids=torch.arange(4, 28).view(2, 12),
                                moce_cluster_ids=torch.tensor([0, 2])).logits
    if not torch.isfinite(logits).all():
        problems.append("reloaded model gives non-finite logits")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bits", default="4,8", help="4, 8 or 4,8")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--seq", type=int, default=256, help="sequence_len")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--json", default=None, help="all results (losses, timings, checks)")
    args = p.parse_args()
    model = Path(args.model)
    ensure_smollm2(model)
    import torch

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"model {model.name}, sequence_len {args.seq}, micro-batch 1, {args.steps} steps, "
          f"{args.threads} threads, load avg {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for bits in (int(b) for b in args.bits.split(",")):
        print(f"running {bits}-bit ...", flush=True)
        r = run(bits, args.steps, args.seq, args.threads, model)
        results.append(r)
        q = r["quant_check"]
        print(f"  {bits}-bit: FFN {q['ffn_classes']} ({q['ffn_bytes_per_weight']} B/weight, "
              f"{q['ffn_calls_per_forward']} call/forward), MoCE {q['moce_dtypes']} "
              f"trainable={q['moce_trainable']}\n"
              f"  losses {' '.join(f'{v:.3f}' for v in r['losses'])}\n"
              f"  median {r['median_step_s']:.2f} s/step (cpu {r['median_cpu_s']:.2f} s), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, train {r['train_wall_s']:.0f} s wall, "
              f"export {r['export_s']:.0f} s; load avg {os.getloadavg()[0]:.1f}\n"
              f"  {'OK' if not r['problems'] else 'PROBLEMS: ' + '; '.join(r['problems'])}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if any(r["problems"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
