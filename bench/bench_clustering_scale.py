"""Stage 1 at scale: rows/s on 1 and 2 processes, and peak RSS against the row count.

    python -m bench.bench_clustering_scale speed  [--nproc 1 2] [--data FILE.jsonl]
    python -m bench.bench_clustering_scale memory [--rows 10000 100000 1000000]
    python -m bench.bench_clustering_scale all

``speed`` runs the real stage-1 command (``moce_plugin.clustering.cli``, the offline MiniLM) on
the bundled sample (default) with a fresh cache, one plain process and then ``accelerate launch``
with N processes (gloo on CPU, NCCL on GPUs), and prints the wall time, rows/s and whether each
artifact equals the one-process artifact (assignments identical, centroids to 1e-5).

``memory`` runs stage 1 on a SYNTHETIC data set (N generated rows in 8 topics) with a CHEAP
DETERMINISTIC ENCODER (a seeded 384-d vector per text, no model), each N in a fresh child
process, and prints its peak RSS (``ru_maxrss``), wall time and cache size: the memory curve
of everything but the encoder. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.launch import module_command

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "data" / "moce_sample.jsonl"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TOPICS = ("math", "code", "chat", "poem", "law", "bio", "chem", "news")


# ---- speed: the real command, 1 process vs accelerate launch ----------------------------------
def run_cli(work: Path, data: Path, nproc: int) -> tuple[float, float]:
    """(wall s of the whole command, embedding s of its slowest rank, from its log)."""
    cfg = work / "moce.yml"
    cfg.write_text(
        f"datasets:\n  - path: {data}\n    type: alpaca\n    ds_type: json\n"
        "moce:\n  num_clusters: auto\n  cluster_artifact: clusters\n"
        "  clustering:\n    report: false\n    cache_dir: cache\n"
    )
    cmd = module_command("moce_plugin.clustering.cli", [str(cfg)], nproc)
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{nproc} process(es) failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    embed = [float(m) for m in re.findall(r"embedded \d+ .*? in ([\d.]+)s", proc.stdout)]
    return wall, max(embed, default=float("nan"))


def same_artifact(a: Path, b: Path) -> bool:
    return (a / "assignments.jsonl").read_text() == (b / "assignments.jsonl").read_text() and \
        np.allclose(np.load(a / "centroids.npy"), np.load(b / "centroids.npy"), atol=1e-5)


def speed(nprocs: list[int], data: Path) -> None:
    rows = sum(1 for line in data.read_text().splitlines() if line.strip())
    print(f"\nstage 1 (embed + elbow k=1..10 + artifact), {rows} rows of {data.name}, "
          "offline MiniLM, fresh cache per run")
    print("| processes | wall s (whole command) | rows/s (whole) | embedding s (slowest rank) "
          "| embedding rows/s | same artifact as 1 process |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        for n in nprocs:
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            wall, embed = run_cli(work, data, n)
            art = work / "clusters"
            ref = ref or art
            same = "yes" if same_artifact(art, ref) else "NO"
            print(f"| {n} | {wall:.1f} | {rows / wall:.1f} | {embed:.1f} | {rows / embed:.1f} "
                  f"| {same} |", flush=True)


# ---- memory: synthetic rows, cheap encoder, one child per row count ---------------------------
class HashEncoder:
    """CHEAP DETERMINISTIC ENCODER for the memory curve: topic centre + text-seeded noise."""

    signature = "bench-hash-encoder-v1"

    def __init__(self, dim: int = 384) -> None:
        rng = np.random.default_rng(0)
        self.centres = {t: rng.normal(size=dim).astype(np.float32) * 4 for t in TOPICS}
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            out[i] = self.centres[t.split()[0]] + np.random.default_rng(seed).standard_normal(
                self.dim, dtype=np.float32)
        return out


def synthetic_examples(n: int):
    for i in range(n):
        yield {"instruction": f"{TOPICS[i % len(TOPICS)]} synthetic request number {i}",
               "input": "", "output": "x"}


def _rss_anon_kib() -> int:
    """Anonymous resident memory (heap), without the file pages a memmap maps in."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def _memory_child(n: int, work: Path) -> None:
    import threading

    from moce_plugin.clustering import (
        ClusteringOptions,
        RowStream,
        iter_rows_from_examples,
        run_clustering,
    )

    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:  # ru_maxrss also counts memmapped file pages (page cache)
        while not done.wait(0.1):
            peak_anon[0] = max(peak_anon[0], _rss_anon_kib())

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    # Streamed as stage 1 streams a YAML's data sets: regenerated on each pass, never a list.
    rows = RowStream(lambda: iter_rows_from_examples("synthetic", synthetic_examples(n), "auto"))
    opts = ClusteringOptions(cache_dir=str(work / "cache"), report=False,
                             cache_shard_rows=16384, batch_size=4096)
    run_clustering(rows, work / "clusters", "auto", opts, HashEncoder(), progress=False,
                   log=lambda _m: None)
    wall = time.perf_counter() - t0
    done.set()
    peak_anon[0] = max(peak_anon[0], _rss_anon_kib())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cache = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
    print(json.dumps({"rows": n, "wall_s": wall, "peak_rss_mib": peak_kib / 1024,
                      "peak_anon_mib": peak_anon[0] / 1024,
                      "cache_mib": cache / 2**20}))


def memory(sizes: list[int]) -> None:
    print("\npeak RSS of stage 1 (one process) on SYNTHETIC rows with a CHEAP DETERMINISTIC "
          "ENCODER (384-d), num_clusters auto (elbow on a 100k-row sample above 100k rows)")
    print("| rows | peak RSS MiB (incl. memmap pages) | peak anonymous RSS MiB (sampled "
          "every 0.1 s) | wall s | cache on disk MiB |")
    print("| --- | --- | --- | --- | --- |")
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"moce_mem_{n}_"))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.bench_clustering_scale", "_memory_child", str(n),
                 str(work)], cwd=REPO, env={**os.environ, **ENV}, capture_output=True,
                text=True)
            if proc.returncode != 0:
                sys.exit(f"{n} rows failed:\n{proc.stderr[-4000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {n:,} | {r['peak_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} | "
                  f"{r['wall_s']:.0f} | "
                  f"{r['cache_mib']:.0f} |", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_memory_child":
        _memory_child(int(sys.argv[2]), Path(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("speed", "memory", "all"))
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data", type=Path, default=SAMPLE, help="alpaca-style .jsonl (speed)")
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    if args.what in ("speed", "all"):
        speed(args.nproc, args.data.resolve())
    if args.what in ("memory", "all"):
        memory(args.rows)


if __name__ == "__main__":
    main()
