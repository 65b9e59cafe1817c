"""Reloading, generating and exporting trained MoCE models."""

from __future__ import annotations

import pytest
import torch
from axolotl_helpers import sample_rows
from peft import LoraConfig, get_peft_model
from tiny_models import save_tiny_model_dir
from transformers import AutoModelForCausalLM

from moce_plugin.clustering.text import request_text
from moce_plugin.errors import InvalidClusterIdsError
from moce_plugin.export import export_model
from moce_plugin.generate import main as generate_main
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.upcycle import upcycle_model
from moce_plugin.outputs.folder import base_config_summary, save_moce_files
from moce_plugin.outputs.load import MoCELoadError, load_moce_model

CFG = MoCEConfig(num_clusters=3, experts_per_group=2, top_k=1, num_general_experts=1,
                 adapter_dim=8)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    texts = [t for r in sample_rows(200) for t in (r["instruction"], r["output"])]
    return save_tiny_model_dir(path, texts)


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _meta(base_dir, model):
    return {"base_model": str(base_dir), "base_config": base_config_summary(model.config),
            "prompt_format": "alpaca"}


def _logits(model, ids, clusters):
    with torch.no_grad():
        return model(input_ids=ids, moce_cluster_ids=clusters).logits


IDS = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(1))
CLUSTERS = torch.tensor([0, 2])


def _full_output(base_dir, out):
    model = upcycle_model(AutoModelForCausalLM.from_pretrained(base_dir), CFG)
    _perturb(model)
    model.save_pretrained(out)
    save_moce_files(model, CFG, out, _meta(base_dir, model))
    return model


def _lora_output(base_dir, out):
    model = upcycle_model(AutoModelForCausalLM.from_pretrained(base_dir), CFG)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "gate_proj"], modules_to_save=["moce_experts"]))
    _perturb(peft_model, seed=1)
    peft_model.save_pretrained(out)
    save_moce_files(peft_model, CFG, out, _meta(base_dir, model))
    return peft_model


def test_full_output_reloads_with_identical_logits(tmp_path, base_dir):
    trained = _full_output(base_dir, tmp_path / "out")
    moce = load_moce_model(tmp_path / "out", prompt_format="raw")
    assert torch.equal(_logits(moce.model, IDS, CLUSTERS), _logits(trained, IDS, CLUSTERS))


def test_lora_output_reloads_merges_and_exports(tmp_path, base_dir):
    trained = _lora_output(base_dir, tmp_path / "out")
    expected = _logits(trained, IDS, CLUSTERS)
    moce = load_moce_model(tmp_path / "out")
    assert torch.equal(_logits(moce.model, IDS, CLUSTERS), expected)
    merged = load_moce_model(tmp_path / "out", merge_lora=True)
    torch.testing.assert_close(_logits(merged.model, IDS, CLUSTERS), expected,
                               atol=1e-5, rtol=1e-5)
    export_model(tmp_path / "out", tmp_path / "exported")
    assert (tmp_path / "exported" / "README.md").is_file()
    again = load_moce_model(tmp_path / "exported")
    torch.testing.assert_close(_logits(again.model, IDS, CLUSTERS), expected, atol=1e-5,
                               rtol=1e-5)


def test_generate_mixed_clusters_matches_single_prompt_runs(tmp_path, base_dir):
    _full_output(base_dir, tmp_path / "out")
    moce = load_moce_model(tmp_path / "out")
    prompts = ["Write a python function", "What is 3 plus 4?"]
    both = moce.generate(prompts, cluster=[1, 2], max_new_tokens=6)
    alone = [moce.generate([p], cluster=c, max_new_tokens=6)[0]
             for p, c in zip(prompts, [1, 2])]
    assert both == alone
    streamed = "".join(moce.stream(prompts[0], cluster=1, max_new_tokens=6))
    assert streamed == alone[0]
    with pytest.raises(MoCELoadError, match="--cluster ID"):
        moce.generate(prompts)  # no artifact: clusters can't be assigned from text
    with pytest.raises(InvalidClusterIdsError, match=r"in \[0, 3\)"):
        moce.generate(prompts, cluster=[0, 5])


