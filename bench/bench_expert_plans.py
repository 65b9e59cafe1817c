"""Expert part alone (MoCEExperts, no FFN) under every execution plan, per routing mode.

    python -m bench.bench_expert_plans          # fwd+bwd, 8k tokens, d=576, C=7, E=4, r=64
    python -m bench.bench_expert_plans --modes "soft:0,2:2" --reps 9
    python -m bench.bench_expert_plans --inference --device cuda --dtype bfloat16 \\
        --tokens 32,128,512,2048 --groups 3 --modes 2:0     # no-grad calls (decode, prefill)

The numbers behind ``moce_plugin.model.plans.choose_plan`` and ``inference_plan``
(docs/performance.md): the FFN, which is shared by every plan and dominates bench_layer.py's
times, is left out, so the plans' differences are not lost in its noise. Plans interleaved in
each repetition; ``adapter`` = one PESC adapter of rank r on the same h, for scale. On the CPU
one thread and process CPU time; on CUDA wall time between synchronizations. ``--inference``
times forwards without autograd and adds ``auto``: the plan the layer takes by itself there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.layer import MoCEExperts
from moce_plugin.model.plans import Plan, all_plans, choose_plan, inference_plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default="8192", help="tokens of a call; a comma list sweeps")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--groups", type=int, default=7)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--modes", default="2:0,soft:0,2:2,soft:2,1:2",
                   help="top_k:general pairs (general experts use general_top_k = top_k)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inference", action="store_true",
                   help="forwards without autograd (adds the few-token plans and 'auto')")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens {args.tokens!r}: give whole numbers, e.g. 32,512,8192")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device; leave --device out")
    return args


def plan_name(plan: Plan | None) -> str:
    """A plan as printed: ``"auto"`` (the layer's own choice), a name, or ``group+general``."""
    if plan is None:
        return "auto"
    return plan if isinstance(plan, str) else "+".join(s for s in plan if s)


def timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.process_time


def step(m: nn.Module, inputs: tuple[torch.Tensor, ...], inference: bool) -> None:
    """One call of the expert part ``m`` (or the adapter), backward too unless inference."""
    x, h0, groups, valid, grad = inputs
    if inference:
        with torch.no_grad():
            m(x, h0, groups, valid) if isinstance(m, MoCEExperts) else h0 + m(h0)
        return
    h = h0.clone().requires_grad_(True)
    for q in m.parameters():
        q.grad = None
    if isinstance(m, MoCEExperts):
        out, _ = m(x.clone().requires_grad_(True), h, groups, valid)
    else:
        out = h + m(h)
    (out * grad).sum().backward()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    d, C = args.hidden, args.groups
    clock = timer(device)
    what = "fwd without autograd" if args.inference else "fwd+bwd"
    unit = "wall time" if device.type == "cuda" else "CPU time (1 thread)"
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"expert part {what}, ms of {unit}, median of {args.reps}; d={d} C={C} "
          f"E={args.experts} r={args.rank}; {machine}, {args.dtype}, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    for T in args.tokens:
        x, h0, grad = (torch.randn(T, d, generator=gen).to(device, dtype) for _ in range(3))
        groups = torch.randint(0, C, (T,), generator=gen).to(device)
        valid = torch.ones(T, dtype=torch.bool, device=device)
        adapter = nn.Sequential(nn.Linear(d, args.rank, bias=False), nn.Sigmoid(),
                                nn.Linear(args.rank, d, bias=False)).to(device, dtype)
        for mode in args.modes.split(","):
            k, general = mode.split(":")
            top_k = k if k == "soft" else int(k)
            cfg = MoCEConfig(num_clusters=C, experts_per_group=args.experts, top_k=top_k,
                             num_general_experts=int(general), adapter_dim=args.rank)
            plans: list = [*all_plans(bool(int(general))), "dense"]
            if args.inference:
                # Gathering copies each slot's weights: hopeless beyond a few hundred slots.
                plans = [None, *(["gather"] if T <= 64 else []), *plans]
            mods: dict[str, nn.Module] = {}
            for plan in plans:
                m = MoCEExperts(d, cfg).to(device, dtype)
                m.train(not args.inference)
                m.plan = plan
                with torch.no_grad():
                    m.up.normal_(0, 0.02)
                mods[plan_name(plan)] = m
            mods["adapter"] = adapter

            inputs = (x, h0, groups, valid, grad)
            times: dict[str, list[float]] = {n: [] for n in mods}
            for m in mods.values():
                step(m, inputs, args.inference)  # warm-up
            names = list(mods)
            for rep in range(args.reps):
                # Rotated each repetition: the first call after another plan's ran slower.
                for n in names[rep % len(names):] + names[:rep % len(names)]:
                    m = mods[n]
                    t0 = clock()
                    step(m, inputs, args.inference)
                    times[n].append(clock() - t0)
            chosen = choose_plan(top_k, args.experts, cfg.resolved_general_top_k,
                                 int(general), C, T, args.rank)
            if args.inference:
                chosen = inference_plan(T, mods["auto"].slots_per_token,
                                        C * args.experts + int(general), args.rank, d,
                                        device.type, general=bool(int(general))) or chosen
            print(f"T={T} top_k={k} general={general} (chosen: {plan_name(chosen)}): " + ", ".join(
                f"{n} {statistics.median(v) * 1e3:.3f}" for n, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
