"""Same cluster everywhere: a training row's own prompt, sent through the inference path as a
plain prompt, as chat messages, as a formatted prompt or as the row, gets the cluster the
training lookup gave that row, for every supported dataset shape."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from axolotl.utils.dict import DictDefault
from axolotl_helpers import sample_rows, write_cluster_jsonl
from fake_encoder import BagEncoder

from moce_plugin.clustering import (
    ClusterArtifactError,
    ClusteringError,
    ClusteringOptions,
    ClusterModel,
    load_yaml_datasets,
    request_text,
    rows_from_yaml,
    run_clustering,
    unformat_prompt,
)
from moce_plugin.integration.datasets import attach_cluster_column
from moce_plugin.model.config import MoCEConfig
from moce_plugin.outputs.load import MoCEInferenceModel

N_ROWS = 90


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    from axolotl.prompters import AlpacaPrompter

    return next(iter(AlpacaPrompter().build_prompt(instruction, input_text or None)))


def chatml(messages: list[dict]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def plain(r: dict) -> str:
    """What a user types for a sample row: the instruction, then the input if any."""
    return (r["instruction"] + "\n" + r["input"]).strip()


def user_turn(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": text}]


# Each format: how a training row is written, its axolotl dataset entry, the text template,
# and the inference requests that are the same request as that row.
RequestMaker = Callable[[dict, dict], list]


def _alpaca(r: dict) -> dict:
    return {k: r[k] for k in ("instruction", "input", "output")}


def _chat(r: dict) -> dict:
    return {"messages": [{"role": "user", "content": plain(r)},
                         {"role": "assistant", "content": r["output"]}]}


def _sharegpt(r: dict) -> dict:
    return {"conversations": [{"from": "human", "value": plain(r)},
                              {"from": "gpt", "value": r["output"]}]}


def _custom_roles(r: dict) -> dict:
    return {"dialog": [{"speaker": "customer", "text": plain(r)},
                       {"speaker": "agent", "text": r["output"]}]}


CUSTOM_ROLES = {"type": "chat_template", "field_messages": "dialog",
                "message_property_mappings": {"role": "speaker", "content": "text"},
                "roles": {"user": ["customer"], "assistant": ["agent"]}}


def _completion(r: dict) -> dict:
    return {"text": r["instruction"] + "\n" + r["output"]}


def _qa(r: dict) -> dict:
    return {"question": plain(r), "answer": r["output"]}


USER_DEFINED = {"field_instruction": "question", "field_output": "answer",
                "format": "{instruction}\n", "no_input_format": "{instruction}\n"}

# Preference rows (rl: dpo / ipo; KTO's prompt + completion): the prompt is the request,
# chosen and rejected never are.
def _dpo_question(r: dict) -> dict:
    return {"system": "You are helpful.", "question": plain(r), "chosen": r["output"],
            "rejected": r["output"][::-1]}


def _dpo_prompt(r: dict) -> dict:
    return {"prompt": plain(r), "chosen": r["output"], "rejected": r["output"][::-1]}


def _dpo_conversational(r: dict) -> dict:
    return {"prompt": user_turn(plain(r)),
            "chosen": [{"role": "assistant", "content": r["output"]}],
            "rejected": [{"role": "assistant", "content": r["output"][::-1]}]}


def _dpo_implicit(r: dict) -> dict:
    return {turn: [{"role": "user", "content": plain(r)},
                   {"role": "assistant", "content": answer}]
            for turn, answer in (("chosen", r["output"]), ("rejected", r["output"][::-1]))}


def _dpo_chat_template(r: dict) -> dict:
    return {"messages": user_turn(plain(r)),
            "chosen": {"role": "assistant", "content": r["output"]},
            "rejected": {"role": "assistant", "content": r["output"][::-1]}}


def _kto(r: dict) -> dict:
    return {"prompt": plain(r), "completion": r["output"], "label": True}


def axolotl_dpo_prompt(kind: str, row: dict) -> str:
    """The prompt axolotl's preference transform writes for a row (what TRL then tokenizes)."""
    from axolotl.prompt_strategies.dpo import load

    return load(kind, DictDefault({}))(dict(row))["prompt"]


