"""The cluster artifact: its file format and :class:`ClusterModel`, the runtime surface.

Training looks rows up by content key (:meth:`ClusterModel.lookup`), so row order,
shuffling and sharding do not matter and changed data is detected instead of silently
mis-assigned; inference computes the same request text (:func:`.text.request_text`) for a
prompt, chat messages or a row, embeds it with the recorded encoder settings and takes the
nearest centroid (:meth:`ClusterModel.assign_requests`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..utils import FolderKind, describe_difference, read_json
from .encode import SentenceTransformerEncoder, embed_texts, l2_normalize
from .errors import ClusterArtifactError, ClusteringError
from .kmeans import nearest_centroid
from .text import Request, content_key, iter_rows, request_text

if TYPE_CHECKING:
    import datasets

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
CENTROIDS_FILE = "centroids.npy"
ASSIGNMENTS_FILE = "assignments.jsonl"
#: assignments.jsonl's (key, cluster) pairs as a sorted fixed-width table, so that training
#: looks rows up by binary search in a memory map instead of loading every key.
INDEX_FILE = "assignments.index.npy"
_INDEX_DTYPE = np.dtype([("key", "S32"), ("cluster", "<i4")])
REPORT_FILE = "report.md"
ELBOW_PLOT = "elbow.png"
CLUSTER_MAP_PLOT = "cluster_map.png"
BY_SOURCE_PLOT = "cluster_by_source.png"
REQUIRED_FILES = (METADATA_FILE, CENTROIDS_FILE, ASSIGNMENTS_FILE)


# moce.clustering option -> where metadata.json records it: the settings that decide the
# clusters (checked by ClusterModel.check_settings when training starts).
CLUSTER_SETTINGS = {
    "text_template": ("text", "template"),
    "embedding_model": ("embedding", "model"),
    "prefix": ("embedding", "prefix"),
    "prompt": ("embedding", "prompt"),
    "normalize": ("embedding", "normalize"),
    "seed": ("kmeans", "seed"),
    "n_init": ("kmeans", "n_init"),
    "algorithm": ("kmeans", "algorithm"),
    "k_max": ("k_selection", "k_max"),
}


def is_cluster_artifact(path: Path) -> bool:
    """An earlier artifact (which re-clustering may replace): a metadata.json recording a
    format version and k. A damaged one does not count: it may be anything."""
    try:
        meta = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and isinstance(meta.get("format_version"), int)
            and "num_clusters" in meta)


ARTIFACT_KIND = FolderKind(
    "cluster artifact", is_cluster_artifact,
    "Point moce.cluster_artifact (or --output) at a new folder, e.g. `clusters` beside your "
    "data, or move this one away first.",
    ClusterArtifactError,
)


def data_fingerprint(keys: Iterable[str], labels: Iterable[int] | None = None) -> str:
    """Order-independent fingerprint of the clustered rows (a multiset of content keys), or,
    with ``labels``, of what training consumes: the multiset of (key, cluster) pairs."""
    keys = list(keys)
    digests = np.fromiter((bytes.fromhex(k) for k in keys), KEY_DIGEST, len(keys))
    return digest_fingerprint(digests, None if labels is None else np.fromiter(labels, np.int64))


#: A content key (sha256 hex of a text) as a fixed-size array item: its 32 raw bytes.
KEY_DIGEST = np.dtype("S32")


def digest_fingerprint(digests: np.ndarray, labels: np.ndarray | None = None,
                       chunk_rows: int = 65536) -> str:
    """:func:`data_fingerprint` of keys given as a :data:`KEY_DIGEST` array: the same hash
    (raw bytes sort as their lowercase hex does), from arrays instead of a list of tuples."""
    table = np.empty(len(digests), [("key", KEY_DIGEST), ("cluster", np.int64)])
    table["key"] = digests
    table["cluster"] = -1 if labels is None else labels
    table.sort(order=["key", "cluster"])
    h = hashlib.sha256()
    for start in range(0, len(table), chunk_rows):
        part = table[start : start + chunk_rows]
        raw = part["key"].tobytes()  # fixed width: keys ending in NUL bytes stay whole
        h.update("".join(
            f"{raw[32 * i : 32 * i + 32].hex()}:{c};" for i, c in enumerate(
                part["cluster"].tolist())).encode())
    return h.hexdigest()


def _digest(path: Path) -> tuple[str, int]:
    """(sha256, number of lines) of a file, read in blocks."""
    h, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            lines += block.count(b"\n")
    return h.hexdigest(), lines


def file_checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """metadata.json's ``files``: sha256 (and row count) of the files training and inference
    read, so :meth:`ClusterModel.load` reports a damaged file as damage."""
    out: dict[str, dict[str, Any]] = {}
    for name in (CENTROIDS_FILE, ASSIGNMENTS_FILE, INDEX_FILE):
        if name == INDEX_FILE and not (directory / name).is_file():
            continue  # optional: artifacts without it are looked up through assignments.jsonl
        digest, lines = _digest(directory / name)
        out[name] = {"sha256": digest, **({"rows": lines} if name == ASSIGNMENTS_FILE else {})}
    return out


def check_files(path: Path, metadata: dict) -> None:
    """Compare the files with metadata.json's checksums; artifacts written before checksums
    were recorded are checked by assignments.jsonl's row count (``num_rows``) only."""
    recorded = metadata.get("files") or {
        ASSIGNMENTS_FILE: {"rows": metadata.get("num_rows")}}
    for name, want in recorded.items():
        digest, rows = _digest(path / name)
        if want.get("rows") is not None and rows != want["rows"]:
            raise ClusterArtifactError(
                f"cluster artifact {path}: {name} is damaged: it has {rows} rows, "
                f"{METADATA_FILE} records {want['rows']} (cut short or edited)."
            )
        if want.get("sha256") and digest != want["sha256"]:
            raise ClusterArtifactError(
                f"cluster artifact {path}: {name} is damaged: its sha256 differs from the one "
                f"in {METADATA_FILE} (changed after clustering)."
            )


