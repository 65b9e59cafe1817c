"""Every command-line option's effect, checked by value (not only the error exits): the output
of each command with the option equals what the Python API gives for the same setting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from axolotl_helpers import SOURCE_TO_CLUSTER, sample_rows
from fake_encoder import BagEncoder
from safetensors import safe_open
from test_inference import _full_output, base_dir

import moce_plugin.clustering.encode as encode
from moce_plugin.clustering import cli as cluster_cli
from moce_plugin.clustering.options import ClusteringOptions
from moce_plugin.outputs.export import main as export_main
from moce_plugin.outputs.generate import main as generate_main
from moce_plugin.outputs.load import MoCEInferenceModel, load_moce_model
from moce_plugin.outputs.usage import main as usage_main
from moce_plugin.outputs.usage import model_text

__all__ = ["base_dir"]

PROMPTS = ["Give three tips for staying healthy.", "Add 2 and 3.", "Write a haiku."]


@pytest.fixture
def out(tmp_path, base_dir) -> Path:
    _full_output(base_dir, tmp_path / "out")
    return tmp_path / "out"


# ---- moce-generate ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["raw", "alpaca"])
def test_generate_prompt_cluster_tokens_and_format_give_the_apis_text(out, capsys, fmt):
    moce = load_moce_model(out, prompt_format=fmt)
    for cluster in (0, 2):
        want = moce.generate([PROMPTS[0]], cluster=cluster, max_new_tokens=5)[0]
        assert generate_main([str(out), "--prompt", PROMPTS[0], "--cluster", str(cluster),
                              "--max-new-tokens", "5", "--prompt-format", fmt,
                              "--no-stream", "--device", "cpu"]) == 0
        assert capsys.readouterr().out == f"[cluster {cluster}] {want}\n"
        assert generate_main([str(out), "--prompt", PROMPTS[0], "--cluster", str(cluster),
                              "--max-new-tokens", "5", "--prompt-format", fmt]) == 0
        assert capsys.readouterr().out == f"[cluster {cluster}] {want}\n"  # streamed: same
    assert moce.generate([PROMPTS[0]], cluster=2, max_new_tokens=2)[0] != want  # tokens matter
    other = load_moce_model(out, prompt_format="alpaca" if fmt == "raw" else "raw")
    assert other.format_prompt(PROMPTS[0]) != moce.format_prompt(PROMPTS[0])


def test_generate_prompts_file_in_batches_of_batch_size(out, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    sizes: list[int] = []
    original = MoCEInferenceModel.generate

    def spy(self, batch, *args, **kwargs):
        sizes.append(len(batch))
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(MoCEInferenceModel, "generate", spy)
    assert generate_main([str(out), "--prompts-file", str(prompts), "--cluster", "1",
                          "--batch-size", "2", "--max-new-tokens", "3"]) == 0
    assert sizes == [2, 1]
    moce = load_moce_model(out)
    want = original(moce, PROMPTS[:2], cluster=1, max_new_tokens=3) + original(
        moce, PROMPTS[2:], cluster=1, max_new_tokens=3)
    assert capsys.readouterr().out == "".join(
        f"### [cluster 1] {p}\n{w}\n\n" for p, w in zip(PROMPTS, want))


# ---- moce-export ---------------------------------------------------------------------------
def test_export_dtype_and_overwrite_by_value(out, tmp_path):
    dest = tmp_path / "dest"
    assert export_main([str(out), str(dest), "--dtype", "bfloat16"]) == 0
    with safe_open(str(dest / "model.safetensors"), framework="pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.bfloat16}  # noqa: SIM118
    with safe_open(str(dest / "moce_weights.safetensors"), framework="pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.bfloat16}  # noqa: SIM118
    (dest / "mine.txt").write_text("x")
    assert export_main([str(out), str(dest), "--overwrite"]) == 0
    assert not (dest / "mine.txt").exists()
    with safe_open(str(dest / "model.safetensors"), framework="pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float32}  # noqa: SIM118


# ---- moce-usage ---------------------------------------------------------------------------
def test_usage_max_rows_max_length_batch_size_and_out(out, tmp_path, monkeypatch):
    rows = [{**{k: r[k] for k in ("instruction", "input", "output", "source")},
             "cluster_id": SOURCE_TO_CLUSTER[r["source"]]} for r in sample_rows(12)]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    moce = load_moce_model(out)
    calls: list[int] = []
    forward = type(moce.model).forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(moce.model), "forward", spy)
    usage_main([str(out), "--data", str(data), "--out", str(tmp_path / "u" / "report"),
                "--max-rows", "7", "--max-length", "9", "--batch-size", "3", "--device", "cpu"])
    usage = json.loads((tmp_path / "u" / "report.json").read_text())
    assert (tmp_path / "u" / "report.png").is_file()
    assert usage["rows"] == 7 and calls == [3, 3, 1]
    want = [0.0] * 3
    for r in rows[:7]:
        n = len(moce.tokenizer(model_text(moce, r))["input_ids"])
        want[r["cluster_id"]] += min(n, 9)
    assert usage["layers"]["0"]["group_tokens"] == want


# ---- moce-cluster ---------------------------------------------------------------------------
class _Model:
    """What SentenceTransformerEncoder calls: records each call's texts, batch size, prompt."""

    calls: list[tuple[list[str], int, str | None]] = []

    def __init__(self) -> None:
        self.bag = BagEncoder()

    def encode(self, texts, batch_size, prompt=None, **_):
        _Model.calls.append((list(texts), batch_size, prompt))
        return self.bag.encode(list(texts))


