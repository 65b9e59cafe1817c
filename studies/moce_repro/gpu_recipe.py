"""The paper-scale study for 8 GPUs: axolotl configs and one script that trains and scores
every run on the paper's Table 1 benchmarks with lm-eval. Not run on this project's CPU.

    python preprocess/cluster.py examples/llama2-moce.yml   # stage 1 once (the paper: k=7)
    python -m studies.moce_repro.gpu_recipe                    # -> outputs/paper/
    bash outputs/paper/run_all.sh                           # train + lm-eval, every run

Runs (paper: Llama-2-7B, SlimOrca + Magicoder + MetaMathQA, adapter dim 64, top-2, seq 512,
lr 2e-4, global batch 32, 1 epoch; all from examples/llama2-moce.yml): moce (C x 4 experts),
moce_v (+4 general experts), pesc (one group of C x 4 experts: equal parameters), pesc8 /
pesc4 (Camelidae-style PESC: 8 / 4 experts, top-2, the paper's kind of baseline), each with
--seeds (initialisation and data order).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "examples" / "llama2-moce.yml"
# Table 1 of the paper: maths, code, knowledge, reasoning (pass@10 via humaneval_64).
TASKS = ["gsm8k", "mathqa", "humaneval", "humaneval_64", "mbpp", "bbh", "mmlu_pro",
         "winogrande", "arc_easy", "arc_challenge"]
VARIANTS: dict[str, dict[str, Any]] = {
    "moce": {},
    "moce_v": {"num_general_experts": 4, "general_top_k": 2},
    "pesc": {"pesc_experts": "CxE"},
    "pesc8": {"pesc_experts": 8},
    "pesc4": {"pesc_experts": 4},
}


def num_clusters(base: dict[str, Any]) -> int:
    meta = Path(base["moce"]["cluster_artifact"]) / "metadata.json"
    if not (ROOT / meta).is_file() and not meta.is_file():
        raise SystemExit(f"{meta} not found: run `python preprocess/cluster.py {BASE_CONFIG}` "
                         "first (stage 1 decides C), or pass --num-clusters.")
    return int(json.loads((meta if meta.is_file() else ROOT / meta).read_text())["num_clusters"])


def variant_config(base: dict[str, Any], name: str, seed: int, k: int, out: Path) -> dict:
    cfg = copy.deepcopy(base)
    moce = cfg["moce"]
    change = dict(VARIANTS[name])
    pesc = change.pop("pesc_experts", None)
    moce.update(change, init_seed=seed)
    if pesc is not None:  # one group, no clustering
        moce.update(num_clusters=1,
                    experts_per_group=k * moce["experts_per_group"] if pesc == "CxE" else pesc)
        moce.pop("cluster_artifact", None)
        moce.pop("clustering", None)
    run = out / f"{name}@s{seed}"
    cfg.update(seed=seed, output_dir=str(run / "model"),
               dataset_prepared_path=str(run / "prepared"))
    return cfg


def script(names: list[str], out: Path, gpus: int) -> str:
    lines = ["#!/usr/bin/env bash", "# Written by studies/moce_repro/gpu_recipe.py.",
             "set -euo pipefail", f"cd {ROOT}",
             "export AXOLOTL_DO_NOT_TRACK=1 HF_ALLOW_CODE_EVAL=1", ""]
    for name in names:
        lines.append(f"[ -f {out / name}/model/moce_config.json ] || accelerate launch "
                     f"--num_processes {gpus} -m axolotl.cli.train {out / 'configs' / name}.yml")
    lines += ["", "# lm-eval: one run per GPU at a time (the base model too, for reference)",
              f"tasks={','.join(TASKS)}", "i=0"]
    evals = [f"lm_eval --model hf --model_args pretrained=$(python -c \"import yaml; print("
             f"yaml.safe_load(open('{BASE_CONFIG}'))['base_model'])\"),dtype=bfloat16 "
             f"--tasks $tasks --batch_size 8 --confirm_run_unsafe_code "
             f"--output_path {out}/base/lm_eval"]
    evals += [f"python -m moce_plugin.lm_eval_model --model moce --model_args "
              f"path={out / n}/model,device=cuda --tasks $tasks --batch_size 8 "
              f"--confirm_run_unsafe_code --output_path {out / n}/lm_eval" for n in names]
    for cmd in evals:
        lines += [f"CUDA_VISIBLE_DEVICES=$((i % {gpus})) {cmd} &", "i=$((i + 1))",
                  f"if (( i % {gpus} == 0 )); then wait; fi"]
    lines += ["wait", f"echo 'lm-eval results: {out}/*/lm_eval'"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "paper")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--num-clusters", type=int,
                        help="C for the equal-parameter pesc; default: from the cluster artifact")
    args = parser.parse_args(argv)
    base = yaml.safe_load(BASE_CONFIG.read_text())
    k = args.num_clusters or num_clusters(base)
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    names = []
    for seed in args.seeds:
        for name in args.runs:
            cfg = variant_config(base, name, seed, k, args.out)
            names.append(f"{name}@s{seed}")
            (args.out / "configs" / f"{names[-1]}.yml").write_text(
                yaml.safe_dump(cfg, sort_keys=False))
    (args.out / "run_all.sh").write_text(script(names, args.out, args.gpus))
    print(f"wrote {len(names)} configs and {args.out / 'run_all.sh'} (C = {k})")


if __name__ == "__main__":
    main()