FORMATS: dict[str, tuple[Callable[[dict], dict], dict, str, RequestMaker]] = {
    "dpo_chatml_intel": (_dpo_question, {"type": "chatml.intel"}, "auto", lambda row, r: [
        row, plain(r), user_turn(plain(r)), axolotl_dpo_prompt("chatml.intel", row)]),
    "dpo_llama3_prompt": (_dpo_prompt, {"type": "llama3.prompt_pairs"}, "auto",
                          lambda row, r: [row, plain(r), user_turn(plain(r)),
                                          axolotl_dpo_prompt("llama3.prompt_pairs", row)]),
    "dpo_conversational": (_dpo_conversational, {}, "auto", lambda row, r: [
        row, row["prompt"], plain(r), chatml(row["prompt"])]),
    "dpo_implicit_prompt": (_dpo_implicit, {"type": "chatml.argilla_chat"}, "auto",
                            lambda row, r: [row, plain(r), row["chosen"][:1],
                                            axolotl_dpo_prompt("chatml.argilla_chat", row)]),
    "dpo_chat_template": (_dpo_chat_template, {"type": "chat_template.default"}, "auto",
                          lambda row, r: [row, row["messages"], plain(r)]),
    "kto_prompt": (_kto, {}, "auto", lambda row, r: [row, plain(r), user_turn(plain(r))]),

    "alpaca": (_alpaca, {"type": "alpaca"}, "auto", lambda row, r: [
        row, plain(r), alpaca_prompt(r["instruction"], r["input"]), user_turn(plain(r)),
        chatml(user_turn(plain(r)))]),
    "chat_messages": (_chat, {"type": "chat_template", "field_messages": "messages"}, "auto",
                      lambda row, r: [row, row["messages"], row["messages"][:1], plain(r),
                                      chatml(row["messages"][:1])]),
    "chat_conversations": (
        _sharegpt,
        {"type": "chat_template", "field_messages": "conversations",
         "message_property_mappings": {"role": "from", "content": "value"}},
        "auto", lambda row, r: [row, row["conversations"], plain(r), user_turn(plain(r))]),
    # Issue 25 case 8: the dataset's own roles, field and property names pick the user turns.
    "chat_custom_roles": (_custom_roles, CUSTOM_ROLES, "auto", lambda row, r: [
        plain(r), user_turn(plain(r)), chatml(user_turn(plain(r)))]),
    "completion": (_completion, {"type": "completion"}, "auto",
                   lambda row, r: [row, row["text"]]),
    "user_defined_auto": (_qa, {"type": USER_DEFINED}, "auto",
                          lambda row, r: [row, plain(r), user_turn(plain(r))]),
    # Issue 17 case 2: every plain prompt used to get the empty text and cluster 0.
    "user_defined_template": (_qa, {"type": USER_DEFINED}, "{question}", lambda row, r: [
        row, plain(r), user_turn(plain(r)), alpaca_prompt(plain(r))]),
    "template_with_literal_text": (_qa, {"type": USER_DEFINED}, "Question: {question}",
                                   lambda row, r: [row, plain(r), user_turn(plain(r))]),
}


def cluster_format(tmp_path: Path, name: str, template: str, make_row, entry: dict,
                   encoder=None, rows: list[dict] | None = None):
    """Write the training file, cluster it as preprocessing does, look the rows up as
    training does; returns (artifact, raw training rows, training ids)."""
    rows = rows if rows is not None else sample_rows(N_ROWS)
    data = tmp_path / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(make_row(r)) for r in rows))
    cfg = {"datasets": [{"path": str(data), "ds_type": "json", **entry}]}
    options = ClusteringOptions(text_template=template, cache_dir=str(tmp_path / "cache"),
                                report=False)
    model = run_clustering(rows_from_yaml(cfg, template), tmp_path / f"art-{name}", 3, options,
                           encoder if encoder is not None else BagEncoder(), progress=False,
                           log=lambda _m: None)
    (ds_name, dataset), = load_yaml_datasets(cfg)
    # The training lookup (the plugin's step 1), as the plugin calls it.
    moce_cfg = DictDefault({"moce": {"cluster_artifact": str(model.path),
                                     "clustering": {"text_template": template}}})
    with_ids = attach_cluster_column(dataset, DictDefault(cfg["datasets"][0]), moce_cfg)
    train_ids = list(with_ids["cluster_id"])
    return model, [dict(r) for r in dataset], train_ids


def inference_model(model: ClusterModel) -> MoCEInferenceModel:
    config = MoCEConfig(num_clusters=model.num_clusters, cluster_artifact=str(model.path))
    return MoCEInferenceModel(model=None, tokenizer=None, config=config, cluster_model=model)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_training_rows_own_prompts_get_their_training_cluster(tmp_path, fmt):
    make_row, entry, template, requests_of = FORMATS[fmt]
    model, rows, train_ids = cluster_format(tmp_path, fmt, template, make_row, entry)
    assert len(set(train_ids)) == 3, "a degenerate clustering would prove nothing"
    model.use_encoder(BagEncoder())
    moce = inference_model(model)
    originals = sample_rows(N_ROWS)
    per_kind = list(zip(*(requests_of(row, r) for row, r in zip(rows, originals))))
    for kind, requests in enumerate(per_kind):
        got = moce.assign_clusters(list(requests))
        agree = sum(g == t for g, t in zip(got, train_ids))
        assert agree == len(rows), (
            f"{fmt}, request kind {kind} ({type(requests[0]).__name__}): {agree}/{len(rows)} "
            f"agree; e.g. {requests[0]!r:.120}")
    # The artifact's own entry point agrees too (serving code calls it directly).
    assert model.assign_requests(per_kind[1]).tolist() == train_ids


