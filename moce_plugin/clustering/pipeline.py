"""What ``preprocess/cluster.py`` runs: rows -> embeddings -> k -> artifact (atomically).

The functions do one job each: embed with a resumable cache (:mod:`.encode`), sweep k and
fit (:mod:`.kmeans`), write the artifact (:mod:`.artifact`) and the report (:mod:`.report`).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..utils import atomic_dir, check_replaceable
from . import encode
from .artifact import (
    ARTIFACT_KIND,
    ASSIGNMENTS_FILE,
    CENTROIDS_FILE,
    ELBOW_PLOT,
    FORMAT_VERSION,
    INDEX_FILE,
    KEY_DIGEST,
    METADATA_FILE,
    ClusterModel,
    data_fingerprint,
    digest_fingerprint,
    file_checksums,
    write_index_table,
)
from .distributed import Ranks
from .errors import ClusteringError
from .kmeans import ElbowResult, KMeansFit, choose_algorithm, elbow_sweep, fit_kmeans
from .options import ClusteringOptions, resolve_num_clusters
from .report import (
    KEYWORD_SAMPLE,
    plot_elbow,
    purity,
    purity_of_pairs,
    representatives_chunked,
    top_keywords,
    write_report_parts,
)
from .rows import Row
from .text import content_key, dataset_row_view, iter_rows, request_text

if TYPE_CHECKING:
    import datasets


def write_assignments(path: Path, rows: Sequence[Row], keys: Sequence[str], labels: np.ndarray):
    with open(path, "w", encoding="utf-8") as f:
        for row, key, label in zip(rows, keys, labels.tolist()):
            rec = {"key": key, "cluster": int(label), "dataset": row.dataset, "row": row.index}
            f.write(json.dumps(rec) + "\n")


def embedding_matrix(
    keys: Sequence[str] | np.ndarray,
    cache: encode.EmbeddingCache,
    normalize: bool,
    path: Path | None = None,
    chunk_rows: int = 16384,
) -> np.ndarray:
    """Every row's embedding in the rows' order, read from the cache shard by shard into an
    in-memory array, or with ``path`` into a memory-mapped .npy there; L2-normalised in place
    chunk by chunk, so both give the same numbers. ``keys`` are the rows' texts or their
    :meth:`.encode.EmbeddingCache.digests` (what the streamed pipeline passes: 16 bytes a row,
    matched to each shard by binary search, no dict of every key)."""
    if isinstance(keys, np.ndarray) and keys.dtype == encode.DIGEST:
        digests = keys
    else:
        digests = cache.digests(keys)
    order = np.argsort(digests, kind="stable")
    sorted_digests = digests[order]
    filled = np.zeros(len(digests), bool)  # by position in sorted_digests
    x: np.ndarray | None = None
    for shard in sorted(cache.dir.glob("shard-*.npz")):
        try:
            with np.load(shard) as data:
                shard_keys, emb = data["keys"], data["emb"]
        except (OSError, ValueError, KeyError):
            continue  # damaged: its texts were embedded again into another shard
        found = encode.hex_digests(shard_keys)
        lo = np.searchsorted(sorted_digests, found, "left")
        count = np.searchsorted(sorted_digests, found, "right") - lo
        # An older shard wins: rows already filled (and repeats inside a shard) are skipped.
        take = np.flatnonzero(count > 0)
        take = take[~filled[lo[take]]]
        take = np.sort(take[np.unique(found[take], return_index=True)[1]])
        if not len(take):
            continue  # another data set's texts
        n = count[take]
        pos = np.repeat(lo[take] - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
        filled[pos] = True
        if x is None:
            shape = (len(digests), emb.shape[1])
            x = (np.lib.format.open_memmap(path, "w+", np.float32, shape) if path
                 else np.empty(shape, np.float32))
        rows = order[pos]
        x[rows] = emb[np.repeat(take, n)]
    if not filled.all():
        missing = len(np.unique(sorted_digests[~filled]))
        raise ClusteringError(
            f"{missing} embeddings are not in the cache {cache.dir}: with several "
            "processes, moce.clustering.cache_dir must be a directory every rank (every node) "
            "shares, e.g. on a network filesystem. Rerun once it is; finished shards are "
            "reused."
        )
    if x is None:
        return np.zeros((0, 0), np.float32)
    if normalize:
        for start in range(0, len(x), chunk_rows):
            x[start : start + chunk_rows] = encode.l2_normalize(
                np.asarray(x[start : start + chunk_rows]))
    return x


class RowStream:
    """Rows read afresh from their data sets on every pass. Stage 1 reads its rows three
    times (check and key them, embed what the cache lacks, write the assignments) instead of
    holding a list of every row; any re-iterable of :class:`Row` (a list too) is accepted
    where a ``RowStream`` is."""

    def __init__(self, make: Callable[[], Iterable[Row]]) -> None:
        self._make = make

    def __iter__(self) -> Iterator[Row]:
        return iter(self._make())


def iter_rows_from_examples(
    name: str, examples: datasets.Dataset | Iterable[Mapping[str, Any]], template: str
) -> Iterator[Row]:
    """Rows of one data set, one at a time; source = its `source` column when present, else
    its name."""
    for i, ex in enumerate(iter_rows(examples)):
        src = ex.get("source")
        yield Row(name, i, request_text(ex, template), str(src) if src else name)


def rows_from_examples(
    name: str, examples: datasets.Dataset | Iterable[Mapping[str, Any]], template: str
) -> list[Row]:
    """Rows of one data set as a list; source = its `source` column when present, else its
    name. Stage 1 itself streams them (:class:`RowStream`)."""
    return list(iter_rows_from_examples(name, examples, template))


def check_rows(rows: Sequence[Row], num_clusters: int | str, template: str) -> int:
    """Reject inputs k-means cannot handle; returns the number of distinct texts."""
    empty = [r for r in rows if not r.text]
    distinct = len({r.text for r in rows})
    _check_counts(len(rows), len(empty), empty[0] if empty else None, distinct, num_clusters,
                  template)
    return distinct


def _check_counts(
    num_rows: int, num_empty: int, first_empty: Row | None, distinct: int,
    num_clusters: int | str, template: str,
) -> None:
    if not num_rows:
        raise ClusteringError(
            "the data set is empty: the YAML's `datasets:` produced no rows to cluster. Check "
            "the dataset paths/splits."
        )
    if num_empty:
        r = first_empty
        assert r is not None
        raise ClusteringError(
            f"{num_empty} of {num_rows} rows have an empty text to embed (e.g. dataset "
            f"'{r.dataset}' row {r.index}) with text_template {template!r}. Set "
            "moce.clustering.text_template to name the fields that hold the request, e.g. "
            "'{question}', or remove the empty rows."
        )
    if isinstance(num_clusters, int) and num_clusters > distinct:
        raise ClusteringError(
            f"num_clusters={num_clusters} is larger than the number of distinct examples "
            f"({distinct}). Use a smaller num_clusters or 'auto'."
        )


@dataclass
class RowScan:
    """What one pass over the rows leaves for the next ones: fixed-size arrays, no texts."""

    num_rows: int
    digests: np.ndarray  # each row's embedding-cache key (encode.DIGEST), in row order
    distinct: int
    datasets: dict[str, int]


def scan_rows(
    rows: Iterable[Row], signature: str, num_clusters: int | str, template: str,
    chunk_rows: int = 65536,
) -> RowScan:
    """First pass: each row's cache key digest, the counts, and :func:`check_rows`' checks."""
    cache = encode.EmbeddingCache(".", signature)  # for its key function only
    parts: list[np.ndarray] = [np.zeros(0, encode.DIGEST)]
    buf: list[bytes] = []
    counts: Counter[str] = Counter()
    num_empty, first_empty = 0, None
    for row in rows:
        if not row.text:
            num_empty += 1
            first_empty = first_empty or row
        counts[row.dataset] += 1
        buf.append(bytes.fromhex(cache.key(row.text)[:32]))
        if len(buf) >= chunk_rows:
            parts.append(np.array(buf, encode.DIGEST))
            buf.clear()
    parts.append(np.array(buf, encode.DIGEST))
    digests = np.concatenate(parts)
    distinct = len(np.unique(digests))
    _check_counts(len(digests), num_empty, first_empty, distinct, num_clusters, template)
    return RowScan(len(digests), digests, distinct, dict(counts))


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
    return _metadata(
        data_fingerprint(keys), data_fingerprint(keys, fit.labels), fit, elbow, options, dim,
        algorithm, purity(fit.labels, [r.source for r in rows]), len(rows),
        dict(Counter(r.dataset for r in rows)))


def _metadata(
    data_fp: str,
    assigned_fp: str,
    fit: KMeansFit,
    elbow: ElbowResult | None,
    options: ClusteringOptions,
    dim: int,
    algorithm: str,
    source_purity: float,
    num_rows: int,
    counts: dict[str, int],
) -> dict:
    embedding = {
        "model": options.embedding_model,
        "dim": dim,
        "prefix": options.prefix,
        "prompt": options.prompt,
        "normalize": options.normalize,
        "signature": encode.encoder_signature(options.embedding_model, options.prefix,
                                              options.prompt),
    }
    # What training reads from the artifact: which text maps to which id. Float-level centroid
    # differences (e.g. rows fed in another order) that do not change any id keep it stable.
    fingerprint = content_key(
        json.dumps([FORMAT_VERSION, options.text_template, fit.k, assigned_fp]))
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
        "purity_vs_source": source_purity,
        "num_rows": num_rows,
        "datasets": counts,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def silhouette_of(elbow: ElbowResult | None, fit: KMeansFit) -> float | None:
    return elbow.silhouette[elbow.ks.index(fit.k)] if elbow else None


def check_output_location(path: str | os.PathLike, what: str, option: str) -> None:
    """Refuse a folder path that cannot be created because one of its ancestors is a file,
    before the data and the encoder are loaded (otherwise ``mkdir`` fails late, naming
    another folder)."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ClusteringError(
                    f"{what} {path} cannot be created: {folder} is a file, not a folder. "
                    f"Set {option} to a path inside a folder."
                )
            return


