"""The human side of an artifact: keywords, representatives, purity, plots, report.md."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..utils import pyplot
from .artifact import BY_SOURCE_PLOT, CLUSTER_MAP_PLOT, REPORT_FILE
from .kmeans import ElbowResult, KMeansFit

if TYPE_CHECKING:
    from .options import ClusteringOptions
    from .rows import Row

#: Above this many rows the TF-IDF keywords of report.md come from a seeded sample of the
#: texts (TF-IDF holds its whole input in memory).
KEYWORD_SAMPLE = 50_000


def top_keywords(texts: Sequence[str], labels: np.ndarray, k: int, n_terms: int = 8):
    """Per cluster, the terms with the highest mean TF-IDF: a quick "what is this cluster"."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        vec = TfidfVectorizer(stop_words="english", max_features=20000, sublinear_tf=True)
        tfidf = vec.fit_transform(texts)
    except ValueError:  # only stop words / empty vocabulary
        return [[] for _ in range(k)]
    terms = np.asarray(vec.get_feature_names_out())
    out = []
    for c in range(k):
        mask = labels == c
        if not mask.any():
            out.append([])
            continue
        mean = np.asarray(tfidf[mask].mean(axis=0)).ravel()
        out.append(terms[np.argsort(-mean)[:n_terms]].tolist())
    return out


def representatives(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, n: int = 3):
    """Indices of the ``n`` rows closest to each centroid."""
    out = []
    for c, centre in enumerate(centroids):
        idx = np.flatnonzero(labels == c)
        d = ((x[idx] - centre) ** 2).sum(1)
        out.append(idx[np.argsort(d)[:n]].tolist())
    return out


def representatives_chunked(
    x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, n: int = 3,
    chunk_rows: int = 16384,
) -> list[list[int]]:
    """:func:`representatives` read in chunks (``x`` may be a memmap): per cluster the ``n``
    rows closest to its centroid, ties by row index."""
    c = np.asarray(centroids, np.float32)
    best_d = np.zeros(0, np.float64)
    best_i = np.zeros(0, np.int64)
    for start in range(0, len(x), chunk_rows):
        xb = np.asarray(x[start : start + chunk_rows], np.float32)
        lb = labels[start : start + len(xb)]
        d = ((xb - c[lb]) ** 2).sum(1).astype(np.float64)
        best_d = np.concatenate([best_d, d])
        best_i = np.concatenate([best_i, np.arange(start, start + len(xb))])
        order = np.lexsort((best_i, best_d, labels[best_i]))
        best_d, best_i = best_d[order], best_i[order]
        cl = labels[best_i]
        rank = np.arange(len(cl)) - np.searchsorted(cl, cl, "left")
        keep = rank < n
        best_d, best_i = best_d[keep], best_i[keep]
    cl = labels[best_i]
    return [best_i[cl == k].tolist() for k in range(len(c))]


def purity_of_pairs(pairs: Mapping[tuple[int, str], int], num_rows: int) -> float:
    """:func:`purity` from (cluster, source) -> row counts."""
    if not num_rows:
        return 0.0
    best: dict[int, int] = {}
    for (label, _src), count in pairs.items():
        best[label] = max(best.get(label, 0), count)
    return sum(best.values()) / num_rows


def purity(labels: Sequence[int], sources: Sequence[str]) -> float:
    """Share of rows whose cluster's majority source is their own source."""
    if not len(labels):
        return 0.0
    by_cluster: dict[int, Counter] = {}
    for label, src in zip(labels, sources):
        by_cluster.setdefault(int(label), Counter())[src] += 1
    return sum(c.most_common(1)[0][1] for c in by_cluster.values()) / len(labels)