def write_index(path: Path, keys: Iterable[str], labels: Iterable[int]) -> None:
    """:data:`INDEX_FILE` of the (content key, cluster) pairs, sorted by key (one per key)."""
    table = np.fromiter(
        ((bytes.fromhex(k), c) for k, c in zip(keys, labels)), _INDEX_DTYPE)
    write_index_table(path, table["key"], table["cluster"])


def write_index_table(path: Path, digests: np.ndarray, labels: np.ndarray) -> None:
    """:func:`write_index` from a :data:`KEY_DIGEST` array and the labels."""
    table = np.empty(len(digests), _INDEX_DTYPE)
    table["key"], table["cluster"] = digests, labels
    np.save(path, np.unique(table))  # sorted by key, then cluster; equal texts share a cluster


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
        if path.exists() and not path.is_dir():
            raise ClusterArtifactError(
                f"cluster artifact {path} is a file, not the folder preprocess/cluster.py "
                "writes: point moce.cluster_artifact at a new folder (e.g. `clusters` beside "
                "your data) and run `python preprocess/cluster.py <your.yml>`."
            )
        if not path.is_dir():
            raise ClusterArtifactError(f"cluster artifact {path} does not exist. {rerun}")
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise ClusterArtifactError(
                f"cluster artifact {path} is incomplete (missing {', '.join(missing)}). {rerun}"
            )
        try:
            metadata = read_json(path / METADATA_FILE, "cluster artifact metadata")
            check_files(path, metadata)
            centroids = np.load(path / CENTROIDS_FILE)
        except ClusterArtifactError as exc:
            raise ClusterArtifactError(f"{exc} {rerun}") from exc
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
    def text_of(self, request: Request) -> str:
        """The request text of a training row or an inference request, by the recorded
        template: the one rule preprocessing, training and inference share."""
        return request_text(request, self.template)

    def key_of(self, example: Mapping[str, Any]) -> str:
        return content_key(self.text_of(example))

    # -- training: stored assignments
    @property
    def assignments(self) -> dict[str, int]:
        if self._assignments is None:
            table: dict[str, int] = {}
            with open(self.path / ASSIGNMENTS_FILE, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        rec = json.loads(line)
                        table[rec["key"]] = int(rec["cluster"])
                    except (ValueError, KeyError, TypeError) as exc:
                        raise ClusterArtifactError(
                            f"cluster artifact {self.path}: {ASSIGNMENTS_FILE} is damaged at "
                            f"line {lineno} ({type(exc).__name__}). Re-run `python "
                            "preprocess/cluster.py <your.yml>` to re-create it."
                        ) from exc
            self._assignments = table
        return self._assignments

    def lookup(
        self, examples: datasets.Dataset | Iterable[Mapping[str, Any]], dataset_name: str
    ) -> list[int]:
        """Cluster id of every row by content key; rows not clustered are an error."""
        get = self._index_get() if self._assignments is None else None
        table = self.assignments if get is None else {}
        ids: list[int] = []
        missing: list[tuple[int, str]] = []
        for i, row in enumerate(iter_rows(examples)):
            text = self.text_of(row)
            cid = table.get(content_key(text)) if get is None else get(content_key(text))
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

    def _index_get(self) -> Any:
        """Key -> cluster (or None) by binary search in the memory-mapped :data:`INDEX_FILE`;
        None when the artifact has no index, or one its metadata's checksums do not cover
        (then only assignments.jsonl is trusted)."""
        if INDEX_FILE not in (self.metadata.get("files") or {}):
            return None
        index = np.load(self.path / INDEX_FILE, mmap_mode="r")
        keys = index["key"]

        def get(key: str) -> int | None:
            raw = bytes.fromhex(key)
            at = int(np.searchsorted(keys, np.bytes_(raw)))
            # numpy returns fixed-width bytes without trailing NULs: compare stripped
            found = at < len(keys) and bytes(keys[at]) == raw.rstrip(b"\0")
            return int(index["cluster"][at]) if found else None

        return get

    # -- inference: embed and take the nearest centroid
    def _get_encoder(self) -> SentenceTransformerEncoder:
        if self._encoder is None:
            emb = self.metadata["embedding"]
            self._encoder = SentenceTransformerEncoder(
                emb["model"], prefix=emb["prefix"], prompt=emb["prompt"]
            )
        return self._encoder

    def set_encoder_path(self, path: str) -> None:
        """Embed with the recorded encoder's weights found at ``path`` (an exported folder's
        bundled or installed copy) instead of resolving its recorded name."""
        emb = self.metadata["embedding"]
        self._encoder = SentenceTransformerEncoder(path, prefix=emb["prefix"], prompt=emb["prompt"])

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

    def use_encoder(self, encoder: Any) -> None:
        """Embed with ``encoder`` instead of the recorded one (tests, or an encoder already
        loaded elsewhere); it must be the encoder the artifact was built with."""
        self._encoder = encoder

    def assign_requests(self, requests: Sequence[Request]) -> np.ndarray:
        """Cluster of each inference request (plain prompt, chat messages or a row in the
        training format): the inference entry point every serving path uses."""
        texts = []
        for i, request in enumerate(requests):
            try:
                text = self.text_of(request)
            except ClusteringError as exc:
                raise ClusterArtifactError(f"request {i}: {exc}") from exc
            if not text:
                raise ClusterArtifactError(
                    f"request {i} has an empty request text under the artifact's text template "
                    f"{self.template!r} ({_preview(request)}): nothing to assign a cluster "
                    "from. Send the prompt (or a row with the fields the template reads), or "
                    "pass the cluster explicitly."
                )
            texts.append(text)
        return self.assign_texts(texts)

    def settings_difference(self, options: Any) -> dict[str, tuple[Any, Any]]:
        """``moce.clustering`` keys (of :class:`.options.ClusteringOptions` ``options``) whose
        value would make other clusters than this artifact's: {key: (recorded, given)}.
        Settings that do not change the clusters (batch_size, device, cache, report) are not
        compared; neither are keys an older artifact did not record."""
        from .kmeans import choose_algorithm

        meta = self.metadata
        diff = {}
        for name, (section, key) in CLUSTER_SETTINGS.items():
            recorded = meta.get(section) or {}
            if key not in recorded:
                continue
            if name == "k_max" and recorded.get("requested") != "auto":
                continue  # k_max chose k only with num_clusters: auto
            given = getattr(options, name)
            if name == "algorithm" and given == "auto" and meta.get("num_rows") is not None:
                given = choose_algorithm(int(meta["num_rows"]), "auto")
            if recorded[key] != given:
                diff[name] = (recorded[key], given)
        return diff

    def check_settings(self, options: Any, config: str = "<your.yml>") -> None:
        """Refuse a ``moce.clustering`` block that differs from the one this artifact was made
        with: training would use clusters its YAML (and its moce_config.json) does not
        describe."""
        diff = self.settings_difference(options)
        if diff:
            details = describe_difference(diff, "artifact")
            raise ClusterArtifactError(
                f"moce.clustering differs from the settings the cluster artifact {self.path} "
                f"was made with ({details}). Re-cluster with `moce-cluster {config}` (or "
                f"`python preprocess/cluster.py {config}`), or set "
                f"{', '.join(f'moce.clustering.{k}' for k in diff)} back to the artifact's."
            )

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



def _preview(request: Request) -> str:
    return repr(request)[:120]