def check_locations(output: Path, options: ClusteringOptions) -> None:
    """The artifact folder and the embedding cache can both be created."""
    check_output_location(output, "the cluster artifact", "moce.cluster_artifact (or --output)")
    if options.cache_dir:
        check_output_location(options.cache_dir, "the embedding cache",
                              "moce.clustering.cache_dir (or --cache-dir)")


def run_clustering(
    rows: Iterable[Row],
    output: str | os.PathLike,
    num_clusters: int | str = "auto",
    options: ClusteringOptions | None = None,
    encoder: encode.Encoder | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    ranks: Ranks | None = None,
) -> ClusterModel:
    """Embed ``rows``, choose k, cluster, and write the artifact at ``output`` atomically.

    ``rows`` is read several times and never held whole: a :class:`RowStream` (what
    :func:`rows_from_yaml` returns) re-reads the data sets on each pass, a list works too (a
    one-shot iterator is turned into a list first). Memory then grows by a few dozen bytes a
    row (keys, labels as arrays), not by the rows' texts; above ``memmap_rows`` the embedding
    matrix is a memory-mapped file.

    With ``ranks`` of several processes (:meth:`.distributed.Ranks.from_env`), every rank
    passes the same rows: each embeds its share into the shared cache, then rank 0 clusters
    and writes the artifact while the others wait for it.
    """
    options = options or ClusteringOptions()
    ranks = ranks or Ranks()
    output = Path(output)
    if iter(rows) is rows:  # a generator cannot be read twice
        rows = list(rows)
    check_replaceable(output, ARTIFACT_KIND)  # before embedding: never replace a user's files
    num_clusters = resolve_num_clusters(num_clusters)
    if encoder is None:  # built now, loaded on first use: its signature keys the rows
        device = options.device
        if ranks.distributed and device is None and _cuda_available():
            device = f"cuda:{ranks.local_rank}"  # one GPU per rank, no per-process pool
        encoder = encode.SentenceTransformerEncoder(
            options.embedding_model,
            options.prefix,
            options.prompt,
            options.batch_size,
            device,
        )
    scan = scan_rows(rows, encoder.signature, num_clusters, options.text_template)
    check_locations(output, options)
    cache_root = Path(options.cache_dir) if options.cache_dir else output.parent / ".moce_cache"
    cache = encode.EmbeddingCache(cache_root, encoder.signature)

    def texts() -> Iterator[str]:
        return (r.text for r in rows)

    if ranks.distributed:
        error: BaseException | None = None
        try:
            t0 = time.perf_counter()
            owned, done = encode.embed_missing(
                texts, scan.digests, encoder, cache, ranks.rank, ranks.world_size,
                options.batch_size, options.cache_shard_rows, progress,
            )
            log(f"rank {ranks.rank}/{ranks.world_size}: embedded {done} of its {owned} "
                f"distinct texts in {time.perf_counter() - t0:.1f}s (cache: {cache.dir})")
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised
            error = exc
        ranks.check_all(error)
        if not ranks.is_main:
            ranks.share_main_result(None)
            return ClusterModel.load(output)
        try:
            model = _cluster_and_write(rows, scan, output, num_clusters, options, cache, log)
        except BaseException as exc:
            ranks.share_main_result(exc)
            raise
        ranks.share_main_result(None)
        return model
    t0 = time.perf_counter()
    _, done = encode.embed_missing(texts, scan.digests, encoder, cache, 0, 1,
                                   options.batch_size, options.cache_shard_rows, progress)
    log(f"embedded {done} new texts in {time.perf_counter() - t0:.1f}s (cache: {cache.dir})")
    return _cluster_and_write(rows, scan, output, num_clusters, options, cache, log)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _cluster_and_write(
    rows: Iterable[Row],
    scan: RowScan,
    output: Path,
    num_clusters: int | str,
    options: ClusteringOptions,
    cache: encode.EmbeddingCache,
    log: Callable[[str], None],
) -> ClusterModel:
    """The rows' embeddings (all in the cache by now) in the rows' order, then k, k-means
    and the artifact."""
    matrix = None
    if scan.num_rows > options.memmap_rows:
        matrix = cache.dir / f"matrix-{os.getpid()}.npy"
    try:
        x = embedding_matrix(scan.digests, cache, options.normalize, matrix)
        return _fit_and_write(rows, scan, x, output, num_clusters, options, log)
    finally:
        if matrix is not None:
            matrix.unlink(missing_ok=True)


