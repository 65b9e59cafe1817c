"""Serving throughput: output tokens/s at 1 and 8 concurrent requests for (a) a MoCE export in
vLLM, (b) its base model without MoCE in vLLM, (c) the MoCE export in `transformers serve`.

    python -m bench.bench_vllm --export EXPORT              # the figures (idle machine)
    python -m bench.bench_vllm --export EXPORT --quick      # smoke run: 2 requests, 8 tokens

Each server is started, warmed with one request, then each concurrency level sends
``concurrency x --requests`` chat requests (greedy, ``--new-tokens`` each, ``ignore_eos``-like
``min_tokens`` where the server has it) from ``concurrency`` client threads; tokens/s is the
sum of completion tokens over the wall time. The base folder of (b) is written from the export
(its frozen FFN weights under the base family's names, no MoCE). vLLM runs from ``.venv-vllm``
(``bash scripts/install.sh``), `transformers serve` from the current environment. Targets at 8
concurrent requests: (a) >= 0.85 x (b) and (a) >= 5 x (c). No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.launch import free_port
from bench.machine_info import ROOT, cpu_model

PROMPTS = [
    "Write a python function that returns the largest element of a list.",
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "Give three tips for staying healthy.",
    "Explain what a hash map is in two sentences.",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def write_base_folder(export: Path, dest: Path) -> Path:
    """The export's base model without MoCE: plain base config, the frozen FFN under its
    base names (``mlp.base_mlp.x`` -> ``mlp.x``), no expert or router weights."""
    from safetensors.torch import load_file, save_file

    config = json.loads((export / "config.json").read_text())
    base_type = config["moce_base_model_type"]
    for key in ("auto_map", "moce", "moce_base_model_type", "moce_cluster_artifact"):
        config.pop(key, None)
    config["model_type"] = base_type
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base_type]]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {}
    for path in sorted(export.glob("model*.safetensors")):
        for name, tensor in load_file(path).items():
            if ".moce_experts." in name:
                continue
            tensors[name.replace(".mlp.base_mlp.", ".mlp.")] = tensor
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (export / name).is_file():
            shutil.copy2(export / name, dest / name)
    return dest


def run_load(send: Callable[[str], int], concurrency: int, requests_each: int
             ) -> tuple[int, float]:
    """(completion tokens, seconds) of ``concurrency`` threads each sending ``requests_each``
    prompts in turn through ``send(prompt) -> completion tokens``."""
    def client(worker: int) -> int:
        return sum(send(PROMPTS[(worker + i) % len(PROMPTS)]) for i in range(requests_each))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(client, range(concurrency)))
    return tokens, time.perf_counter() - start


def summarize(rates: dict[str, dict[int, float]]) -> list[str]:
    """The table: tokens/s per server and concurrency, ratios a/b and a/c."""
    levels = sorted({c for r in rates.values() for c in r})
    lines = ["| server | " + " | ".join(f"{c} concurrent (tok/s)" for c in levels) + " |",
             "| --- |" + " --- |" * len(levels)]
    for name, by_level in rates.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{by_level[c]:.1f}" if c in by_level else "-" for c in levels) + " |")
    a, b, c = (rates.get(k, {}) for k in ("a", "b", "c"))
    for label, num, den, target in (("a/b", a, b, 0.85), ("a/c", a, c, 5.0)):
        cells = [f"{num[lvl] / den[lvl]:.2f}" if den.get(lvl) and lvl in num else "-"
                 for lvl in levels]
        lines.append(f"| {label} (target >= {target} at 8) | " + " | ".join(cells) + " |")
    return lines


class Server:
    """A server process started on a free port, ready when /health answers."""

    def __init__(self, argv: list[str], env: dict, log: Path, port: int,
                 ready_s: int = 900) -> None:
        self.port, self.log = port, log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        for _ in range(ready_s):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited: {log.read_text()[-3000:]}") from None
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"{argv[0]} did not start in {ready_s} s: see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(server: Server, model: str, levels: list[int], requests_each: int,
            new_tokens: int) -> dict[int, float]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                    timeout=1800, max_retries=0)

    def send(prompt: str) -> int:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens,
            temperature=0)
        return reply.usage.completion_tokens

    send(PROMPTS[0])  # warm-up
    rates = {}
    for level in levels:
        tokens, seconds = run_load(send, level, requests_each)
        rates[level] = tokens / seconds
        print(f"  {level} concurrent: {tokens} tokens in {seconds:.1f} s", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="a moce-export folder")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client thread")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--servers", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm/bin/python")
    parser.add_argument("--eager", action="store_true",
                        help="run (a) and (b) with --enforce-eager: without vLLM's torch.compile "
                        "(how the plugin runs ACMoE exports and non-CPU devices)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 2 concurrent, "
                        "1 request each, 8 tokens")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.requests, args.new_tokens = [1, 2], 1, 8
    if not args.vllm_python.is_file() and {"a", "b"} & set(args.servers):
        sys.exit(f"no vLLM environment at {args.vllm_python}: run `bash scripts/install.sh`")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; {args.new_tokens} new tokens, "
          f"{args.requests} requests per client", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    base = write_base_folder(args.export, work / "base")
    vllm = [str(args.vllm_python), "-m", "vllm.entrypoints.cli.main", "serve"]
    vllm_flags = ["--dtype", "float32", "--max-model-len", "1024"]
    eager = ["--enforce-eager"] if args.eager else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    plans = {
        "a": (vllm + [str(args.export)] + vllm_flags + eager, str(args.export)),
        "b": (vllm + [str(base)] + vllm_flags + eager, str(base)),
        "c": ([sys.executable, "-m", "transformers.cli.transformers", "serve",
               str(args.export), "--trust-remote-code", "--dtype", "float32"], str(args.export)),
    }
    rates: dict[str, dict[int, float]] = {}
    for name in args.servers:
        argv, model = plans[name]
        port = free_port()
        print(f"{name}: {' '.join(argv[:4])} ...", flush=True)
        server = Server(argv + ["--host", "127.0.0.1", "--port", str(port)], env,
                        work / f"{name}.log", port)
        try:
            rates[name] = measure(server, model, args.concurrency, args.requests,
                                  args.new_tokens)
        finally:
            server.stop()
    print("\n".join(summarize(rates)))


if __name__ == "__main__":
    main()
