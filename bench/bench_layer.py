"""Layer-level forward+backward time and peak memory of the MoCE MLP vs baselines.

    python -m bench.bench_layer --quick                 # ~2 min on 2 CPU cores
    python -m bench.bench_layer                         # default sweep (see below)
    python -m bench.bench_layer --grid                  # full cartesian grid (long)
    python -m bench.bench_layer --csv out.csv --plot docs/img/layer_time_vs_tokens.png
    python -m bench.bench_layer --device cuda           # bf16 on a GPU, CUDA peak memory
    python -m bench.bench_layer --quick --compile       # also torch.compile(MoCEMLP)
    python -m bench.bench_layer --part routing --count-ops --reps 1 --no-memory  # + op counts

Implementations, all with the same frozen LlamaMLP-like FFN (gate/up/down, SiLU) in front,
so every number is the full MLP cost of one decoder layer:

- ``moce``:     ``moce_plugin.model.layer.MoCEMLP`` (routers, top-k/soft, grouped GEMM experts),
                loss = sum(out * g) + 0.01 * aux_loss (the load-balancing loss is part of the cost).
- ``loop``:     ``bench/reference.py`` (the reference the unit tests compare with):
                reference-style Python loop over groups x experts with boolean masks, every
                expert of a group run on all its tokens (``loop_dense``: on every token).
- ``adapter``:  the FFN with one PESC adapter of the same rank: h + up(sigmoid(down(h))).
- ``lora``:     the FFN with LoRA of the same rank on gate/up/down (frozen base weights).
- ``ffn``:      the frozen FFN alone (x still requires grad), to split off the experts' cost:
                the "experts-only" ratio is (loop - ffn) / (moce - ffn).
- ``moce_compiled`` (``--compile``): ``torch.compile(MoCEMLP)``.
- ``moce_routed``: MoCEMLP with every expert slot through the routed (token, expert) path,
                as before the dense block path (soft / (V) before/after in one run).
- ``moce_base`` (``--baseline-src DIR``): the MoCEMLP of another checkout (the code before a
                change), same weights, timed interleaved with the others.
- ``moce@G+V``: MoCEMLP forced to one execution plan (``MoCEExperts.plan``), G in
                slots/blocks/sets, V in slots/blocks/fold, e.g. ``moce@sets+blocks``.

Time: wall clock (or process CPU time with ``--cpu-time``, for a shared CPU with
``--threads 1``), median over ``--reps`` fwd+bwd iterations after ``--warmup``, the implementations
interleaved inside each repetition (side by side, same machine state; the order rotates
from one repetition to the next, see time_config). Ratios are the median
of the per-repetition ratios (paired, so slow phases of a shared machine cancel).
``--isolate ROUNDS`` (CPU) times each implementation in its own fresh process instead
(``--reps`` per process, its median per round), the rounds interleaved in rotating order,
so that no implementation's time depends on the allocator state another one left. The input x
requires grad, so backward goes through the frozen FFN too, as inside a network.

Peak memory: CPU: each (config, implementation) runs once in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_=65536`` (large tensors are mmap'd and returned to the OS when
freed, so RSS follows the live tensors); after one warm-up fwd+bwd the RSS high-water
mark is reset (``/proc/self/clear_refs`` = 5) and the peak is ``VmHWM`` after one more
fwd+bwd minus the RSS just before it (inputs, weights, parameter grads of the warm-up are
freed; the framework and lazy library state are excluded).
CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes before the step.

Default sweep (hidden 576, intermediate 1536 = SmolLM2-135M, adapter rank 64, float32 on CPU):
  tokens in 512..16384 at C=7, E=4, top-2   (scaling in tokens; the target point is 8192)
  C in {1, 4, 7} x E in {4, 8} at 8192 tokens, top-2            (scaling in C and E)
  top-1 / top-2 / soft x (V) general experts {0, 2} at 8192 tokens, C=7, E=4
``--big`` adds hidden 4096 / intermediate 11008 (Llama-2-7B) at 512 and 1024 tokens.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench.machine_info import cpu_model
from bench.reference import MaskedLoopMLP
from moce_plugin.model import routing as moce_routing
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.layer import MoCEMLP

RANK = 64
AUX_COEF = 0.01


# --------------------------------------------------------------------------- modules
class LlamaLikeMLP(nn.Module):
    def __init__(self, d: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class AdapterMLP(nn.Module):
    """Frozen FFN + one PESC adapter of rank r."""

    def __init__(self, ffn: nn.Module, d: int, r: int) -> None:
        super().__init__()
        self.ffn = ffn
        self.down = nn.Linear(d, r, bias=False)
        self.up = nn.Linear(r, d, bias=False)
        nn.init.normal_(self.up.weight, std=0.02)

    def forward(self, x):
        h = self.ffn(x)
        return h + self.up(torch.sigmoid(self.down(h)))


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Linear(base.in_features, r, bias=False)
        self.B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.B.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


class LoRAMLP(nn.Module):
    """Frozen FFN with LoRA (rank r, no dropout, scale 1) on gate/up/down."""

    def __init__(self, ffn: LlamaLikeMLP, r: int) -> None:
        super().__init__()
        self.gate_proj = LoRALinear(ffn.gate_proj, r)
        self.up_proj = LoRALinear(ffn.up_proj, r)
        self.down_proj = LoRALinear(ffn.down_proj, r)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------- configs

def _ratio(reps: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repetitions of a/b within one repetition (the two ran back to back):
    robust to the machine's drift, which moves both sides of a pair together."""
    if a not in reps or b not in reps:
        return float("nan")
    return statistics.median(x / y for x, y in zip(reps[a], reps[b], strict=True))

