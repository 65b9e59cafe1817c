"""What ``preprocess/cluster.py`` runs: rows -> embeddings -> k -> artifact (atomically).

The functions do one job each: embed with a resumable cache (:mod:`.encode`), sweep k and
fit (:mod:`.kmeans`), write the artifact (:mod:`.artifact`) and the report (:mod:`.report`).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    METADATA_FILE,
    ClusterModel,
    data_fingerprint,
    file_checksums,
    write_index,
)
from .distributed import Ranks
from .errors import ClusteringError
from .kmeans import ElbowResult, KMeansFit, choose_algorithm, elbow_sweep, fit_kmeans
from .options import ClusteringOptions, resolve_num_clusters
from .report import plot_elbow, purity, write_report
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
    texts: Sequence[str],
    cache: encode.EmbeddingCache,
    normalize: bool,
    path: Path | None = None,
    chunk_rows: int = 16384,
) -> np.ndarray:
    """Every text's embedding in the texts' order, read from the cache shard by shard (no
    dict of every embedding) into an in-memory array, or with ``path`` into a memory-mapped
    .npy there; L2-normalised in place chunk by chunk, so both give the same numbers."""
    rows_of: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        rows_of.setdefault(cache.key(t), []).append(i)
    x: np.ndarray | None = None
    for shard in sorted(cache.dir.glob("shard-*.npz")):
        try:
            with np.load(shard) as data:
                keys, emb = data["keys"], data["emb"]
        except (OSError, ValueError, KeyError):
            continue  # damaged: its texts were embedded again into another shard
        for j, key in enumerate(k.decode() for k in keys.tolist()):
            idx = rows_of.pop(key, None)
            if idx is None:
                continue  # another data set's text, or already filled from an older shard
            if x is None:
                shape = (len(texts), emb.shape[1])
                x = (np.lib.format.open_memmap(path, "w+", np.float32, shape) if path
                     else np.empty(shape, np.float32))
            x[idx] = emb[j]
    if rows_of:
        raise ClusteringError(
            f"{len(rows_of)} embeddings are not in the cache {cache.dir}: with several "
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


def rows_from_examples(
    name: str, examples: datasets.Dataset | Iterable[Mapping[str, Any]], template: str
) -> list[Row]:
    """Rows of one data set; source = its `source` column when present, else its name."""
    rows = []
    for i, ex in enumerate(iter_rows(examples)):
        src = ex.get("source")
        rows.append(Row(name, i, request_text(ex, template), str(src) if src else name))
    return rows


def check_rows(rows: Sequence[Row], num_clusters: int | str, template: str) -> int:
    """Reject inputs k-means cannot handle; returns the number of distinct texts."""
    if not rows:
        raise ClusteringError(
            "the data set is empty: the YAML's `datasets:` produced no rows to cluster. Check "
            "the dataset paths/splits."
        )
    empty = [r for r in rows if not r.text]
    if empty:
        r = empty[0]
        raise ClusteringError(
            f"{len(empty)} of {len(rows)} rows have an empty text to embed (e.g. dataset "
            f"'{r.dataset}' row {r.index}) with text_template {template!r}. Set "
            "moce.clustering.text_template to name the fields that hold the request, e.g. "
            "'{question}', or remove the empty rows."
        )
    distinct = len({r.text for r in rows})
    if isinstance(num_clusters, int) and num_clusters > distinct:
        raise ClusteringError(
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
        "signature": encode.encoder_signature(options.embedding_model, options.prefix,
                                              options.prompt),
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
    rows: Sequence[Row],
    output: str | os.PathLike,
    num_clusters: int | str = "auto",
    options: ClusteringOptions | None = None,
    encoder: encode.Encoder | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    ranks: Ranks | None = None,
) -> ClusterModel:
    """Embed ``rows``, choose k, cluster, and write the artifact at ``output`` atomically.

    With ``ranks`` of several processes (:meth:`.distributed.Ranks.from_env`), every rank
    passes the same rows: each embeds its share into the shared cache, then rank 0 clusters
    and writes the artifact while the others wait for it.
    """
    options = options or ClusteringOptions()
    ranks = ranks or Ranks()
    output = Path(output)
    check_replaceable(output, ARTIFACT_KIND)  # before embedding: never replace a user's files
    num_clusters = resolve_num_clusters(num_clusters)
    check_rows(rows, num_clusters, options.text_template)
    check_locations(output, options)
    if encoder is None:
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
    cache_root = Path(options.cache_dir) if options.cache_dir else output.parent / ".moce_cache"
    cache = encode.EmbeddingCache(cache_root, encoder.signature)
    texts = [r.text for r in rows]
    if ranks.distributed:
        error: BaseException | None = None
        try:
            t0 = time.perf_counter()
            owned, done = encode.embed_share(
                texts, encoder, cache, ranks.rank, ranks.world_size, options.batch_size,
                options.cache_shard_rows, progress,
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
            model = _cluster_and_write(rows, texts, output, num_clusters, options, cache, log)
        except BaseException as exc:
            ranks.share_main_result(exc)
            raise
        ranks.share_main_result(None)
        return model
    t0 = time.perf_counter()
    _, done = encode.embed_share(texts, encoder, cache, 0, 1, options.batch_size,
                                 options.cache_shard_rows, progress)
    log(f"embedded {done} new texts in {time.perf_counter() - t0:.1f}s (cache: {cache.dir})")
    return _cluster_and_write(rows, texts, output, num_clusters, options, cache, log)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _cluster_and_write(
    rows: Sequence[Row],
    texts: Sequence[str],
    output: Path,
    num_clusters: int | str,
    options: ClusteringOptions,
    cache: encode.EmbeddingCache,
    log: Callable[[str], None],
) -> ClusterModel:
    """The rows' embeddings (all in the cache by now) in the rows' order, then k, k-means
    and the artifact."""
    matrix = None
    if len(texts) > options.memmap_rows:
        matrix = cache.dir / f"matrix-{os.getpid()}.npy"
    try:
        x = embedding_matrix(texts, cache, options.normalize, matrix)
        return _fit_and_write(rows, texts, x, output, num_clusters, options, log)
    finally:
        if matrix is not None:
            matrix.unlink(missing_ok=True)


def _fit_and_write(
    rows: Sequence[Row],
    texts: Sequence[str],
    x: np.ndarray,
    output: Path,
    num_clusters: int | str,
    options: ClusteringOptions,
    log: Callable[[str], None],
) -> ClusterModel:
    algorithm = choose_algorithm(len(x), options.algorithm)
    elbow = None
    if num_clusters == "auto":
        distinct = len(set(texts))
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
    keys = [content_key(t) for t in texts]
    metadata = build_metadata(rows, keys, fit, elbow, options, int(x.shape[1]), algorithm)

    def fill(tmp: Path) -> None:
        np.save(tmp / CENTROIDS_FILE, fit.centroids)
        write_assignments(tmp / ASSIGNMENTS_FILE, rows, keys, fit.labels)
        write_index(tmp / INDEX_FILE, keys, fit.labels.tolist())
        if elbow is not None:
            plot_elbow(elbow, tmp / ELBOW_PLOT)
        if options.report:
            write_report(tmp, metadata, rows, x, fit, options)
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


def rows_from_yaml(cfg: Mapping[str, Any], template: str) -> list[Row]:
    rows: list[Row] = []
    # One loaded data set per `datasets:` entry, in order.
    for (name, ds), entry in zip(load_yaml_datasets(cfg), cfg.get("datasets") or []):
        view = dataset_row_view(entry)  # the dataset's own role names and fields
        rows.extend(rows_from_examples(name, (view(r) for r in iter_rows(ds)), template))
    return rows
