"""Generation throughput: MoCE vs the same base with one plain LoRA, measured side by side.

    python -m bench.bench_generate [--new-tokens 64] [--batch-sizes 1 4] [--repeats 3]
        [--threads 1] [--wall] [--exported [--artifact CLUSTER_ARTIFACT_DIR]]
        [--device cuda --dtype bfloat16] [--model-dir DIR --random-weights]

Model: SmolLM2-135M-Instruct (examples/prepare_smollm2.py converts it). MoCE: 3 groups x 4
experts, top-2, adapter dim 64 on every layer (the CPU example's setting), with non-zero
weights so the experts really run. LoRA: r=64 on the MLP projections (gate/up/down), unmerged
(as trained). Greedy decoding with the KV cache; prints tokens/s and the MoCE/LoRA ratio
(target: >= 0.95 at batch 1 and 4).

Timing: CPU time of this process (``time.process_time``) on ``--threads`` threads (default
1), the MoCE and LoRA runs interleaved one repeat at a time, best of ``--repeats``: on a
shared machine wall time measures the neighbours, and a load that drifts during the run hits
both models alike. ``--wall`` measures wall time instead. ``--device cuda`` times wall
clock with the GPU synchronised after each ``generate`` (the host's CPU time would miss the
GPU's); ``--random-weights`` builds the model from ``--model-dir``'s ``config.json`` alone
(same shapes and speed, no weight file: how a lent GPU machine runs it without the 540 MB
checkpoint).

``--exported`` also saves that MoCE model as a training output, exports it
(``moce_plugin.export``) and measures, in the same run, ``load_moce_model``'s model and the
exported folder loaded with ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``
(same cluster ids; target: exported / load_moce_model >= 0.9). With ``--artifact`` (a k=3
artifact) the exported model also runs with automatic clusters, assignment included.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.machine_info import cpu_model
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.upcycle import moce_experts_modules, upcycle_model

ROOT = Path(__file__).resolve().parents[1]

MODEL_DIR = ROOT / "examples" / "models" / "SmolLM2-135M-Instruct"
PROMPTS = [
    "Write a python function that checks whether a number is prime.",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many?",
    "Give three tips for staying healthy.",
    "Explain what a hash map is.",
]


def machine() -> str:
    if MODEL["device"] != "cpu":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {MODEL['dtype']}"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# Set by main() from --model-dir, --random-weights, --device and --dtype.
MODEL = {"dir": MODEL_DIR, "random": False, "device": "cpu", "dtype": torch.float32}


def load_base():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = MODEL["dir"]
    if not (model_dir / "config.json").is_file():
        fix = ("run `python examples/prepare_smollm2.py` first" if model_dir == MODEL_DIR
               else "--model-dir needs a model folder with config.json and tokenizer files")
        sys.exit(f"no model in {model_dir}: {fix}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if MODEL["random"]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                 dtype=MODEL["dtype"])
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=MODEL["dtype"])
    return model.to(MODEL["device"]).eval(), tok


def moce_model(plan: str | None = None):
    model, tok = load_base()
    cfg = MoCEConfig(num_clusters=3, experts_per_group=4, top_k=2, adapter_dim=64)
    upcycle_model(model, cfg)
    if plan is not None:
        for _, experts in moce_experts_modules(model):
            experts.plan = plan
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("moce_experts.up"):
                p.normal_(0, 0.01)
    return model, tok


def lora_model():
    from peft import LoraConfig, get_peft_model

    model, tok = load_base()
    # autocast_adapter_dtype=False: LoRA in the base's dtype, like MoCE's experts (PEFT would
    # keep a bf16 base's adapters in float32)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=64, lora_dropout=0.0,
                                             target_modules=["gate_proj", "up_proj", "down_proj"]),
                           autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.eval(), tok


# time.process_time (CPU time of this process) by default; main() switches with --wall.
CLOCK = time.process_time


def synchronize() -> None:
    if MODEL["device"] != "cpu":
        torch.cuda.synchronize()


@torch.no_grad()
def tokens_per_second(model, tok, batch: int, new_tokens: int, repeats: int, moce: bool,
                      warmup: bool = True) -> float:
    prompts = (PROMPTS * batch)[:batch]
    device = MODEL["device"]
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    extra = {"moce_cluster_ids": (torch.arange(batch) % 3).to(device)} if moce else {}
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id or tok.eos_token_id, use_cache=True)
    if warmup:
        model.generate(**enc, **extra, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = CLOCK()
        model.generate(**enc, **extra, **kwargs)
        synchronize()
        best = min(best, CLOCK() - start)
    return batch * new_tokens / best


def side_by_side(runs: dict, tok, batch: int, new_tokens: int, repeats: int) -> dict:
    """Best tokens/s of each (model, moce) in ``runs``, one repeat of each in turn."""
    for model, moce in runs.values():
        tokens_per_second(model, tok, batch, 4, 1, moce, warmup=False)
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for key, (model, moce) in runs.items():
            tps = tokens_per_second(model, tok, batch, new_tokens, 1, moce, warmup=False)
            best[key] = max(best[key], tps)
    return best


def exported_models(moce, artifact: str | None):
    """(load_moce_model's model, the exported folder via AutoModelForCausalLM)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from moce_plugin.export import export_model
    from moce_plugin.outputs.folder import (
        base_config_summary,
        copy_cluster_artifact,
        save_moce_files,
    )
    from moce_plugin.outputs.load import load_moce_model

    root = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    moce.save_pretrained(root / "out")
    save_moce_files(moce, moce._moce_config, root / "out",
                    {"base_model": str(MODEL_DIR), "prompt_format": "raw",
                     "base_config": base_config_summary(moce.config)})
    if artifact:
        copy_cluster_artifact(artifact, root / "out")
    export_model(root / "out", root / "dest")
    loaded = load_moce_model(root / "out").model
    auto = AutoModelForCausalLM.from_pretrained(root / "dest", trust_remote_code=True,
                                                dtype=torch.float32).eval()
    return loaded, auto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exported", action="store_true",
                        help="also load_moce_model vs the exported folder via AutoModel")
    parser.add_argument("--artifact", help="k=3 cluster artifact (automatic clusters)")
    parser.add_argument("--skip-lora", action="store_true", help="only the --exported table")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU time is then the step's cost)")
    parser.add_argument("--wall", action="store_true",
                        help="wall time instead of this process's CPU time")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: wall time)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR,
                        help="base model folder (default: the converted SmolLM2)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights from --model-dir's config.json (no weight file)")
    parser.add_argument("--plan", choices=["gather", "dense", "eager"],
                        help="force this expert plan in every MoCE layer (default: chosen "
                             "per call, moce_plugin.model.plans)")
    args = parser.parse_args()
    if args.exported and args.device != "cpu":
        parser.error("--exported runs on the CPU only")
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu")
    MODEL.update(dir=args.model_dir, random=args.random_weights, device=args.device,
                 dtype=getattr(torch, args.dtype))
    global CLOCK
    CLOCK = time.perf_counter if args.wall or args.device != "cpu" else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wall = CLOCK is time.perf_counter
    print(f"machine: {machine()}; {'wall' if wall else 'CPU'} time, best of "
          f"{args.repeats}, models interleaved")
    moce, tok = moce_model(args.plan)
    lora = None if args.skip_lora else lora_model()[0]
    if lora is not None:
        print(f"{'batch':>5} {'LoRA tok/s':>11} {'MoCE tok/s':>11} {'MoCE/LoRA':>10}")
    for batch in args.batch_sizes if lora is not None else []:
        # interleaved one repeat at a time, so drifting machine load hits both alike
        best = side_by_side({"lora": (lora, False), "moce": (moce, True)}, tok, batch,
                            args.new_tokens, args.repeats)
        lora_tps, moce_tps = best["lora"], best["moce"]
        print(f"{batch:>5} {lora_tps:>11.1f} {moce_tps:>11.1f} {moce_tps / lora_tps:>10.2f}",
              flush=True)
    if not args.exported:
        return
    loaded, auto = exported_models(moce, args.artifact)
    print(f"{'batch':>5} {'load_moce_model':>15} {'AutoModel':>10} {'ratio':>6} "
          f"{'AutoModel, auto clusters':>24}")
    for batch in args.batch_sizes:
        # one repeat of each in turn, best of the repeats: drifting load hits all alike
        runs = {"ref": (loaded, True), "hf": (auto, True)}
        if args.artifact:  # cluster ids from the prompts: encoder cost included
            runs["auto"] = (auto, False)
        best = side_by_side(runs, tok, batch, args.new_tokens, args.repeats)
        ref, hf = best["ref"], best["hf"]
        auto_col = f"{best['auto']:>24.1f}" if args.artifact else ""
        print(f"{batch:>5} {ref:>15.1f} {hf:>10.1f} {hf / ref:>6.2f} {auto_col}", flush=True)


if __name__ == "__main__":
    main()