@dataclass
class _Written:
    """What the writing pass over the rows learned besides assignments.jsonl."""

    keys: np.ndarray  # each row's content key (KEY_DIGEST), row order
    pairs: Counter[tuple[int, str]]  # (cluster, source) -> rows
    keyword_texts: list[str]
    keyword_labels: np.ndarray
    rep_rows: dict[int, Row]


def _write_rows(
    path: Path, rows: Iterable[Row], labels: np.ndarray, num_rows: int, keyword_pick:
    np.ndarray | None, rep_indices: set[int],
) -> _Written:
    """Last pass: assignments.jsonl line by line, each row's content key into an array, the
    cluster x source counts, and the few rows the report quotes."""
    keys = np.empty(num_rows, KEY_DIGEST)
    pairs: Counter[tuple[int, str]] = Counter()
    keyword_texts: list[str] = []
    wanted = np.ones(num_rows, bool)  # every text, unless a sample is picked
    if keyword_pick is not None:
        wanted[:] = False
        wanted[keyword_pick] = True
    rep_rows: dict[int, Row] = {}
    label_list = labels.tolist()
    i = -1
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            if i >= num_rows:
                break
            key = content_key(row.text)
            keys[i] = bytes.fromhex(key)
            label = label_list[i]
            f.write(json.dumps({"key": key, "cluster": int(label), "dataset": row.dataset,
                                "row": row.index}) + "\n")
            pairs[(label, row.source)] += 1
            if wanted[i]:
                keyword_texts.append(row.text)
            if i in rep_indices:
                rep_rows[i] = row
    if i + 1 != num_rows:
        raise ClusteringError(
            f"the data sets changed while stage 1 read them ({num_rows} rows on the first "
            f"pass, {'more' if i + 1 >= num_rows else i + 1} now): rerun once they stay put."
        )
    keyword_labels = labels if keyword_pick is None else labels[keyword_pick]
    return _Written(keys, pairs, keyword_texts, keyword_labels, rep_rows)


