"""k-means fits (exact or streaming mini-batch), the elbow sweep and silhouette."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Above this many rows ``algorithm: auto`` switches to streaming MiniBatchKMeans.
MINIBATCH_THRESHOLD = 100_000
ALGORITHMS = ("auto", "kmeans", "minibatch")


@dataclass
class KMeansFit:
    k: int
    centroids: np.ndarray
    labels: np.ndarray
    sse: float


def choose_algorithm(n_rows: int, algorithm: str) -> str:
    if algorithm == "auto":
        return "minibatch" if n_rows > MINIBATCH_THRESHOLD else "kmeans"
    return algorithm


def nearest_centroid(
    x: np.ndarray, centroids: np.ndarray, chunk_rows: int = 16384
) -> tuple[np.ndarray, float]:
    """Labels and SSE of ``x`` against fixed centroids, in chunks (x may be a memmap), with no
    temporary larger than one float32 chunk."""
    c = np.asarray(centroids, np.float32)
    c_sq = (c.astype(np.float64) ** 2).sum(1)
    labels = np.empty(len(x), np.int64)
    sse = 0.0
    for start in range(0, len(x), chunk_rows):
        xb = np.asarray(x[start : start + chunk_rows], np.float32)
        x_sq = np.einsum("ij,ij->i", xb, xb).astype(np.float64)[:, None]
        d = x_sq - 2.0 * (xb @ c.T).astype(np.float64) + c_sq
        best = d.argmin(1)
        labels[start : start + len(xb)] = best
        sse += float(np.maximum(d[np.arange(len(xb)), best], 0.0).sum())
    return labels, sse


def _fit_minibatch(
    x: np.ndarray,
    k: int,
    seed: int,
    n_init: int,
    epochs: int = 3,
    batch_rows: int = 4096,
    min_steps: int = 100,
) -> np.ndarray:
    """Streaming MiniBatchKMeans: partial_fit over row chunks, so only one chunk (plus the
    centroids) is in memory at a time even when ``x`` is a memmap bigger than RAM. Small data
    gets more passes (at least ``min_steps`` updates) so that it still converges."""
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=n_init, batch_size=batch_rows)
    rng = np.random.default_rng(seed)
    starts = np.arange(0, len(x), batch_rows)
    for _ in range(max(epochs, -(-min_steps // len(starts)))):
        for start in rng.permutation(starts):
            batch = np.asarray(x[start : start + batch_rows], np.float32)
            if len(batch) >= k:
                model.partial_fit(batch)
    return model.cluster_centers_.astype(np.float32)


def canonical_order(centroids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters by size (largest = 0), ties by centroid, so ids are reproducible."""
    sizes = np.bincount(labels, minlength=len(centroids))
    order = sorted(range(len(centroids)), key=lambda i: (-sizes[i], centroids[i].tolist()))
    remap = np.empty(len(order), np.int64)
    remap[order] = np.arange(len(order))
    return centroids[order], remap[labels]


def fit_kmeans(
    x: np.ndarray, k: int, algorithm: str = "auto", seed: int = 0, n_init: int = 4
) -> KMeansFit:
    """Seeded k-means with a fixed number of restarts (deterministic for a given input)."""
    algorithm = choose_algorithm(len(x), algorithm)
    if algorithm == "minibatch":
        centroids = _fit_minibatch(x, k, seed, n_init)
    else:
        from sklearn.cluster import KMeans

        centroids = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x).cluster_centers_
    centroids = np.asarray(centroids, np.float32)
    labels, _ = nearest_centroid(x, centroids)
    centroids, labels = canonical_order(centroids, labels)
    _, sse = nearest_centroid(x, centroids)
    return KMeansFit(k=k, centroids=centroids, labels=labels, sse=sse)


def silhouette(x: np.ndarray, labels: np.ndarray, seed: int, sample: int = 5000) -> float | None:
    """Silhouette on a sample (exact is O(n^2)); None where undefined (one cluster)."""
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels >= len(x):
        return None
    size = min(sample, len(x))
    return float(silhouette_score(x, labels, sample_size=size, random_state=seed))


@dataclass
class ElbowResult:
    ks: list[int]
    sse: list[float]
    silhouette: list[float | None]
    k: int
    method: str  # how k was chosen ("kneedle", "silhouette fallback", ...)
    fits: dict[int, KMeansFit] = field(default_factory=dict, repr=False)


def find_elbow(ks: Sequence[int], sse: Sequence[float]) -> int | None:
    """Kneedle on the SSE curve (convex, decreasing), as in the paper's App. B; None if none."""
    if len(ks) < 3:
        return None
    from kneed import KneeLocator

    knee = KneeLocator(list(ks), list(sse), curve="convex", direction="decreasing").knee
    return None if knee is None else int(knee)


def elbow_sweep(
    x: np.ndarray, k_max: int, algorithm: str = "auto", seed: int = 0, n_init: int = 4
) -> ElbowResult:
    """Fit k = 1..k_max, record SSE and silhouette, and pick k at the elbow.

    When the curve has no knee (e.g. no cluster structure), fall back to the best silhouette
    so the run still completes; ``method`` records which rule chose k.
    """
    ks = list(range(1, k_max + 1))
    fits = {k: fit_kmeans(x, k, algorithm, seed, n_init) for k in ks}
    sse = [fits[k].sse for k in ks]
    sil = [silhouette(x, fits[k].labels, seed) for k in ks]
    knee = find_elbow(ks, sse)
    if knee is not None:
        return ElbowResult(ks, sse, sil, knee, "kneedle (convex, decreasing SSE)", fits)
    scored = [(s, k) for k, s in zip(ks, sil) if s is not None]
    k = max(scored)[1] if scored else 1
    return ElbowResult(ks, sse, sil, k, "no SSE knee found; best silhouette", fits)

