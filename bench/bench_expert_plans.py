"""Expert part alone (MoCEExperts fwd+bwd, no FFN) under every execution plan, per routing mode.

    python bench/bench_expert_plans.py                       # 8k tokens, d=576, C=7, E=4, r=64
    python bench/bench_expert_plans.py --modes "soft:0,2:2" --reps 9

The numbers behind ``moce_plugin.model.plans.choose_plan`` (docs/performance.md): the FFN, which
is shared by every plan and dominates bench_layer.py's times, is left out, so the plans'
differences are not lost in its noise. One thread, process CPU time, plans interleaved in
each repetition; ``adapter`` = one PESC adapter of rank r on the same h, for scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moce_plugin.model.config import MoCEConfig  # noqa: E402
from moce_plugin.model.layer import MoCEExperts  # noqa: E402
from moce_plugin.model.plans import all_plans, choose_plan  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--groups", type=int, default=7)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--modes", default="2:0,soft:0,2:2,soft:2,1:2",
                   help="top_k:general pairs (general experts use general_top_k = top_k)")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    T, d, C = args.tokens, args.hidden, args.groups
    gen = torch.Generator().manual_seed(0)
    x, h0, grad = (torch.randn(T, d, generator=gen) for _ in range(3))
    groups = torch.randint(0, C, (T,), generator=gen)
    valid = torch.ones(T, dtype=torch.bool)
    adapter = nn.Sequential(nn.Linear(d, args.rank, bias=False), nn.Sigmoid(),
                            nn.Linear(args.rank, d, bias=False))
    print(f"expert part fwd+bwd, ms of CPU time (1 thread), median of {args.reps}; "
          f"T={T} d={d} C={C} E={args.experts} r={args.rank}; torch {torch.__version__}")
    for mode in args.modes.split(","):
        k, general = mode.split(":")
        top_k = k if k == "soft" else int(k)
        cfg = MoCEConfig(num_clusters=C, experts_per_group=args.experts, top_k=top_k,
                         num_general_experts=int(general), adapter_dim=args.rank)
        mods: dict[str, nn.Module] = {}
        for plan in all_plans(bool(int(general))):
            m = MoCEExperts(d, cfg).train()
            m.plan = plan
            with torch.no_grad():
                m.up.normal_(0, 0.02, generator=gen)
            mods["+".join(str(s) for s in plan if s)] = m
        mods["adapter"] = adapter

        def step(m: nn.Module) -> None:
            h = h0.clone().requires_grad_(True)
            for q in m.parameters():
                q.grad = None
            if isinstance(m, MoCEExperts):
                out, _ = m(x.clone().requires_grad_(True), h, groups, valid)
            else:
                out = h + m(h)
            (out * grad).sum().backward()

        times: dict[str, list[float]] = {n: [] for n in mods}
        for m in mods.values():
            step(m)  # warm-up
        for _ in range(args.reps):
            for n, m in mods.items():
                t0 = time.process_time()
                step(m)
                times[n].append(time.process_time() - t0)
        chosen = "+".join(s for s in choose_plan(top_k, args.experts, cfg.resolved_general_top_k,
                                                 int(general), C, T, args.rank) if s)
        print(f"top_k={k} general={general} (chosen: {chosen}): " + ", ".join(
            f"{n} {statistics.median(v) * 1e3:.0f}" for n, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
