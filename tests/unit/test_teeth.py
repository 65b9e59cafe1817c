"""Tests for one-line bugs that a weaker suite let through (logged entropy, ACMoE statistics,
template fields, the decode attention mask, the base fingerprint): each compares a value
with an independent computation, so the one-line bug makes it fail.
tests/mutate_teeth.py plants each bug and checks that these tests catch it."""

from __future__ import annotations

import pytest
import torch
from layer_helpers import D, make_experts
from test_inference import CFG, _full_output, base_dir
from test_output_safety import other_base
from transformers import AutoTokenizer

from moce_plugin.clustering.text import request_text
from moce_plugin.integration.trainer import routing_summary
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.routers import build_router
from moce_plugin.model.upcycle import RoutingMetrics
from moce_plugin.outputs.folder import output_meta, write_moce_config
from moce_plugin.outputs.hf_native import ClusterAssigner
from moce_plugin.outputs.load import MoCELoadError, load_moce_model

__all__ = ["base_dir", "other_base"]


# ---- padding is not counted in the logged router entropy ----------------------------------------
def _naive_entropy(layer, x, g, valid) -> float:
    """Mean entropy (nats) of each real token's softmax over its own group's experts."""
    E = layer.experts_per_group
    total = 0.0
    for t in torch.nonzero(valid).flatten().tolist():
        w = layer.router.weight[g[t] * E:(g[t] + 1) * E]
        p = torch.softmax(w.detach() @ x[t], -1)
        total += float(-(p * p.log()).sum())
    return total / int(valid.sum())


def test_logged_router_entropy_counts_real_tokens_only():
    layers = [make_experts(top_k=2, seed=s) for s in (0, 1)]
    gen = torch.Generator().manual_seed(3)
    g = torch.randint(0, 3, (40,), generator=gen)
    valid = torch.arange(40) < 28
    x = torch.randn(40, D, generator=gen)
    x[~valid] *= 40  # padding rows: peaked routing, far lower entropy if counted
    h = torch.randn(40, D, generator=gen)
    metrics = RoutingMetrics()
    expected, records = [], []
    for index, layer in enumerate(layers):
        layer.layer_index = index
        layer.train()
        records.append(layer(x, h, g, valid)[1])
        expected.append(_naive_entropy(layer, x, g, valid))
    metrics.update(records)  # one forward = one step
    logs, detail = routing_summary(metrics)
    for index, want in enumerate(expected):
        assert logs[f"moce/layer_{index}/router_entropy"] == pytest.approx(want, abs=1e-5)
        assert detail["layers"][str(index)]["router_entropy"] == pytest.approx(want, rel=1e-5)
    assert logs["moce/router_entropy"] == pytest.approx(sum(expected) / 2, rel=1e-5)


# ---- ACMoE statistics: moving average and eval mode ----------------------------------------------
def _naive_mad(x, clusters, valid, k):
    out = torch.zeros(k, x.shape[1])
    for c in range(k):
        rows = x[(clusters == c) & valid]
        if len(rows):
            out[c] = (rows - rows.mean(0)).abs().mean(0)
    return out


def _naive_weights(mad, eps, clamp):
    w = 1.0 / (mad + eps * mad.mean())
    w = torch.minimum(w, clamp * w.mean())
    return w / w.mean()


