"""Benchmark of stage 1 (preprocess/cluster.py): embedding throughput, clustering time, memory.

    python -m bench.bench_clustering [--rows N] [--data-dir DIR] [--synthetic-rows 1000000]

Part 1 embeds the real general / code / math sets (alpaca_5000.json, code_alpaca_4535.json,
gsm8k_train.jsonl, ~17k rows) with the default offline MiniLM and clusters them (elbow sweep
k=1..10 and one fixed-k fit). Part 2 clusters synthetic N x 1024 embeddings, stored in a
memmap on disk, with the streaming MiniBatchKMeans path, in a fresh child process so that its
peak RSS is its own. Prints the machine beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.machine_info import cpu_model
from moce_plugin.clustering import (  # noqa: E402
    ClusteringOptions,
    SentenceTransformerEncoder,
    elbow_sweep,
    embed_texts,
    fit_kmeans,
    l2_normalize,
    purity,
    rows_from_examples,
)

DATA_FILES = {
    "alpaca": "alpaca_5000.json",
    "code_alpaca": "code_alpaca_4535.json",
    "gsm8k": "gsm8k_train.jsonl",
}


def machine() -> str:
    cpu = cpu_model()
    import torch

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM, resettable; ru_maxrss as fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_anon_mib() -> float:
    """Anonymous (heap) resident memory now: RSS minus mapped file pages such as a memmap."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Start a new VmHWM window (Linux >= 4.0), so the peak is that of what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def load_examples(path: Path, limit: int | None) -> list[dict]:
    text = path.read_text()
    rows = (
        json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines()]
    )
    return rows[:limit] if limit else rows


def bench_real(data_dir: Path, rows_per_set: int | None, batch_size: int) -> dict:
    rows = []
    for source, name in DATA_FILES.items():
        examples = [{**ex, "source": source} for ex in load_examples(data_dir / name, rows_per_set)]
        rows.extend(rows_from_examples(name, examples, "auto"))
    texts = [r.text for r in rows]
    opts = ClusteringOptions()
    encoder = SentenceTransformerEncoder(opts.embedding_model, batch_size=batch_size)
    t0 = time.perf_counter()
    _ = encoder.model  # load outside the timed encode
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = embed_texts(texts, encoder, cache=None, batch_size=batch_size, progress=True)
    embed_s = time.perf_counter() - t0
    x = l2_normalize(x)
    t0 = time.perf_counter()
    elbow = elbow_sweep(x, k_max=10, algorithm="kmeans", seed=0, n_init=opts.n_init)
    sweep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit = fit_kmeans(x, elbow.k, algorithm="kmeans", seed=0, n_init=opts.n_init)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mb = fit_kmeans(x, elbow.k, algorithm="minibatch", seed=0, n_init=opts.n_init)
    mb_s = time.perf_counter() - t0
    sources = [r.source for r in rows]
    return {
        "rows": len(rows),
        "encoder_load_s": load_s,
        "embed_s": embed_s,
        "rows_per_s": len(rows) / embed_s,
        "elbow_sweep_s": sweep_s,
        "elbow_k": elbow.k,
        "elbow_method": elbow.method,
        "sse": [round(s, 1) for s in elbow.sse],
        "kmeans_fit_s": fit_s,
        "kmeans_purity": purity(fit.labels, sources),
        "minibatch_fit_s": mb_s,
        "minibatch_purity": purity(mb.labels, sources),
        "peak_rss_mib": peak_rss_mib(),
    }


def bench_synthetic(n: int, dim: int, k: int, workdir: Path) -> dict:
    """Streaming MiniBatchKMeans on an N x dim float32 memmap of k Gaussian blobs."""
    path = workdir / "synthetic.f32"
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    x = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, dim))
    t0 = time.perf_counter()
    chunk = 65536
    truth = np.empty(n, np.int64)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        truth[start : start + m] = rng.integers(0, k, m)
        x[start : start + m] = centres[truth[start : start + m]] + 0.3 * rng.standard_normal(
            (m, dim), dtype=np.float32
        )
    x.flush()
    gen_s = time.perf_counter() - t0
    del x
    x = np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim))
    reset_peak_rss()
    rss_before = peak_rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    fit = fit_kmeans(x, k, algorithm="minibatch", seed=0, n_init=3)
    fit_s = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "rows": n,
        "dim": dim,
        "k": k,
        "data_gib": n * dim * 4 / 2**30,
        "generate_s": gen_s,
        "minibatch_fit_s": fit_s,
        "purity_vs_truth": purity(fit.labels, truth.tolist()),
        "tracemalloc_peak_mib": traced_peak / 2**20,
        "rss_mib_before_fit": rss_before,
        "peak_rss_mib_during_fit": peak_rss_mib(),  # includes the memmap's file pages
        "rss_anon_mib_after_fit": rss_anon_mib(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--rows", type=int, default=None, help="cap rows per data set (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--synthetic-rows", type=int, default=1_000_000)
    p.add_argument("--synthetic-dim", type=int, default=1024)
    p.add_argument("--synthetic-k", type=int, default=8)
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--synthetic-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.synthetic_only:  # child process: print one JSON line
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
            res = bench_synthetic(
                args.synthetic_rows, args.synthetic_dim, args.synthetic_k, Path(tmp)
            )
        print(json.dumps(res))
        return

    print(f"machine: {machine()}")
    print(f"command: python {' '.join(sys.argv)}")
    if not args.skip_real:
        res = bench_real(args.data_dir, args.rows, args.batch_size)
        print("real data (all-MiniLM-L6-v2, 384-d):", json.dumps(res, indent=1))
    if not args.skip_synthetic:
        cmd = [
            sys.executable,
            "-m",
            __spec__.name,
            "--synthetic-only",
            f"--synthetic-rows={args.synthetic_rows}",
            f"--synthetic-dim={args.synthetic_dim}",
            f"--synthetic-k={args.synthetic_k}",
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        print("synthetic (streaming MiniBatchKMeans on a memmap):", json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