def test_cli_generates(tmp_path, base_dir, capsys):
    _full_output(base_dir, tmp_path / "out")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Add two numbers\nName a colour\n")
    generate_main([str(tmp_path / "out"), "--prompts-file", str(prompts), "--cluster", "1",
                   "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    # What the CLI prints is what the API generates, for the forced cluster.
    moce = load_moce_model(tmp_path / "out")
    expected = moce.generate(["Add two numbers", "Name a colour"], cluster=1, max_new_tokens=4)
    for prompt, text in zip(["Add two numbers", "Name a colour"], expected):
        assert f"### [cluster 1] {prompt}\n{text}\n" in out
    generate_main([str(tmp_path / "out"), "--prompt", "hi", "--cluster", "0",
                   "--max-new-tokens", "3", "--no-stream"])
    alone = moce.generate(["hi"], cluster=0, max_new_tokens=3)[0]
    assert capsys.readouterr().out == f"[cluster 0] {alone}\n"


def test_bad_outputs_are_explained(tmp_path, base_dir):
    with pytest.raises(MoCELoadError, match="not the output of a MoCE training"):
        load_moce_model(base_dir)
    _full_output(base_dir, tmp_path / "out")
    other = save_tiny_model_dir(tmp_path / "other", ["a b c d e f g"] * 20)
    with pytest.raises(MoCELoadError, match="base model differs"):
        load_moce_model(tmp_path / "out", base_model=str(other))


class _FakeClusterModel:
    """Assigns by text length, and records what it was asked (the request contexts)."""

    def __init__(self):
        self.seen: list[str] = []

    template = "auto"

    def assign_requests(self, requests):
        texts = [request_text(r) for r in requests]
        self.seen += texts
        return [len(t) % 3 for t in texts]


def test_lm_eval_model_scores_local_tasks_per_cluster(tmp_path, base_dir, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from moce_plugin.lm_eval_model import MoCELM

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    _full_output(base_dir, tmp_path / "out")
    moce = load_moce_model(tmp_path / "out")
    fake = _FakeClusterModel()
    moce.cluster_model = fake
    lm = MoCELM(moce=moce, device="cpu", batch_size=2)
    calls = []
    original = moce.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs["moce_cluster_ids"].tolist())
        return original(*args, **kwargs)

    monkeypatch.setattr(moce.model, "forward", spy)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["moce_tiny_mc", "moce_tiny_gen"], log_samples=True,
        task_manager=TaskManager(include_path=str(root / "tests/data/lm_eval_tasks")),
    )
    assert any("spider" in t for t in fake.seen)  # contexts, not answers, were clustered
    assert all(len(set(c)) == 1 for c in calls)  # each batch is one cluster
    assert {c[0] for c in calls} == {len(t) % 3 for t in fake.seen}
    # Each choice's log-likelihood is the model's under the context's own cluster (recomputed
    # here in one full forward), and the metrics are those of the samples.
    mc = results["samples"]["moce_tiny_mc"]
    assert len(mc) == 4
    for sample in mc:
        doc = sample["doc"]
        cluster = torch.tensor([len(request_text(doc["question"])) % 3])
        for choice, (loglik, _) in zip(doc["choices"], sample["filtered_resps"]):
            ctx, cont = lm._encode_pair(doc["question"], " " + choice)
            logp = torch.log_softmax(moce.logits(torch.tensor([ctx + cont])[:, :-1], cluster)[0],
                                     -1)
            want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
            assert loglik == pytest.approx(want, abs=1e-4)
    acc = sum(max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0])
              == s["doc"]["answer"] for s in mc) / len(mc)
    assert results["results"]["moce_tiny_mc"]["acc,none"] == pytest.approx(acc)
    gen = results["samples"]["moce_tiny_gen"]
    exact = sum(s["exact_match"] for s in gen) / len(gen)
    assert results["results"]["moce_tiny_gen"]["exact_match,none"] == pytest.approx(exact)


def test_usage_command_counts_real_tokens_per_cluster(tmp_path, base_dir):
    import json

    from moce_plugin.usage import main as usage_main

    _full_output(base_dir, tmp_path / "out")
    rows = [{**{k: r[k] for k in ("instruction", "input", "output", "source")},
             "cluster_id": {"alpaca": 0, "code_alpaca": 1, "gsm8k": 2}[r["source"]]}
            for r in sample_rows(12)]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    usage_main([str(tmp_path / "out"), "--data", str(data), "--out", str(tmp_path / "u"),
                "--batch-size", "5"])
    usage = json.loads((tmp_path / "u.json").read_text())
    assert (tmp_path / "u.png").stat().st_size > 1000
    layer = usage["layers"]["0"]
    per_cluster = usage["rows_per_cluster"]
    assert per_cluster == [sum(r["cluster_id"] == c for r in rows) for c in range(3)]
    # Real tokens per cluster (padding of the 5-row batches not counted), every layer.
    from moce_plugin.outputs.usage import model_text

    moce = load_moce_model(tmp_path / "out")
    want = [0.0] * 3
    for r in rows:
        want[r["cluster_id"]] += len(moce.tokenizer(model_text(moce, r))["input_ids"])
    for name, layer in usage["layers"].items():
        assert layer["group_tokens"] == want, name
        for g, tokens in enumerate(layer["group_tokens"]):
            if tokens:
                assert abs(sum(layer["expert_load"][g]) - 1) < 1e-5