def test_every_cluster_option_reaches_the_artifact(tmp_path, monkeypatch):
    """One non-default value per ClusteringOptions flag; each is found in the artifact's
    metadata, the encoder's calls or the files written."""
    loaded: list[tuple[str, str | None]] = []

    def load(name, device):
        loaded.append((name, device))
        return _Model()

    monkeypatch.setattr(encode, "load_sentence_transformer", load)
    _Model.calls = []
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": r["instruction"], "answer": r["output"]})
                              for r in sample_rows(30)))
    cfg = tmp_path / "c.yml"
    cfg.write_text(json.dumps({"datasets": [{"path": str(data), "type": "alpaca",
                                             "ds_type": "json"}],
                               "moce": {"cluster_artifact": str(tmp_path / "unused")}}))
    values = {"embedding_model": "my-encoder", "prefix": "query: ", "prompt": "Represent: ",
              "text_template": "{question}", "normalize": False, "k_max": 4, "seed": 7,
              "algorithm": "kmeans", "n_init": 2, "batch_size": 5,
              "cache_dir": str(tmp_path / "cache"), "cache_shard_rows": 10, "device": "cpu",
              "report": False, "tsne_sample": 12, "memmap_rows": 10, "elbow_sample": 20}
    assert set(values) == {f.name for f in dataclasses.fields(ClusteringOptions)}, \
        "a new option: give it a value here and check its effect below"
    from moce_plugin.clustering import pipeline

    matrices: list = []
    swept: list[int] = []
    real_matrix, real_sweep = pipeline.embedding_matrix, pipeline.elbow_sweep
    monkeypatch.setattr(pipeline, "embedding_matrix", lambda texts, cache, normalize, matrix:
                        matrices.append(matrix) or real_matrix(texts, cache, normalize, matrix))
    monkeypatch.setattr(pipeline, "elbow_sweep", lambda x, *a: swept.append(len(x))
                        or real_sweep(x, *a))
    argv = [str(cfg), "--output", str(tmp_path / "art"), "--num-clusters", "auto", "--quiet"]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        argv += [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    assert cluster_cli.main(argv) == 0
    md = json.loads((tmp_path / "art" / "metadata.json").read_text())
    assert md["embedding"]["model"] == "my-encoder" and loaded == [("my-encoder", "cpu")]
    assert md["embedding"]["prefix"] == "query: " and md["embedding"]["prompt"] == "Represent: "
    assert md["embedding"]["normalize"] is False and md["text"]["template"] == "{question}"
    assert md["kmeans"]["seed"] == 7 and md["kmeans"]["n_init"] == 2
    assert md["kmeans"]["algorithm"] == "kmeans" and md["k_selection"]["k_max"] == 4
    assert md["k_selection"]["ks"] == [1, 2, 3, 4]
    assert len(matrices) == 1 and matrices[0] is not None  # 30 rows > memmap_rows: on disk
    assert not matrices[0].exists()  # the memory-mapped matrix is removed afterwards
    assert swept == [20]  # the elbow sweep ran on elbow_sample rows
    questions = {r["instruction"] for r in sample_rows(30)}
    encoded = [t for texts, _, _ in _Model.calls for t in texts]
    assert sorted(encoded) == sorted("query: " + q for q in questions)  # prefix + template
    assert {b for _, b, _ in _Model.calls} == {5} and {p for _, _, p in _Model.calls} == {
        "Represent: "}
    distinct = len(questions)
    shards = list((tmp_path / "cache").rglob("shard-*.npz"))
    assert len(shards) == -(-distinct // 10)  # cache_shard_rows rows per shard
    assert not (tmp_path / "art" / "report.md").exists()  # --no-report
    # tsne_sample: how many rows the (reportless here) t-SNE plot draws, checked by value in
    # test_tsne_sample_limits_the_points_plotted.
    rows = [json.loads(x) for x in (tmp_path / "art" / "assignments.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 30
    centroids = np.load(tmp_path / "art" / "centroids.npy")
    assert not np.allclose(np.linalg.norm(centroids, axis=1), 1.0)  # not normalised


def test_tsne_sample_limits_the_points_plotted(tmp_path, monkeypatch):
    import sklearn.manifold

    from moce_plugin.clustering import report

    seen: list[int] = []

    class FakeTSNE:
        def __init__(self, **_):
            pass

        def fit_transform(self, xs):
            seen.append(len(xs))
            return np.asarray(xs)[:, :2]

    monkeypatch.setattr(sklearn.manifold, "TSNE", FakeTSNE)
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    report.plot_cluster_map(x, np.arange(40) % 3, tmp_path / "map.png", 12, 0)
    assert seen == [12] and (tmp_path / "map.png").is_file()
