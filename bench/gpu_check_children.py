"""The steps of bench/gpu_check.py that are Python code rather than another script's command.

``python -m bench.gpu_check _compile --out DIR`` and ``python -m bench.gpu_check _axolotl
{flash_pack,qlora} --out DIR``: each prints one ``GPU_CHECK_FIGURE: {json}`` line (the
figure, and a problem when a check failed). Run with the environment gpu_check.py sets
(repo root, tests/ and bench/ on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu_check import FIGURE_TAG


def emit(figure: str, problem: str | None = None) -> None:
    print(FIGURE_TAG + " " + json.dumps({"figure": figure, "problem": problem}), flush=True)


# --------------------------------------------------------------------------- compile
def compile_step(out: Path, steps: int = 8, warmup: int = 3, device: str = "cuda",
                 backend: str = "inductor", hidden: int = 576, tokens: int = 1024) -> int:
    """fwd + bwd + AdamW of a 4-layer d=576 llama upcycled with MoCE (C3 E4 top-2, r 64),
    bf16, batch 4 x 1024 tokens, cluster ids drawn afresh every step (the mix changes, the
    shapes do not): eager, then ``torch.compile`` of the same weights."""
    import torch
    import torch._dynamo
    from transformers import LlamaConfig, LlamaForCausalLM

    from moce_plugin.model.config import MoCEConfig
    from moce_plugin.model.upcycle import aux_loss_of, pop_last_routing, upcycle_model

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048)
    moce = MoCEConfig(num_clusters=3, experts_per_group=4, top_k=2, adapter_dim=64)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16)
        upcycle_model(model, moce, dtype=torch.bfloat16)
        return model.train()

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, cfg.vocab_size, (4, tokens), generator=gen).to(dev),
                torch.randint(0, 3, (4, 1), generator=gen).expand(4, tokens).contiguous().to(dev))
               for _ in range(steps)]

    def run(compiled: bool) -> tuple[list[float], list[float]]:
        model = build()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        fwd = torch.compile(model, backend=backend) if compiled else model
        times, losses = [], []
        for ids, clusters in batches:
            sync()
            t0 = time.perf_counter()
            out = fwd(input_ids=ids, labels=ids, moce_cluster_ids=clusters)
            aux = aux_loss_of(pop_last_routing(model))
            loss = out.loss + (aux if aux is not None else 0.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss))
        return times, losses

    eager_t, eager_l = run(False)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    comp_t, comp_l = run(True)
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"].get("unique_graphs", 0)
    e_ms = statistics.median(eager_t[warmup:]) * 1e3
    c_ms = statistics.median(comp_t[warmup:]) * 1e3
    dl = abs(eager_l[0] - comp_l[0]) / max(abs(eager_l[0]), 1e-6)
    (out / "compile.json").write_text(json.dumps({
        "eager_s": eager_t, "compiled_s": comp_t, "eager_loss": eager_l,
        "compiled_loss": comp_l, "graph_breaks": dict(counters["graph_break"]),
        "unique_graphs": graphs}, indent=1))
    figure = (f"eager {e_ms:.1f} ms, compiled {c_ms:.1f} ms, compiled/eager {c_ms / e_ms:.2f}; "
              f"{graphs} graphs, {breaks} graph breaks; step-0 loss rel diff {dl:.1e}")
    problem = None
    if not all(map(_finite, comp_l)):
        problem = "compiled loss not finite"
    elif dl > 3e-2:  # bf16: eager and compiled kernels round differently, not this much
        problem = f"compiled step-0 loss {comp_l[0]:.4f} != eager {eager_l[0]:.4f}"
    emit(figure, problem)
    return 0


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# --------------------------------------------------------------------------- axolotl
def tiny_model(path: Path) -> Path:
    """A tokenizer + tiny llama with head_dim 64 (flash-attention's kernels want >= 32)."""
    from axolotl_helpers import sample_rows
    from tiny_models import tiny_causal_lm, train_tiny_tokenizer

    texts = [t for r in sample_rows() for t in (r["instruction"], r["input"], r["output"])]
    tok = train_tiny_tokenizer(texts)
    tok.save_pretrained(path)
    model = tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=256,
                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, pad_token_id=3, bos_token_id=1,
                           eos_token_id=2, tie_word_embeddings=False, initializer_range=0.2)
    model.save_pretrained(path)
    return path


def axolotl_config(kind: str, model_dir: Path, data: Path, out: Path) -> dict:
    from axolotl_helpers import base_config

    gpu = dict(bf16=True, tf32=True, max_steps=10, save_steps=10, learning_rate=0.05,
               sequence_len=512, val_set_size=0.0)
    if kind == "flash_pack":
        extra = dict(attn_implementation="flash_attention_2", sample_packing=True)
    elif kind == "qlora":
        extra = dict(attn_implementation="sdpa", adapter="qlora", load_in_4bit=True,
                     lora_target_linear=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    else:
        raise ValueError(kind)
    return base_config(model_dir, data, out, **gpu, **extra)


def axolotl_step(kind: str, out: Path) -> int:
    import yaml
    from axolotl_helpers import train_losses, write_cluster_jsonl

    work = out / kind
    work.mkdir(parents=True, exist_ok=True)
    model_dir = tiny_model(work / "tiny")
    data = write_cluster_jsonl(work / "train.jsonl", limit=240)
    cfg = axolotl_config(kind, model_dir, data, work)
    (work / "config.yml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(work / "config.yml")],
                          cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        emit(f"axolotl train exit {proc.returncode}", tail[0][-200:])
        return 1
    model_out = work / "model"
    ckpts = sorted(model_out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    losses = train_losses(ckpts[-1]) if ckpts else {}
    if not losses:
        emit("no losses logged", "trainer_state.json has no loss")
        return 1
    steps = sorted(losses)
    first, last = losses[steps[0]], losses[steps[-1]]
    figure = f"loss {first:.3f} -> {last:.3f} in {len(steps)} steps, {wall:.0f} s wall"
    problem = None
    if not all(_finite(v) for v in losses.values()):
        problem = "loss not finite"
    elif not last < first:
        problem = "the loss did not fall"
    elif not (model_out / "moce_weights.safetensors").is_file():
        problem = "no moce_weights.safetensors in the output"
    emit(figure, problem)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["_compile", "_axolotl"])
    p.add_argument("kind", nargs="?", choices=["flash_pack", "qlora"])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "_compile":
        return compile_step(out)
    if args.kind is None:
        p.error("_axolotl needs the kind: flash_pack or qlora")
    return axolotl_step(args.kind, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