def _fit_and_write(
    rows: Iterable[Row],
    scan: RowScan,
    x: np.ndarray,
    output: Path,
    num_clusters: int | str,
    options: ClusteringOptions,
    log: Callable[[str], None],
) -> ClusterModel:
    algorithm = choose_algorithm(len(x), options.algorithm)
    elbow = None
    if num_clusters == "auto":
        distinct = scan.distinct
        if distinct < 3:
            raise ClusteringError(
                f"only {distinct} distinct examples: too few for the elbow method. Set "
                "moce.num_clusters to an integer."
            )
        k_max = min(options.k_max, distinct)
        if len(x) > options.elbow_sample:
            # The sweep fits k_max models: on a fixed-size sample, then the chosen k on all.
            pick = np.sort(np.random.default_rng(options.seed).choice(
                len(x), options.elbow_sample, replace=False))
            elbow = elbow_sweep(np.asarray(x[pick]), k_max, algorithm, options.seed,
                                options.n_init)
            fit = fit_kmeans(x, elbow.k, algorithm, options.seed, options.n_init)
        else:
            elbow = elbow_sweep(x, k_max, algorithm, options.seed, options.n_init)
            fit = elbow.fits[elbow.k]
        log(f"elbow: k={elbow.k} ({elbow.method}); SSE {[round(s, 1) for s in elbow.sse]}")
    else:
        fit = fit_kmeans(x, int(num_clusters), algorithm, options.seed, options.n_init)
    reps = representatives_chunked(x, fit.labels, fit.centroids) if options.report else []
    keyword_pick = None
    if scan.num_rows > KEYWORD_SAMPLE:  # TF-IDF keywords on a seeded sample of the texts
        keyword_pick = np.sort(np.random.default_rng(options.seed).choice(
            scan.num_rows, KEYWORD_SAMPLE, replace=False))
    metadata: dict = {}

    def fill(tmp: Path) -> None:
        np.save(tmp / CENTROIDS_FILE, fit.centroids)
        written = _write_rows(tmp / ASSIGNMENTS_FILE, rows, fit.labels, scan.num_rows,
                              keyword_pick, {i for rep in reps for i in rep})
        write_index_table(tmp / INDEX_FILE, written.keys, fit.labels)
        metadata.update(_metadata(
            digest_fingerprint(written.keys), digest_fingerprint(written.keys, fit.labels),
            fit, elbow, options, int(x.shape[1]), algorithm,
            purity_of_pairs(written.pairs, scan.num_rows), scan.num_rows, scan.datasets))
        del written.keys
        if elbow is not None:
            plot_elbow(elbow, tmp / ELBOW_PLOT)
        if options.report:
            keywords = top_keywords(written.keyword_texts, written.keyword_labels, fit.k)
            write_report_parts(tmp, metadata, written.rep_rows, reps, keywords, written.pairs,
                               x, fit, options)
        metadata["files"] = file_checksums(tmp)  # checked by ClusterModel.load
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

    atomic_dir(output, fill, ARTIFACT_KIND)
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
        raise ClusteringError("the YAML has no `datasets:` list; nothing to cluster.")
    loaded = []
    for entry in entries:
        dc = DictDefault(dict(entry))
        if not dc.path:
            raise ClusteringError(f"a `datasets:` entry has no `path`: {dict(entry)}")
        if _is_empty_file(Path(str(dc.path))):
            raise _empty_dataset(dc.path)
        try:
            ds = load_dataset_with_config(dc, cfg.get("hf_use_auth_token"), streaming=False)
        except Exception as exc:  # noqa: BLE001 - surface as one clean line
            if "corresponds to no data" in str(exc):  # datasets' words for zero rows
                raise _empty_dataset(dc.path) from exc
            raise ClusteringError(
                f"cannot load dataset '{dc.path}' ({type(exc).__name__}: {str(exc)[:200]}). "
                "Relative paths are relative to the current directory, as in axolotl."
            ) from exc
        if isinstance(ds, (DatasetDict, IterableDatasetDict)):
            split = dc.split or "train"
            if split not in ds:
                raise ClusteringError(
                    f"dataset '{dc.path}' has no split '{split}' (has {list(ds)}); set `split:`."
                )
            ds = ds[split]
        if len(ds) == 0:
            raise _empty_dataset(dc.path)
        loaded.append((str(dc.path), ds))
    return loaded


