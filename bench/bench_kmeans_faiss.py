"""faiss k-means against stage 1's streaming MiniBatchKMeans: time, peak RSS, inertia.

    python -m bench.bench_kmeans_faiss [--rows 1000000] [--dim 384] [--k 8]

Needs ``faiss-cpu`` (not a dependency of moce-plugin: install it in a scratch environment).
The data are SYNTHETIC: ``--rows`` points around ``--k`` Gaussian centres, written once to a
memory-mapped .npy (as stage 1's embedding matrix is above ``memmap_rows``). Each method runs
in a fresh child process and reports its wall time (fit + labelling every row), its peak RSS
(``ru_maxrss``, which counts the memmap's pages it touched) and the inertia (SSE) of its
centroids over every row, computed the same way for both (:func:`nearest_centroid`).

* ``minibatch``: :func:`moce_plugin.clustering.kmeans.fit_kmeans` with ``algorithm:
  minibatch``, what ``algorithm: auto`` runs above 100k rows (chunks read from the memmap);
* ``faiss``: ``faiss.Kmeans`` with its defaults (20 iterations, a training sample of 256
  points per centroid), ``nredo`` = n_init, then labels by its flat index, in chunks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_INIT = 4
SEED = 0


def make_data(path: Path, rows: int, dim: int, k: int, chunk: int = 100_000) -> None:
    rng = np.random.default_rng(SEED)
    centres = rng.normal(size=(k, dim)).astype(np.float32) * 4
    x = np.lib.format.open_memmap(path, "w+", np.float32, (rows, dim))
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        x[start : start + n] = centres[rng.integers(0, k, n)] + rng.standard_normal(
            (n, dim), dtype=np.float32)
    x.flush()


def _child(method: str, path: Path, k: int) -> None:
    from moce_plugin.clustering.kmeans import fit_kmeans, nearest_centroid

    x = np.load(path, mmap_mode="r")
    t0 = time.perf_counter()
    if method == "minibatch":
        centroids = fit_kmeans(x, k, "minibatch", SEED, N_INIT).centroids
    else:
        import faiss

        km = faiss.Kmeans(x.shape[1], k, niter=20, nredo=N_INIT, seed=SEED)
        # faiss trains on 256 points per centroid at most (it would subsample a full array):
        # hand it such a sample, so the whole matrix is never copied into memory.
        pick = np.sort(np.random.default_rng(SEED).choice(len(x), min(len(x), 256 * k),
                                                          replace=False))
        km.train(np.ascontiguousarray(x[pick]))
        centroids = km.centroids
        for start in range(0, len(x), 65536):  # labels, as stage 1 needs them
            km.index.search(np.ascontiguousarray(x[start : start + 65536]), 1)
    wall = time.perf_counter() - t0
    _, sse = nearest_centroid(x, centroids)
    print(json.dumps({"method": method, "wall_s": wall, "inertia": sse,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "_child":
        _child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        make_data(path, args.rows, args.dim, args.k)
        print(f"\nk-means on {args.rows:,} x {args.dim} SYNTHETIC points, k={args.k}, "
              f"n_init={N_INIT}")
        print("| method | wall s (fit + labels) | peak RSS MiB | inertia (SSE, all rows) |")
        print("| --- | --- | --- | --- |")
        for method in ("minibatch", "faiss"):
            proc = subprocess.run([sys.executable, "-m", "bench.bench_kmeans_faiss", "_child",
                                   method, str(path), str(args.k)], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                print(f"| {method} | failed: {proc.stderr.strip().splitlines()[-1]} | | |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {method} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                  f"{r['inertia']:.6g} |", flush=True)


if __name__ == "__main__":
    main()
