"""Every command-line option's effect, checked by value (not only the error exits): the output
of each command with the option equals what the Python API gives for the same setting."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from axolotl_helpers import SOURCE_TO_CLUSTER, sample_rows
from fake_encoder import BagEncoder
from safetensors import safe_open
from test_clustering import FakeEncoder
from test_inference import _full_output, _lora_output, base_dir
from test_stale_state import _output_with_artifact

import moce_plugin.clustering.encode as encode
from moce_plugin.clustering import ClusterModel
from moce_plugin.clustering import cli as cluster_cli
from moce_plugin.clustering.options import ClusteringOptions
from moce_plugin.outputs import generate as generate_mod
from moce_plugin.outputs import usage as usage_mod
from moce_plugin.outputs.export import main as export_main
from moce_plugin.outputs.generate import main as generate_main
from moce_plugin.outputs.load import MoCEInferenceModel, MoCELoadError, load_moce_model
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


def test_generate_chat_format_renders_the_tokenizers_chat_template(out, base_dir, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    moce = load_moce_model(out, prompt_format="chat")
    assert moce.format_prompt(PROMPTS[1]) == f"<user>{PROMPTS[1]}\n<assistant>"
    want = moce.generate([PROMPTS[1]], cluster=0, max_new_tokens=5)[0]
    assert want != load_moce_model(out, prompt_format="raw").generate(
        [PROMPTS[1]], cluster=0, max_new_tokens=5)[0]  # the format changes the text
    assert generate_main([str(out), "--prompt", PROMPTS[1], "--cluster", "0", "--no-stream",
                          "--max-new-tokens", "5", "--prompt-format", "chat"]) == 0
    assert capsys.readouterr().out == f"[cluster 0] {want}\n"


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


# Prompts the fake encoder puts in three different clusters (its first word is the topic).
TOPIC_PROMPTS = ["math task number 0", "code task number 1", "chat task number 2"]


@pytest.fixture
def clustered_out(tmp_path, base_dir, monkeypatch) -> tuple[Path, Path]:
    """A full output trained with an artifact (and its copy); prompts are embedded by the
    fake encoder the artifact was built with."""
    monkeypatch.setattr(ClusterModel, "_get_encoder", lambda self: FakeEncoder())
    return _output_with_artifact(tmp_path, base_dir)


def _api_lines(moce: MoCEInferenceModel, prompts: list[str], tokens: int) -> str:
    clusters = moce.assign_clusters(prompts)
    assert len(set(clusters)) == len(prompts), "prompts in one cluster would prove nothing"
    return "".join(f"[cluster {c}] {moce.generate([p], cluster=c, max_new_tokens=tokens)[0]}\n"
                   for p, c in zip(prompts, clusters))


def test_generate_interactive_reads_stdin_up_to_an_empty_line(clustered_out, capsys,
                                                               monkeypatch):
    out, _ = clustered_out
    want = _api_lines(load_moce_model(out), TOPIC_PROMPTS[:2], 4)
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        f"{TOPIC_PROMPTS[0]}\n{TOPIC_PROMPTS[1]}\n\n{TOPIC_PROMPTS[2]}\n"))
    assert generate_main([str(out), "--interactive", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out == want  # each line its own cluster; nothing after the empty line
    assert "Enter a prompt" in captured.err


def test_generate_cluster_artifact_flag_is_the_artifact_used(clustered_out, tmp_path, capsys):
    """Without the output's own copy and with the training path gone, only the flag's
    artifact can assign the prompts."""
    out, art = clustered_out
    shutil.rmtree(out / "cluster_artifact")
    moved = tmp_path / "moved"
    art.rename(moved)
    with pytest.raises(SystemExit):
        generate_main([str(out), "--prompt", TOPIC_PROMPTS[0]])
    assert "cluster_artifact" in capsys.readouterr().err
    moce = load_moce_model(out, cluster_artifact=str(moved))
    assert moce.cluster_model.path == moved
    want = _api_lines(moce, TOPIC_PROMPTS, 3)
    for prompt in TOPIC_PROMPTS:
        assert generate_main([str(out), "--prompt", prompt, "--cluster-artifact", str(moved),
                              "--max-new-tokens", "3", "--no-stream"]) == 0
    assert capsys.readouterr().out == want
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TOPIC_PROMPTS))
    assert generate_main([str(out), "--prompts-file", str(prompts), "--cluster-artifact",
                          str(moved), "--max-new-tokens", "3"]) == 0
    got = capsys.readouterr().out
    for line in want.splitlines():
        cluster, text = line.split("] ", 1)
        assert f"### {cluster}] " in got and f"\n{text}\n" in got


# ---- options every loading command shares ----------------------------------------------------
@pytest.fixture
def lora_without_its_base(tmp_path, base_dir) -> Path:
    """A LoRA output whose recorded base no longer exists (base_dir holds the same weights)."""
    gone = tmp_path / "gone_base"
    shutil.copytree(base_dir, gone)
    _lora_output(gone, tmp_path / "lora")
    shutil.rmtree(gone)
    return tmp_path / "lora"


def test_base_model_flag_is_the_base_each_command_loads(lora_without_its_base, base_dir,
                                                        tmp_path, capsys, monkeypatch):
    run = lora_without_its_base
    with pytest.raises(MoCELoadError, match="--base-model"):
        load_moce_model(run)
    moce = load_moce_model(run, base_model=str(base_dir))
    text = moce.generate([PROMPTS[0]], cluster=1, max_new_tokens=4)[0]
    assert generate_main([str(run), "--prompt", PROMPTS[0], "--cluster", "1", "--no-stream",
                          "--max-new-tokens", "4", "--base-model", str(base_dir)]) == 0
    assert capsys.readouterr().out == f"[cluster 1] {text}\n"
    assert export_main([str(run), str(tmp_path / "exp"), "--base-model", str(base_dir)]) == 0
    exported = load_moce_model(tmp_path / "exp")
    assert exported.generate([PROMPTS[0]], cluster=1, max_new_tokens=4)[0] == text
    data = tmp_path / "rows.jsonl"
    rows = [{"instruction": p, "output": "5", "cluster_id": i} for i, p in enumerate(PROMPTS)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    usage_main([str(run), "--data", str(data), "--out", str(tmp_path / "u"),
                "--base-model", str(base_dir)])
    want = json.loads(json.dumps(usage_mod.measure_usage(moce, rows, 8, 512)))
    assert json.loads((tmp_path / "u.json").read_text()) == want


@pytest.mark.parametrize("command", ["generate", "usage"])
def test_device_flag_reaches_the_loader(out, tmp_path, command, monkeypatch):
    seen: list = []
    module = generate_mod if command == "generate" else usage_mod

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return load_moce_model(*args, **kwargs)

    monkeypatch.setattr(module, "load_moce_model", spy)
    if command == "generate":
        generate_main([str(out), "--prompt", "hi", "--cluster", "0", "--max-new-tokens", "1",
                       "--device", "cpu"])
    else:
        data = tmp_path / "rows.jsonl"
        data.write_text(json.dumps({"instruction": "hi", "output": "x", "cluster_id": 0}))
        usage_main([str(out), "--data", str(data), "--out", str(tmp_path / "u"),
                    "--device", "cpu"])
    assert seen == ["cpu"]


# ---- lm-eval's --model_args ------------------------------------------------------------------
def test_lm_eval_model_args_cluster_and_base_model_by_value(lora_without_its_base, base_dir):
    """`--model_args path=...,cluster=2,base_model=...` as lm-eval's CLI parses it: every
    request scored under cluster 2, on the named base."""
    from lm_eval.api.instance import Instance

    from moce_plugin.lm_eval_model import MoCELM

    run = lora_without_its_base
    lm = MoCELM.create_from_arg_string(
        f"path={run},cluster=2,base_model={base_dir},batch_size=2", {"device": "cpu"})
    assert lm._clusters_of(["a", "bb", "ccc"]) == [2, 2, 2]
    ctx, cont = lm._encode_pair("Add 2 and 3.", " 5")
    (loglik, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("Add 2 and 3.", " 5"), 0)])
    logp = torch.log_softmax(lm.moce.logits(torch.tensor([ctx + cont])[:, :-1],
                                            torch.tensor([2]))[0], -1)
    assert loglik == pytest.approx(sum(float(logp[len(ctx) - 1 + j, t])
                                       for j, t in enumerate(cont)), abs=1e-4)
    other = lm.moce.logits(torch.tensor([ctx + cont])[:, :-1], torch.tensor([0]))[0]
    assert not torch.allclose(torch.log_softmax(other, -1), logp)  # the cluster matters


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