def plot_elbow(elbow: ElbowResult, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(elbow.ks, elbow.sse, "o-", label="SSE")
    ax.axvline(elbow.k, color="red", ls="--", label=f"chosen k={elbow.k}")
    ax.set_xlabel("k")
    ax.set_ylabel("within-cluster SSE")
    ax2 = ax.twinx()
    sil = [np.nan if s is None else s for s in elbow.silhouette]
    ax2.plot(elbow.ks, sil, "s:", color="gray", label="silhouette")
    ax2.set_ylabel("silhouette")
    fig.legend(loc="upper right")
    ax.set_title(f"Elbow method: k={elbow.k} ({elbow.method})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cluster_map(x: np.ndarray, labels: np.ndarray, path: Path, sample: int, seed: int):
    """t-SNE of a sample (PCA to 50 dims first, as usual for speed), coloured by cluster."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plt = pyplot()
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
    xs = np.asarray(x[idx], np.float32)
    if len(idx) < 5:
        return
    if xs.shape[1] > 50 and len(xs) > 50:
        xs = PCA(n_components=50, random_state=seed).fit_transform(xs)
    perplexity = float(min(30, max(2, (len(xs) - 1) // 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(
        xs
    )
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels[idx], cmap="tab10", s=6)
    ax.legend(*sc.legend_elements(), title="cluster", fontsize=7, loc="best")
    ax.set_title(f"t-SNE of {len(idx)} rows, coloured by cluster")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def source_table(labels: np.ndarray, sources: Sequence[str], k: int) -> tuple[list[str], Any]:
    return table_of_pairs(Counter(zip(np.asarray(labels).tolist(), sources)), k)


def table_of_pairs(pairs: Mapping[tuple[int, str], int], k: int) -> tuple[list[str], Any]:
    """(source names, k x sources counts) from (cluster, source) -> row counts."""
    names = sorted({src for _, src in pairs})
    table = np.zeros((k, len(names)), np.int64)
    col = {s: j for j, s in enumerate(names)}
    for (label, src), count in pairs.items():
        table[label, col[src]] += count
    return names, table


def plot_cluster_by_source(labels: np.ndarray, sources: Sequence[str], k: int, path: Path):
    plot_source_table(*source_table(labels, sources, k), k, path)


def plot_source_table(names: list[str], table: Any, k: int, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = np.zeros(k)
    for j, name in enumerate(names):
        ax.bar(range(k), table[:, j], bottom=bottom, label=name)
        bottom += table[:, j]
    ax.set_xticks(range(k))
    ax.set_xlabel("cluster")
    ax.set_ylabel("rows")
    ax.legend(title="source", fontsize=7)
    ax.set_title("Cluster x source")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _md_escape(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    text = text[:limit] + ("..." if len(text) > limit else "")
    return text.replace("|", "\\|")


def report_markdown(
    metadata: dict,
    rows: Sequence[Row] | Mapping[int, Row],
    labels: np.ndarray | None,
    keywords: list[list[str]],
    reps: list[list[int]],
    table: tuple[list[str], Any] | None = None,
) -> str:
    """report.md; ``rows`` needs only the quoted rows (``reps``) when ``table`` (the cluster
    x source counts, :func:`table_of_pairs`) is given, else every row and ``labels``."""
    k = metadata["num_clusters"]
    if table is None:
        assert labels is not None and isinstance(rows, Sequence)
        table = source_table(labels, [r.source for r in rows], k)
    names, table = table
    lines = [
        "# MoCE cluster report",
        "",
        f"- rows: {metadata['num_rows']}, k = {k} ({metadata['k_selection']['method']})",
        f"- encoder: `{metadata['embedding']['model']}` (dim {metadata['embedding']['dim']}, "
        f"prefix {metadata['embedding']['prefix']!r}, normalize "
        f"{metadata['embedding']['normalize']})",
        f"- text template: `{metadata['text']['template']}`",
        f"- purity vs source: {metadata['purity_vs_source']:.3f}",
    ]
    sel = metadata["k_selection"]
    if sel["sse"]:
        lines += ["", "| k | SSE | silhouette |", "| --- | --- | --- |"]
        for kk, s, sil in zip(sel["ks"], sel["sse"], sel["silhouette"]):
            lines.append(f"| {kk} | {s:.2f} | {'-' if sil is None else f'{sil:.3f}'} |")
    lines += ["", "| cluster | size | " + " | ".join(names) + " |"]
    lines.append("| --- " * (len(names) + 2) + "|")
    for c in range(k):
        lines.append(f"| {c} | {int(table[c].sum())} | " + " | ".join(map(str, table[c])) + " |")
    for c in range(k):
        lines += ["", f"## Cluster {c} ({metadata['cluster_sizes'][c]} rows)", ""]
        lines.append("Top keywords: " + (", ".join(keywords[c]) or "-"))
        lines.append("")
        lines.append("Closest to the centroid:")
        for i in reps[c]:
            lines.append(f"- [{rows[i].source}] {_md_escape(rows[i].text)}")
    return "\n".join(lines) + "\n"


def write_report(
    out: Path,
    metadata: dict,
    rows: Sequence[Row],
    x: np.ndarray,
    fit: KMeansFit,
    options: ClusteringOptions,
) -> None:
    texts = [r.text for r in rows]
    keywords = top_keywords(texts, fit.labels, fit.k)
    reps = representatives(x, fit.labels, fit.centroids)
    pairs = Counter(zip(fit.labels.tolist(), (r.source for r in rows)))
    write_report_parts(out, metadata, rows, reps, keywords, pairs, x, fit, options)


def write_report_parts(
    out: Path,
    metadata: dict,
    rows: Sequence[Row] | Mapping[int, Row],
    reps: list[list[int]],
    keywords: list[list[str]],
    pairs: Mapping[tuple[int, str], int],
    x: np.ndarray,
    fit: KMeansFit,
    options: ClusteringOptions,
) -> None:
    """report.md and the plots from counts and the quoted rows only (what the streamed
    pipeline has); the t-SNE map is drawn from a sample of ``x``."""
    table = table_of_pairs(pairs, fit.k)
    (out / REPORT_FILE).write_text(
        report_markdown(metadata, rows, None, keywords, reps, table=table))
    plot_cluster_map(x, fit.labels, out / CLUSTER_MAP_PLOT, options.tsne_sample, options.seed)
    plot_source_table(*table, fit.k, out / BY_SOURCE_PLOT)