def test_multi_field_template_refuses_a_plain_prompt(tmp_path):
    """A template a plain prompt cannot fill is an error naming the fields, never an empty
    or half-filled text; rows with the fields still agree."""
    template = "{instruction}\n{input}"
    model, rows, train_ids = cluster_format(tmp_path, "multi", template, _alpaca,
                                            {"type": "alpaca"})
    model.use_encoder(BagEncoder())
    moce = inference_model(model)
    assert moce.assign_clusters(rows) == train_ids
    with pytest.raises(ClusterArtifactError, match=r"request 0: .*\['instruction', 'input'\]"):
        moce.assign_clusters([plain(sample_rows(1)[0])])
    with pytest.raises(ClusterArtifactError, match=r"request 0: .*fills only one"):
        moce.assign_clusters([user_turn("hello")])


def test_empty_request_text_is_an_error_not_cluster_0(tmp_path):
    model, _, _ = cluster_format(tmp_path, "tpl", "{question}", _qa,
                                 {"type": USER_DEFINED})
    model.use_encoder(BagEncoder())
    with pytest.raises(ClusterArtifactError, match=r"request 1 has an empty request text"):
        # a row in another format than training's: the template finds no `question`
        model.assign_requests(["fine", {"instruction": "Sort a list", "input": ""}])
    with pytest.raises(ClusterArtifactError, match="request 0 has an empty request text"):
        model.assign_requests([""])


def test_request_text_rules():
    row = {"instruction": "Sort it", "input": "[3, 1]", "output": "[1, 3]"}
    assert request_text(row) == "Sort it\n[3, 1]"
    assert request_text("  Sort it\n[3, 1] ") == request_text(row)
    assert request_text(alpaca_prompt("Sort it", "[3, 1]")) == request_text(row)
    assert request_text(alpaca_prompt("Sort it", "[3, 1]") + "[1, 3]") == request_text(row)
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert request_text(chat) == request_text({"messages": chat}) == "a\nc"
    assert request_text(chatml(chat)) == "a\nc"
    multimodal = [{"role": "user", "content": [{"type": "text", "text": "look"}]}]
    assert request_text(multimodal) == "look"
    assert request_text("q?", "Q: {question}") == request_text({"question": "q?"}, "Q: {question}")
    assert request_text({"question": "q?"}, "{question} {missing}") == "q?"  # training rule
    # text that only mentions a frame is left alone
    assert unformat_prompt("Explain ### Instruction: headers") == "Explain ### Instruction: headers"
    with pytest.raises(ClusteringError, match="positional field"):
        ClusteringOptions(text_template="{} and {0}").validate()


def test_alpaca_frame_matches_axolotl():
    from axolotl.prompters import AlpacaPrompter

    from moce_plugin.clustering.text import ALPACA_SYSTEM_PROMPTS

    prompter = AlpacaPrompter()
    assert ALPACA_SYSTEM_PROMPTS == (prompter.system_prompt, prompter.system_no_input_prompt)


def test_lm_eval_chat_contexts_are_clustered_by_their_turns(model_dir):
    """lm-eval renders a chat context with the tokenizer's template (not ChatML here); the
    rendered string is clustered as the chat turns, i.e. like the chat training row."""
    from transformers import AutoTokenizer

    from moce_plugin.outputs.lm_eval import MoCELM

    class Recorder:
        def __init__(self) -> None:
            self.requests: list = []

        def assign_clusters(self, requests):
            self.requests += requests
            return [0] * len(requests)

    lm = MoCELM.__new__(MoCELM)  # only the chat-template mapping is under test
    lm.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lm.chat_template_args = {}
    lm.forced_cluster, lm._chats, lm.moce = None, {}, Recorder()
    history = user_turn("Write a haiku about rain")
    rendered = lm.apply_chat_template(history)
    assert rendered.startswith("<s>system")  # the tiny template, which text.py cannot parse
    lm._clusters_of([rendered, "a plain context"])
    assert [request_text(r) for r in lm.moce.requests] == [
        "Write a haiku about rain", "a plain context"]


