"""Train-step time of an upcycled model, eager vs ``torch.compile`` (the whole model, as
axolotl's ``torch_compile: true`` compiles it), with Dynamo's graph and graph-break counts.

    python -m bench.bench_compile                         # SmolLM2-135M-like sizes, CPU fp32
    python -m bench.bench_compile --tiny --backend aot_eager --steps 2 --warmup 1   # smoke
    python -m bench.bench_compile --device cuda --dtype bfloat16 --batch 8 --seq 1024

The model is a randomly initialised Llama of the given sizes (nothing is downloaded), upcycled
with MoCE (3 clusters x 4 experts, top-2, adapter_dim 64 by default). A step is forward +
backward (LM loss + balancing loss) + AdamW over the trainable parameters; every step draws
a new cluster mix, and the sequence length changes between steps (``--seq`` and
``--seq - 32`` alternately) so the compiled model runs with dynamic shapes. Warm-up steps
(compilation included) are dropped; the median of the rest is reported, and the
compiled/eager ratio. No timing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForCausalLM

from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.upcycle import aux_loss_of, pop_last_routing, upcycle_model


def build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq))
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).to(args.device, getattr(torch, args.dtype))
    moce = MoCEConfig(num_clusters=3, experts_per_group=4, top_k=args.top_k,
                      adapter_dim=args.adapter_dim)
    return upcycle_model(model, moce).train()


def run(model: torch.nn.Module, fn, args: argparse.Namespace) -> list[float]:
    """Seconds per step of ``fn`` (the model or its compiled wrapper), warm-up included."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(args.warmup + args.steps):
        seq = args.seq if step % 2 == 0 else max(8, args.seq - 32)
        ids = torch.randint(0, args.vocab, (args.batch, seq), generator=gen)
        clusters = torch.randint(0, 3, (args.batch, 1), generator=gen).expand(-1, seq)
        ids, clusters = ids.to(args.device), clusters.to(args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(input_ids=ids, labels=ids, moce_cluster_ids=clusters)
        (out.loss + 0.01 * aux_loss_of(pop_last_routing(model))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--adapter-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3,
                   help="steps dropped (compilation: static shapes, then dynamic ones)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="d=32, 2 layers, seq 48: a smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.intermediate, args.layers, args.heads = 32, 64, 2, 4
        args.vocab, args.seq, args.adapter_dim = 128, 48, 8
    if args.threads:
        torch.set_num_threads(args.threads)

    eager_times = run(model := build(args), model, args)
    torch._dynamo.reset()
    counters.clear()
    model = build(args)
    compiled_times = run(model, torch.compile(model, backend=args.backend), args)

    eager = statistics.median(eager_times[args.warmup:])
    compiled = statistics.median(compiled_times[args.warmup:])
    result = {
        "eager_s": eager, "compiled_s": compiled, "ratio": compiled / eager,
        "warmup_s": sum(compiled_times[:args.warmup]),
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }
    print(f"{args.device} {args.dtype} d={args.hidden} layers={args.layers} "
          f"batch={args.batch} seq={args.seq}/{args.seq - 32} backend={args.backend}")
    print(f"eager {eager * 1e3:.1f} ms/step | compiled {compiled * 1e3:.1f} ms/step | "
          f"compiled/eager {result['ratio']:.2f} | warm-up (compiling) "
          f"{result['warmup_s']:.1f} s | graphs {result['graphs']} | "
          f"graph breaks {result['graph_breaks']}")
    for reason, count in counters["graph_break"].items():
        print(f"  break x{count}: {reason.splitlines()[0]}")
    return result


if __name__ == "__main__":
    main()