def test_acmoe_running_statistics_two_training_forwards_and_eval():
    """A fresh router: the first training forward sets the running dispersion to the batch's,
    the second blends momentum * running + (1 - momentum) * batch; an eval forward neither
    updates them nor uses its own batch. Settings from the config, none at their default."""
    cfg = MoCEConfig(num_clusters=2, experts_per_group=3, top_k=1, adapter_dim=4,
                     router="acmoe", acmoe_momentum=0.7, acmoe_eps=0.3, acmoe_clamp=2.5)
    router = build_router(cfg, D)
    router.reset_parameters(torch.Generator().manual_seed(0))
    k = cfg.groups * cfg.experts_per_group
    gen = torch.Generator().manual_seed(0)
    groups = torch.arange(48) % cfg.groups
    prev = (torch.arange(48) // cfg.groups) % cfg.experts_per_group
    clusters = groups * cfg.experts_per_group + prev
    valid = torch.ones(48, dtype=torch.bool)
    valid[-5:] = False
    batches = [torch.randn(48, D, generator=gen) * s for s in (1.0, 3.0, 0.2)]
    router.train()
    router(batches[0], groups, valid, prev)
    first = _naive_mad(batches[0], clusters, valid, k)
    torch.testing.assert_close(router.dispersion, first)
    router(batches[1], groups, valid, prev)
    m = cfg.acmoe_momentum
    running = m * first + (1 - m) * _naive_mad(batches[1], clusters, valid, k)
    torch.testing.assert_close(router.dispersion, running)
    assert router.seen.tolist() == [2.0] * k
    router.eval()
    logits = router(batches[2], groups, valid, prev)
    torch.testing.assert_close(router.dispersion, running)  # eval does not update
    assert router.seen.tolist() == [2.0] * k
    w = _naive_weights(running, cfg.acmoe_eps, cfg.acmoe_clamp)
    E = cfg.experts_per_group
    want = torch.stack([router.weight[groups[t] * E:(groups[t] + 1) * E]
                        @ (batches[2][t] * w[clusters[t]]) for t in range(48)])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    # An eval forward on a fresh router (nothing trained yet) routes on its batch's own
    # dispersion and records nothing.
    fresh = build_router(cfg, D)
    fresh.reset_parameters(torch.Generator().manual_seed(0))
    fresh.eval()
    logits = fresh(batches[2], groups, valid, prev)
    assert not fresh.dispersion.any() and not fresh.seen.any()
    w = _naive_weights(_naive_mad(batches[2], clusters, valid, k), cfg.acmoe_eps,
                       cfg.acmoe_clamp)
    want = torch.stack([fresh.weight[groups[t] * E:(groups[t] + 1) * E]
                        @ (batches[2][t] * w[clusters[t]]) for t in range(48)])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


# ---- a text template fills fields by the request-text rules ----------------------------------
@pytest.mark.parametrize("value, chat_content, want", [
    ("  How do I sort a list?\n", "  How do I sort a list?\n", "Q: How do I sort a list?"),
    ([{"type": "text", "text": "Describe"}, {"type": "text", "text": " this. "}],
     [{"type": "text", "text": "Describe"}, {"type": "text", "text": " this. "}],
     "Q: Describe\nthis."),
])
def test_template_row_path_agrees_with_plain_prompt_and_chat_paths(value, chat_content, want):
    template = "Q: {question}"
    row = request_text({"question": value, "answer": "not part of it"}, template)
    chat = request_text([{"role": "user", "content": chat_content}], template)
    assert row == chat == want
    if isinstance(value, str):
        assert request_text(value, template) == want


# ---- the HF-native model reads each row without its padding ----------------------------------
class _Recorder:
    template = "auto"

    def __init__(self) -> None:
        self.requests: list = []

    def assign_requests(self, requests):
        self.requests.extend(requests)
        return [0] * len(requests)


def test_left_padded_batch_with_a_normal_pad_token_decodes_each_prompt_alone(base_dir):
    """Padding with an ordinary vocabulary token (a tokenizer whose pad is a word, or pad =
    unk/eos text that decoding keeps): the attention mask alone says what to skip."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    word = next(t for t in tok.get_vocab() if t.isalpha() and len(t) > 3)
    pad_id = tok.convert_tokens_to_ids(word)
    assert pad_id not in tok.all_special_ids
    prompts = ["Give three tips for staying healthy.", "Add 2 and 3."]
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    assert (mask == 0).any()
    recorder = _Recorder()
    assigner = ClusterAssigner(None, 3, False, tokenizer=tok, cluster_model=recorder)
    assigner.assign(input_ids, mask)
    alone = [assigner.requests_of(torch.tensor([r]), None)[0] for r in rows]
    assert recorder.requests == alone
    assert word not in recorder.requests[1]


# ---- a full output loaded with another base_model is fingerprinted ------------------------------
def test_full_output_with_base_model_checks_the_base_fingerprint(tmp_path, base_dir, other_base):
    out = tmp_path / "out"
    model = _full_output(base_dir, out)
    meta = output_meta({"base_model": str(base_dir), "datasets": []}, model)
    write_moce_config(out, CFG, meta)  # what training records: the base fingerprint too
    with pytest.raises(MoCELoadError, match="same shape .* but other weights"):
        load_moce_model(out, base_model=str(other_base))
    load_moce_model(out, base_model=str(other_base), allow_different_base=True)
    load_moce_model(out, base_model=str(base_dir))  # the training's base passes


# ---- every generation path equals a full recomputation ------------------------------------
def _greedy_by_recomputation(model, prompt, ids_for, steps):
    """Greedy decoding by full forwards without a cache; ``ids_for(seq)`` gives the cluster
    ids of the whole current sequence. Returns (sequence, per-step last-position logits)."""
    seq, logits = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=seq, moce_cluster_ids=ids_for(seq),
                         use_cache=False).logits[:, -1]
            logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq, logits


@pytest.mark.parametrize("kind", ["per_sequence", "per_token"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_cached_generation_equals_full_recomputation(kind, model_type):
    """Greedy generate with the KV cache, per-sequence ids [B] or per-token ids [B, S] (the
    prompt's; new tokens take the row's last id), against a full forward each step: the same
    tokens and the same scores at every step."""
    from test_model import _trained_tiny

    model = _trained_tiny(model_type).eval()
    prompt = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(6))
    if kind == "per_sequence":
        ids = torch.tensor([0, 2, 1])

        def ids_for(seq):
            return ids
    else:  # clusters change inside a row (as in a packed row)
        ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [2] * 7, [1, 1, 2, 2, 0, 0, 2]])

        def ids_for(seq):
            extra = ids[:, -1:].expand(-1, seq.shape[1] - ids.shape[1])
            return torch.cat([ids, extra], dim=1)

    with torch.no_grad():
        out = model.generate(input_ids=prompt, moce_cluster_ids=ids, max_new_tokens=6,
                             do_sample=False, use_cache=True, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    seq, logits = _greedy_by_recomputation(model, prompt, ids_for, 6)
    assert torch.equal(out.sequences, seq)
    for step, (got, want) in enumerate(zip(out.scores, logits)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"step {step}")


class _ScriptedClusters:
    """Stands in for ClusterAssigner: the cluster of each successive generate call."""

    num_groups = 3

    def __init__(self, clusters: list[int]) -> None:
        self.clusters = list(clusters)

    def assign(self, input_ids, attention_mask):
        return torch.tensor([self.clusters.pop(0)] * input_ids.shape[0])


def test_chat_turns_reusing_a_kv_cache_equal_recomputation_when_the_cluster_changes():
    """A multi-turn chat passes one KV cache to every generate call (axolotl inference
    --chat, HF's cache-reuse recipe). When a new turn moves the conversation to another
    cluster, the cached keys and values (other experts) must not be continued: each turn's
    scores equal a full recomputation under that turn's cluster; a turn that keeps the
    cluster reuses the cache."""
    from test_model import _trained_tiny
    from transformers import DynamicCache

    from moce_plugin.outputs.hf_native import attach_prompt_clusters

    model = _trained_tiny("llama").eval()
    attach_prompt_clusters(model, _ScriptedClusters([0, 2, 2]))
    cache = DynamicCache(config=model.config)
    crops: list[int] = []
    crop = cache.crop
    cache.crop = lambda n: crops.append(n) or crop(n)
    gen = torch.Generator().manual_seed(4)
    seq = torch.randint(3, 128, (1, 6), generator=gen)
    for turn, cluster in enumerate([0, 2, 2]):
        if turn:
            seq = torch.cat([seq, torch.randint(3, 128, (1, 3), generator=gen)], dim=1)
        cached = cache.get_seq_length()
        with torch.no_grad():
            out = model.generate(input_ids=seq, past_key_values=cache, max_new_tokens=4,
                                 do_sample=False, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)
        want_seq, want = _greedy_by_recomputation(model, seq, lambda s, c=cluster:
                                                  torch.tensor([c]), 4)
        assert torch.equal(out.sequences, want_seq), f"turn {turn}"
        for step, (got, ref) in enumerate(zip(out.scores, want)):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4,
                                       msg=f"turn {turn} step {step}")
        if turn == 1:
            assert crops == [-cached]  # the other cluster's cache was emptied
        seq = out.sequences
    assert len(crops) == 1  # the third turn (same cluster) continued the cache


def test_moce_generate_with_a_cache_of_another_cluster_equals_a_fresh_generate(tmp_path,
                                                                              base_dir):
    """load_moce_model(...).generate(..., past_key_values=cache): a cache filled under
    another cluster is not continued."""
    from transformers import DynamicCache

    out = tmp_path / "out"
    _full_output(base_dir, out)
    moce = load_moce_model(out, prompt_format="raw")
    prompt = "Give three tips for staying healthy."
    fresh = moce.generate([prompt], cluster=2, max_new_tokens=6)
    cache = DynamicCache(config=moce.model.config)
    moce.generate([prompt], cluster=0, max_new_tokens=6, past_key_values=cache)
    assert cache.get_seq_length() > 0
    assert moce.generate([prompt], cluster=2, max_new_tokens=6, past_key_values=cache) == fresh


def test_left_padded_batch_generation_equals_each_prompt_alone_and_recomputation(tmp_path,
                                                                                base_dir):
    """MoCEInferenceModel.generate pads a mixed-cluster batch on the left: each row's new
    text equals that prompt generated alone, which equals full recomputation."""
    out = tmp_path / "out"
    _full_output(base_dir, out)
    moce = load_moce_model(out, prompt_format="raw")
    prompts = ["Give three tips for staying healthy.", "Add 2 and 3.", "Name a colour."]
    clusters = [2, 0, 1]
    batched = moce.generate(prompts, cluster=clusters, max_new_tokens=6)
    tok = moce.tokenizer
    for prompt, cluster, text in zip(prompts, clusters, batched):
        assert moce.generate([prompt], cluster=cluster, max_new_tokens=6) == [text]
        enc = tok([prompt], return_tensors="pt")
        seq, _ = _greedy_by_recomputation(moce.model, enc["input_ids"],
                                          lambda s, c=cluster: torch.tensor([c]), 6)
        new = seq[0, enc["input_ids"].shape[1]:]
        if tok.eos_token_id in new.tolist():  # generate stops at the end of sequence
            new = new[: new.tolist().index(tok.eos_token_id) + 1]
        assert tok.decode(new, skip_special_tokens=True) == text