@pytest.mark.slow
def test_bundled_sample_with_minilm_agrees_everywhere(tmp_path):
    """The real bundled encoder on the whole bundled sample: 100% agreement between the
    training lookup and inference (plain prompt, alpaca-formatted prompt, chat messages)."""
    rows = sample_rows()
    model, raw, train_ids = cluster_format(
        tmp_path, "sample", "auto", _alpaca, {"type": "alpaca"},
        encoder=_minilm(), rows=rows)
    assert len(raw) == 600 and len(set(train_ids)) == 3
    # Each row sent in one of the three forms (every form on 200 rows): one embedding pass.
    forms = (plain, lambda r: alpaca_prompt(r["instruction"], r["input"]),
             lambda r: user_turn(plain(r)))
    requests = [forms[i % 3](r) for i, r in enumerate(rows)]
    got = inference_model(model).assign_clusters(requests)
    wrong = [i for i, (g, t) in enumerate(zip(got, train_ids)) if g != t]
    assert not wrong, f"{len(wrong)}/600 disagree, e.g. row {wrong[:5]}"


def _minilm():
    from moce_plugin.clustering import DEFAULT_ENCODER, SentenceTransformerEncoder

    return SentenceTransformerEncoder(DEFAULT_ENCODER, "", None, 64, "cpu")


def test_chat_training_file_of_the_helpers_agrees(tmp_path):
    """The chat rows tests/axolotl_helpers writes (what the e2e tests train on)."""
    data = write_cluster_jsonl(tmp_path / "chat.jsonl", limit=N_ROWS, fmt="chat")
    cfg = {"datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template"}]}
    options = ClusteringOptions(cache_dir=str(tmp_path / "cache"), report=False)
    model = run_clustering(rows_from_yaml(cfg, "auto"), tmp_path / "art", 3, options,
                           BagEncoder(), progress=False, log=lambda _m: None)
    (name, dataset), = load_yaml_datasets(cfg)
    train_ids = model.lookup(dataset, name)
    model.use_encoder(BagEncoder())
    prompts = [row["messages"][0]["content"] for row in dataset]
    assert inference_model(model).assign_clusters(prompts) == train_ids


def test_usage_reads_every_training_format_like_training(model_dir):
    """moce-usage: the text the model reads per format, and the cluster of a row is the row's
    own (training) cluster, for every format (no alpaca-only re-implementation)."""
    from transformers import AutoTokenizer

    from moce_plugin.outputs.usage import model_text

    r = sample_rows(5)[4]
    tok = AutoTokenizer.from_pretrained(model_dir)
    moce = MoCEInferenceModel(model=None, tokenizer=tok, config=MoCEConfig(num_clusters=3),
                              prompt_format="alpaca")
    with_input = {"instruction": "Sort it", "input": "[3, 1]", "output": "[1, 3]"}
    assert model_text(moce, with_input) == alpaca_prompt("Sort it", "[3, 1]") + "[1, 3]"
    chat = _chat(r)
    assert model_text(moce, chat) == tok.apply_chat_template(chat["messages"], tokenize=False)
    assert model_text(moce, _sharegpt(r)) == model_text(moce, chat)
    assert model_text(moce, _completion(r)) == _completion(r)["text"]
    qa = _qa(r)
    assert model_text(moce, qa) == alpaca_prompt(qa["question"]) + qa["answer"]


def test_usage_clusters_rows_as_training_did(tmp_path):
    from moce_plugin.outputs import usage

    model, rows, train_ids = cluster_format(tmp_path, "tpl", "{question}", _qa,
                                            {"type": USER_DEFINED})
    model.use_encoder(BagEncoder())
    seen = []

    class Stop(Exception):
        pass

    moce = inference_model(model)
    moce.tokenizer = type("Tok", (), {"chat_template": None})()
    original = moce.assign_clusters

    def spy(requests):
        seen.extend(original(requests))
        raise Stop  # the model run is not under test here

    moce.assign_clusters = spy
    with pytest.raises(Stop):
        usage.measure_usage(moce, rows)
    assert seen == train_ids


@pytest.mark.parametrize("fmt", ["dpo_chatml_intel", "dpo_implicit_prompt", "kto_prompt"])
def test_stage1_reads_a_preference_config_by_its_prompts(tmp_path, fmt):
    """What stage 1 (preprocess/cluster.py on a DPO/KTO YAML) embeds is each row's prompt,
    never its chosen, rejected or completion text."""
    make_row, entry, _, _ = FORMATS[fmt]
    rows = sample_rows(12)
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(make_row(r)) for r in rows))
    cfg = {"rl": fmt.split("_")[0], "datasets": [{"path": str(data), "ds_type": "json",
                                                   **entry}]}
    texts = [row.text for row in rows_from_yaml(cfg, "auto")]
    assert texts == [plain(r) for r in rows]
