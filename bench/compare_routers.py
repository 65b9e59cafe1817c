"""Linear vs ACMoE router on the CPU SmolLM2 example: training loss and expert-load balance
over steps, from two `axolotl train` runs with identical data, seed and steps.

    python -m bench.compare_routers [--steps 20] [--out docs/img/acmoe_vs_linear.png]

Needs the converted model (examples/prepare_smollm2.py) and the example's clusters
(python preprocess/cluster.py examples/cpu-smollm2-moce.yml).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cpu-smollm2-moce.yml"


def run(router: str, steps: int, workdir: Path) -> list[dict]:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["moce"]["router"] = router
    cfg["max_steps"] = steps
    cfg["save_steps"] = steps
    cfg["output_dir"] = str(workdir / router)
    cfg["dataset_prepared_path"] = str(workdir / "prepared")
    for key in ("base_model",):
        cfg[key] = str(ROOT / cfg[key])
    cfg["moce"]["cluster_artifact"] = str(ROOT / cfg["moce"]["cluster_artifact"])
    cfg["datasets"][0]["path"] = str(ROOT / cfg["datasets"][0]["path"])
    path = workdir / f"{router}.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = workdir / f"{router}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(path)], cwd=ROOT,
                              env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{router} run failed, see {log}")
    state = json.loads((workdir / router / f"checkpoint-{steps}" / "trainer_state.json")
                       .read_text())
    return [h for h in state["log_history"] if "loss" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "acmoe_vs_linear.png"))
    parser.add_argument("--json", default=str(ROOT / "docs" / "img" / "acmoe_vs_linear.json"))
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {router: run(router, args.steps, Path(tmp)) for router in ("linear", "acmoe")}
    Path(args.json).write_text(json.dumps(runs, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for router, hist in runs.items():
        steps = [h["step"] for h in hist]
        axes[0].plot(steps, [h["loss"] for h in hist], marker="o", label=router)
        axes[1].plot(steps, [h["moce/load_imbalance"] for h in hist], marker="o", label=router)
        axes[2].plot(steps, [h["moce/router_entropy"] for h in hist], marker="o", label=router)
    for ax, title in zip(axes, ["training loss", "load imbalance (1 = balanced)",
                                "router entropy (nats)"]):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"{'step':>4} {'loss lin':>9} {'loss ac':>9} {'imb lin':>8} {'imb ac':>8}")
    for a, b in zip(runs["linear"], runs["acmoe"]):
        print(f"{a['step']:>4} {a['loss']:>9.4f} {b['loss']:>9.4f} "
              f"{a['moce/load_imbalance']:>8.3f} {b['moce/load_imbalance']:>8.3f}")
    for router, hist in runs.items():
        last = hist[-5:]
        print(f"{router}: mean loss of the last 5 steps "
              f"{sum(h['loss'] for h in last) / len(last):.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