def _is_empty_file(path: Path) -> bool:
    """A local data file with no rows: zero bytes, blank, or an empty JSON list/object
    (without this check the loaders fail with StopIteration or "corresponds to no data")."""
    if not path.is_file():
        return False
    size = path.stat().st_size
    if size > 64:
        return False
    return path.read_text(encoding="utf-8", errors="replace").strip() in ("", "[]", "{}")


def _empty_dataset(path: Any) -> ClusteringError:
    return ClusteringError(
        f"the data set '{path}' is empty (no rows): add rows to it or remove it from "
        "`datasets:`."
    )


def rows_from_yaml(cfg: Mapping[str, Any], template: str) -> RowStream:
    """The rows of every ``datasets:`` entry, in order, as a :class:`RowStream`: the data sets
    are loaded (Arrow, memory-mapped) once here and re-read on each of stage 1's passes."""
    # One loaded data set per `datasets:` entry, in order.
    loaded = [(name, ds, dataset_row_view(entry)) for (name, ds), entry in
              zip(load_yaml_datasets(cfg), cfg.get("datasets") or [])]

    def read() -> Iterator[Row]:
        for name, ds, view in loaded:  # view: the dataset's own role names and fields
            yield from iter_rows_from_examples(name, (view(r) for r in iter_rows(ds)),
                                               template)

    return RowStream(read)