def default_configs(args) -> list[dict]:
    d, inter = args.hidden, args.intermediate
    base = dict(d=d, inter=inter, C=7, E=4, top_k=2, V=0, tokens=8192)
    cfgs = []
    if args.quick:
        for t in (512, 2048, 8192):
            cfgs.append({**base, "tokens": t})
        cfgs.append({**base, "C": 1})
        cfgs.append({**base, "top_k": "soft"})
        cfgs.append({**base, "V": 2})
    elif args.grid:
        for t in (512, 1024, 2048, 4096, 8192, 16384):
            for C in (1, 4, 7):
                for E in (4, 8):
                    for k in (1, 2, "soft"):
                        for V in (0, 2):
                            cfgs.append(dict(d=d, inter=inter, C=C, E=E, top_k=k, V=V, tokens=t))
    else:
        parts = (args.part or "tokens,groups,routing").split(",")
        if "tokens" in parts:
            for t in (512, 1024, 2048, 4096, 8192, 16384):
                cfgs.append({**base, "tokens": t})
        if "groups" in parts:
            for E in (4, 8):
                for C in (1, 4, 7):
                    cfgs.append({**base, "C": C, "E": E})
        if "routing" in parts:
            for k in (1, 2, "soft"):
                for V in (0, 2):
                    cfgs.append({**base, "top_k": k, "V": V})
    if args.big:
        for t in (512, 1024):
            cfgs.append({**base, "d": 4096, "inter": 11008, "tokens": t})
    if args.tokens:
        keep = {int(t) for t in args.tokens.split(",")}
        cfgs = [c for c in cfgs if c["tokens"] in keep]
    if args.only:
        wanted = args.only.split(",")
        cfgs = [c for c in cfgs if any(w in cfg_name(c) for w in wanted)]
    seen, out = set(), []
    for c in cfgs:  # de-duplicate, keep order
        key = json.dumps(c, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def cfg_name(c: dict) -> str:
    k = c["top_k"] if c["top_k"] == "soft" else f"top{c['top_k']}"
    return f"d{c['d']} T{c['tokens']} C{c['C']} E{c['E']} {k} V{c['V']}"


# --------------------------------------------------------------------------- build / run
def _forced_plan(impl: str, c: dict) -> tuple[str, str | None]:
    """``moce_routed``: every expert slot through routed_adapter_sum (the layer before the
    dense block path); ``moce@<group>+<general>``: that execution plan of MoCEExperts."""
    if impl == "moce_routed":
        return ("slots", "slots" if c["V"] else None)
    group, _, general = impl[len("moce@"):].partition("+")
    return (group, (general or "slots") if c["V"] else None)


_BASELINE: dict = {}


def load_baseline(src: str) -> None:
    """Import ``moce_plugin`` of another checkout (e.g. a worktree of the previous commit)
    beside this one, for the ``moce_base`` implementation (before/after in one run)."""
    import importlib
    import importlib.util

    def ours() -> dict:
        return {k: sys.modules.pop(k) for k in list(sys.modules)
                if k == "moce_plugin" or k.startswith("moce_plugin.")}

    current = ours()
    package = Path(src).resolve() / "moce_plugin"
    # The other checkout's package is loaded from its folder by name, so its submodules
    # resolve through its own __path__ (the import path stays as it is).
    spec = importlib.util.spec_from_file_location(
        "moce_plugin", package / "__init__.py", submodule_search_locations=[str(package)])
    try:
        if spec is None or spec.loader is None:
            raise SystemExit(f"--baseline {src}: no moce_plugin package there")
        sys.modules["moce_plugin"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["moce_plugin"])
        # Checkouts before the package restructure have flat modules.
        flat = (package / "layer.py").is_file()
        prefix = "moce_plugin." if flat else "moce_plugin.model."
        for name in ("layer", "config", "routing"):
            _BASELINE[name] = importlib.import_module(prefix + name)
    finally:
        ours()  # drop the baseline's modules from sys.modules (still referenced above)
        sys.modules.update(current)


def _baseline_mlp(ffn: nn.Module, d: int, cfg: MoCEConfig, moce: MoCEMLP) -> nn.Module:
    """The baseline checkout's MoCEMLP with the same weights as ``moce`` (old key names)."""
    old_cfg = _BASELINE["config"].MoCEConfig(**cfg.model_dump())
    old = _BASELINE["layer"].MoCEMLP(ffn, d, old_cfg, layer_index=0)
    state = moce.moce_experts.state_dict()
    if "router" in old.moce_experts.state_dict():  # checkouts before the router module
        state = {k.replace("router.weight", "router"): v for k, v in state.items()}
    old.moce_experts.load_state_dict(state)
    return old


def build(c: dict, impl: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(module, run_fn, x, g): run_fn() does one fwd+bwd and returns nothing."""
    torch.manual_seed(seed)
    d, T, C = c["d"], c["tokens"], c["C"]
    ffn = LlamaLikeMLP(d, c["inter"]).requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, T, d, generator=gen)
    g = torch.randn(1, T, d, generator=gen)
    groups = torch.randint(0, C, (1, T), generator=gen)
    valid = torch.ones(1, T, dtype=torch.bool)
    cfg = MoCEConfig(num_clusters=C, experts_per_group=c["E"], top_k=c["top_k"],
                     num_general_experts=c["V"], adapter_dim=RANK, adapter_scaling=1.0,
                     adapter_activation="sigmoid")
    moce = MoCEMLP(ffn, d, cfg, layer_index=0)
    with torch.no_grad():
        moce.moce_experts.up.normal_(0, 0.02, generator=gen)
    if impl in ("moce", "moce_compiled"):
        mod = moce
    elif impl == "moce_base":
        mod = _baseline_mlp(ffn, d, cfg, moce)
    elif impl == "moce_routed" or impl.startswith("moce@"):
        mod = moce
        mod.moce_experts.plan = _forced_plan(impl, c)
    elif impl in ("loop", "loop_dense"):
        # The reference loop on the fast layer's own weights (same maths, same parameters).
        mod = MaskedLoopMLP(ffn, cfg, moce.moce_experts, gather=impl == "loop")
    elif impl == "adapter":
        mod = AdapterMLP(ffn, d, RANK)
    elif impl == "lora":
        mod = LoRAMLP(ffn, RANK)
    elif impl == "ffn":
        mod = ffn
    else:
        raise ValueError(impl)
    mod = mod.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    g = g.to(device=device, dtype=dtype)
    groups, valid = groups.to(device), valid.to(device)
    fwd = torch.compile(mod) if impl == "moce_compiled" else mod

    if impl.startswith("moce"):
        # The baseline checkout has its own thread-local routing state.
        routing = _BASELINE["routing"] if impl == "moce_base" else moce_routing

        def run():
            stack = routing.collector_stack()
            stack.append([])
            try:
                with routing.cluster_ids_context(groups):
                    out = fwd(x)
            finally:
                recs = stack.pop()
            loss = (out.float() * g.float()).sum() + AUX_COEF * recs[0].aux_loss
            loss.backward()
    elif impl.startswith("loop"):
        def run():
            out = fwd(x, groups, valid)
            (out.float() * g.float()).sum().backward()
    else:
        def run():
            out = fwd(x)
            (out.float() * g.float()).sum().backward()

    def step():
        x.grad = None
        for p in mod.parameters():
            p.grad = None
        run()

    return mod, step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_child(spec: dict) -> None:
    """Fresh process: build, one warm-up fwd+bwd (lazy library init), reset the RSS
    high-water mark, then the peak RSS of one fwd+bwd above the RSS just before it."""
    torch.set_num_threads(spec["threads"])
    if spec.get("baseline_src"):
        load_baseline(spec["baseline_src"])
    _, step = build(spec["cfg"], spec["impl"], "cpu", getattr(torch, spec["dtype"]))
    step()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (Linux >= 4.0)
    except OSError:
        pass  # falls back to the whole-process peak (includes the warm-up)
    before = rss_bytes()
    step()
    peak = vm_hwm_bytes()
    print(json.dumps({"peak_mb": max(peak - before, 0) / 2**20}))


def measure_memory(c: dict, impl: str, dtype: str, device: str) -> float:
    if device.startswith("cuda"):
        _, step = build(c, impl, device, getattr(torch, dtype))
        step()  # warm-up (allocator caches, cuBLAS workspaces)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    spec = json.dumps({"cfg": c, "impl": impl, "dtype": dtype,
                       "baseline_src": _BASELINE.get("src"),
                       "threads": torch.get_num_threads()})
    out = subprocess.run([sys.executable, "-m", __spec__.name, "--_mem-child", spec], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def time_config(c: dict, impls: list[str], device: str, dtype: torch.dtype, reps: int,
                warmup: int, cpu_time: bool = False) -> dict[str, list[float]]:
    """ms of every repetition per implementation (implementations interleaved)."""
    clock = time.process_time if cpu_time else time.perf_counter
    steps = {i: build(c, i, device, dtype)[1] for i in impls}
    for _ in range(warmup):
        for i in impls:
            steps[i]()
    times: dict[str, list[float]] = {i: [] for i in impls}
    for rep in range(reps):
        # Interleaved (side by side under the same machine state), in an order rotated every
        # repetition: on the CPU a step's page faults depend on what the step before it left
        # in the allocator, so a fixed order gave one implementation a systematic edge.
        for i in impls[rep % len(impls):] + impls[:rep % len(impls)]:
            sync(device)
            t0 = clock()
            steps[i]()
            sync(device)
            times[i].append((clock() - t0) * 1e3)
    return times


def time_child(spec: dict) -> None:
    """Fresh process: one implementation alone (its own allocator and page-fault state),
    ``warmup`` then ``reps`` fwd+bwd; prints the ms of each repetition."""
    torch.set_num_threads(spec["threads"])
    if spec.get("baseline_src"):
        load_baseline(spec["baseline_src"])
    times = time_config(spec["cfg"], [spec["impl"]], "cpu", getattr(torch, spec["dtype"]),
                        spec["reps"], spec["warmup"], spec["cpu_time"])
    print(json.dumps({"ms": times[spec["impl"]]}))


def time_config_isolated(c: dict, impls: list[str], dtype: str, reps: int, warmup: int,
                         cpu_time: bool, rounds: int) -> dict[str, list[float]]:
    """ms per round per implementation, each implementation timed in a fresh process.

    In one process the implementations share the allocator: a step's page faults depend on
    what the steps before it left behind, which moved the FFN + adapter reference by ~10%
    from run to run. Here every (round, implementation) is its own process (median of its
    ``reps``), and the rounds interleave the implementations in a rotating order, so ratios
    are still paired in time (see _ratio)."""
    times: dict[str, list[float]] = {i: [] for i in impls}
    for r in range(rounds):
        for i in impls[r % len(impls):] + impls[:r % len(impls)]:
            spec = json.dumps({"cfg": c, "impl": i, "dtype": dtype, "reps": reps,
                               "warmup": warmup, "cpu_time": cpu_time,
                               "baseline_src": _BASELINE.get("src"),
                               "threads": torch.get_num_threads()})
            out = subprocess.run([sys.executable, "-m", __spec__.name, "--_time-child", spec],
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"timing {i} on {cfg_name(c)} failed:\n{out.stderr[-3000:]}")
            times[i].append(statistics.median(
                json.loads(out.stdout.strip().splitlines()[-1])["ms"]))
    return times


# Ops that only make a view (no kernel on a GPU): left out of the second count.
VIEW_OPS = {"aten::" + n for n in (
    "view", "reshape", "_reshape_alias", "transpose", "t", "permute", "unsqueeze", "squeeze",
    "expand", "select", "slice", "as_strided", "_unsafe_view", "alias", "detach", "unflatten",
    "flatten", "split", "chunk", "narrow", "unbind", "view_as", "expand_as", "numpy_T")}


def count_ops(c: dict, impl: str, device: str, dtype: torch.dtype) -> tuple[int, int]:
    """(top-level aten ops, of which not views) of one fwd+bwd after a warm-up: the second is
    a proxy for GPU kernel launches."""
    _, step = build(c, impl, device, dtype)
    step()
    with torch.profiler.profile() as prof:
        step()
    names = [e.name for e in prof.events() if e.name.startswith("aten::")
             and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(names), sum(n not in VIEW_OPS for n in names)


def machine(device: str) -> str:
    s = (f"CPU {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
         f"torch {torch.__version__}")
    if device.startswith("cuda"):
        s += f", GPU {torch.cuda.get_device_name()}"
    return s


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = [r for r in rows if (r["C"], r["E"], r["top_k"], r["V"], r["d"]) == (7, 4, "2", 0, 576)]
    base.sort(key=lambda r: r["tokens"])
    if len(base) < 2:
        return
    impls = [k[:-3] for k in base[0] if k.endswith("_ms")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i in impls:
        ax.plot([r["tokens"] for r in base], [r[f"{i}_ms"] for r in base], marker="o", label=i)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per layer call")
    ax.set_ylabel("fwd+bwd time (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset")
    p.add_argument("--grid", action="store_true", help="full cartesian grid")
    p.add_argument("--big", action="store_true", help="add hidden 4096 at 512/1024 tokens")
    p.add_argument("--part", default=None,
                   help="parts of the default sweep: tokens,groups,routing (default all)")
    p.add_argument("--tokens", default=None, help="only these token counts, e.g. 512,8192")
    p.add_argument("--only", default=None,
                   help="only configs whose name contains one of these, e.g. 'soft V0,top2 V2'")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) / bfloat16 (CUDA)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impls", default="moce,loop,loop_dense,adapter,lora,ffn")
    p.add_argument("--baseline-src", default=None,
                   help="another checkout (e.g. `git worktree add /tmp/base HEAD~1`): adds "
                   "`moce_base`, its MoCEMLP with the same weights (before/after in one run)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with process CPU time (use with --threads 1 on a shared CPU)")
    p.add_argument("--compile", action="store_true", help="add torch.compile(MoCEMLP)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--count-ops", action="store_true",
                   help="also print the top-level aten ops of one fwd+bwd per implementation")
    p.add_argument("--csv", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--isolate", type=int, default=0, metavar="ROUNDS",
                   help="CPU: time every implementation in its own fresh process, ROUNDS "
                   "rounds of --reps each (ratios independent of the other implementations)")
    p.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_time-child", dest="time_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mem_child:
        mem_child(json.loads(args.mem_child))
        return
    if args.time_child:
        time_child(json.loads(args.time_child))
        return
    if args.isolate and args.device.startswith("cuda"):
        p.error("--isolate is for the CPU (a GPU's allocator is not shared this way)")

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    impls = args.impls.split(",")
    if args.baseline_src:
        load_baseline(args.baseline_src)
        _BASELINE["src"] = args.baseline_src
        if "moce_base" not in impls:
            impls.append("moce_base")
    if args.compile:
        impls.append("moce_compiled")
    configs = default_configs(args)
    print(f"machine: {machine(args.device)}, load avg {os.getloadavg()[0]:.1f}")
    print(f"device {args.device}, dtype {dtype_name}, adapter rank {RANK}, "
          f"clock {'process CPU time' if args.cpu_time else 'wall'}, reps {args.reps} "
          f"(median), warmup {args.warmup}; {len(configs)} configs"
          + (f"; every implementation in its own process, {args.isolate} rounds (median)"
             if args.isolate else ""))
    hdr = (f"{'config':34s} " + " ".join(f"{i + ' ms':>12s}" for i in impls)
           + f" {'loop/moce':>9s} {'dense/moce':>10s} {'moce/adptr':>10s} {'moce/lora':>9s}"
           + f" {'us/token':>8s} {'xp loop/moce':>12s}")
    # Every other MoCE variant (moce_routed, moce@...) against the FFN + one adapter layer.
    variants = [i for i in impls if i.startswith("moce") and i != "moce"]
    hdr += "".join(f" {i[:12] + '/a':>14s}" for i in variants)
    if not args.no_memory:
        hdr += " " + " ".join(f"{i + ' MB':>11s}" for i in impls) + f" {'mem m/a':>7s}"
        hdr += "".join(f" {'mem ' + i[:12] + '/a':>18s}" for i in variants)
    print(hdr, flush=True)
    rows = []
    for c in configs:
        if args.isolate:
            per_rep = time_config_isolated(c, impls, dtype_name, args.reps, args.warmup,
                                           args.cpu_time, args.isolate)
        else:
            per_rep = time_config(c, impls, args.device, dtype, args.reps, args.warmup,
                                  args.cpu_time)
        t = {i: statistics.median(v) for i, v in per_rep.items()}
        row = {**c, "top_k": str(c["top_k"]), **{f"{i}_ms": round(v, 3) for i, v in t.items()}}
        line = f"{cfg_name(c):34s} " + " ".join(f"{t[i]:12.1f}" for i in impls)
        ratio = functools.partial(_ratio, per_rep)
        row["loop_over_moce"] = round(ratio("loop", "moce"), 3)
        row["loop_dense_over_moce"] = round(ratio("loop_dense", "moce"), 3)
        row["moce_over_adapter"] = round(ratio("moce", "adapter"), 3)
        row["moce_over_lora"] = round(ratio("moce", "lora"), 3)
        line += (f" {row['loop_over_moce']:9.2f} {row['loop_dense_over_moce']:10.2f}"
                 f" {row['moce_over_adapter']:10.2f}"
                 f" {row['moce_over_lora']:9.2f}"
                 f" {t.get('moce', math.nan) / c['tokens'] * 1e3:8.2f}")
        xp = ((t["loop"] - t["ffn"]) / (t["moce"] - t["ffn"])
              if {"loop", "ffn", "moce"} <= t.keys() else float("nan"))
        row["experts_only_loop_over_moce"] = round(xp, 3)
        line += f" {xp:12.2f}"
        for i in variants:
            row[f"{i}_over_adapter"] = round(ratio(i, "adapter"), 3)
            line += f" {row[f'{i}_over_adapter']:14.2f}"
        if not args.no_memory:
            mem = {}
            for i in impls:
                try:
                    mem[i] = measure_memory(c, i, dtype_name, args.device)
                except Exception as e:  # report, keep going
                    print(f"  memory of {i} failed: {str(e)[-300:]}", flush=True)
                    mem[i] = float("nan")
                row[f"{i}_peak_mb"] = round(mem[i], 1)
            ma = (mem["moce"] / mem["adapter"] if {"moce", "adapter"} <= mem.keys()
                  else float("nan"))
            row["mem_moce_over_adapter"] = round(ma, 3)
            line += " " + " ".join(f"{mem[i]:11.1f}" for i in impls) + f" {ma:7.2f}"
            for i in variants:
                mv = mem[i] / mem["adapter"] if "adapter" in mem else float("nan")
                row[f"mem_{i}_over_adapter"] = round(mv, 3)
                line += f" {mv:18.2f}"
        print(line, flush=True)
        if args.count_ops:
            ops = {i: count_ops(c, i, args.device, dtype) for i in impls}
            row.update({f"{i}_aten_ops": n for i, (n, _) in ops.items()})
            row.update({f"{i}_kernel_ops": k for i, (_, k) in ops.items()})
            print("  aten ops per fwd+bwd (all / not views): " + ", ".join(
                f"{i} {n} / {k}" for i, (n, k) in ops.items()), flush=True)
        rows.append(row)
        if args.csv:  # rewritten after every config, so a cut-off run keeps its rows
            keys = list(dict.fromkeys(k for r in rows for k in r))
            with open(args.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.plot:
        plot(rows, args.plot, f"MoCE MLP fwd+bwd, d=576/1536, C=7 E=4 top-2, r=64\n"
             f"{machine(args.device)[:90]}")


if __name__ == "__main__":
    main()
