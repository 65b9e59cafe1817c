"""Preference tuning (``rl: dpo``) of a MoCE model through the real `axolotl train`.

A preference row's cluster is its prompt's: every MoCE layer sees it on the chosen and the
rejected sequence, in the policy's forward and in the reference's; the reference stays the
model as it was at step 0 (with LoRA: the adapter disabled also restores the step-0 experts,
PEFT's modules_to_save original); the DPO loss falls and TRL's rewards/margins are logged with
MoCE's routing metrics; the output reloads, generates and exports; a MoCE SFT output is a
valid start."""

from __future__ import annotations

import json

import pytest
import torch
from axolotl_helpers import SOURCE_TO_CLUSTER, base_config, run_train, sample_rows

pytestmark = pytest.mark.slow

PLUGINS = ["moce_plugin.MoCEPlugin", "preference_ids_plugin.PreferenceIdsPlugin"]


def _rows(limit: int = 8) -> list[dict]:
    """chatml.intel rows: a sample answer is chosen, another domain's answer rejected; the
    shortest rows of each domain, so a step is quick."""
    by_source: dict[str, list[dict]] = {}
    for r in sorted(sample_rows(), key=lambda r: len(r["instruction"] + r["input"] + r["output"])):
        by_source.setdefault(r["source"], []).append(r)
    picked = [r for i in range(limit) for r in [list(by_source.values())[i % 3][i // 3]]]
    out = []
    for i, r in enumerate(picked):
        other = next(o for o in picked[i + 1:] + picked if o["source"] != r["source"])
        out.append({"question": (r["instruction"] + "\n" + r["input"]).strip(),
                    "chosen": r["output"][:120], "rejected": other["output"][:120],
                    "cluster_id": SOURCE_TO_CLUSTER[r["source"]]})
    return out


def _dpo_config(model_dir, tmp, rows, **overrides):
    data = tmp / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = base_config(model_dir, data, tmp, plugins=PLUGINS, rl="dpo",
                      datasets=[dict(path=str(data), type="chatml.intel", ds_type="json",
                                     split="train")],
                      val_set_size=0, max_steps=12, save_steps=12, micro_batch_size=2,
                      gradient_accumulation_steps=1, learning_rate=0.02,
                      adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0,
                      lora_target_linear=True,
                      moce=dict(num_clusters=3, experts_per_group=2, top_k=1, adapter_dim=8,
                                router_aux_loss_coef=0.01))
    cfg["trl"] = {"beta": 0.1}
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _history(out):
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def _expected_cluster(tokenizer, rows, input_ids) -> int:
    """The cluster of the row whose question's tokens appear in this sequence."""
    seq = input_ids.tolist()
    found = set()
    for r in rows:
        q = tokenizer(r["question"], add_special_tokens=False)["input_ids"][1:-1]
        if q and any(seq[i:i + len(q)] == q for i in range(len(seq) - len(q) + 1)):
            found.add(r["cluster_id"])
    assert len(found) == 1, found
    return found.pop()


def _check_ids(out, rows, model_dir, reference: bool = True):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    forwards = torch.load(out / "preference_ids.pt")
    policy = [f for f in forwards if f["grad"]]
    reference = [f for f in forwards if not f["grad"]]
    if reference:
        assert policy and len(reference) == len(policy), [f["grad"] for f in forwards]
    else:  # ORPO: the policy's forward only
        assert policy and not reference, [f["grad"] for f in forwards]
        reference = policy
    n_layers = len(policy[0]["layers"])
    assert n_layers >= 2
    for pol, ref in zip(policy, reference):
        # the same batch in both forwards, every MoCE layer with the same per-token ids
        assert torch.equal(pol["input_ids"], ref["input_ids"])
        for f in (pol, ref):
            assert len(f["layers"]) == n_layers
            for ids in f["layers"].values():
                assert torch.equal(ids, next(iter(pol["layers"].values())))
        ids = next(iter(pol["layers"].values()))
        mask = pol["attention_mask"].bool()
        assert ids.shape == pol["input_ids"].shape
        assert (ids[~mask] == -1).all()
        half = ids.shape[0] // 2
        for row in range(ids.shape[0]):
            real = ids[row][mask[row]]
            want = _expected_cluster(tokenizer, rows, pol["input_ids"][row][mask[row]])
            assert (real == want).all(), (row, real.unique(), want)
            # chosen row i and rejected row half + i carry the same example's cluster
            if row < half:
                assert torch.equal(real[:1], ids[row + half][mask[row + half]][:1])


def test_dpo_lora_ids_in_both_forwards_loss_falls_and_output_works(tmp_path, tiny_model_dir):
    rows = _rows()
    cfg = _dpo_config(tiny_model_dir, tmp_path, rows)
    proc = run_train(cfg, tmp_path)
    out = tmp_path / "model"
    _check_ids(out, rows, tiny_model_dir)

    history = _history(out)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "moce/aux_loss", "moce/router_entropy"):
        assert all(key in h for h in history), (key, history[0].keys())
    first, last = history[0], history[-4:]
    # Step 1: policy == reference, so rewards are 0 and the DPO loss is log 2; the
    # load-balancing loss joins it (coef 0.01).
    assert first["rewards/margins"] == 0 and first["rewards/chosen"] == 0
    assert first["loss"] == pytest.approx(0.69315 + 0.01 * first["moce/aux_loss"], abs=1e-3)
    # The last 4 steps (one epoch of the 8 rows) against the first epoch.
    mean = lambda hs, k: sum(h[k] for h in hs) / len(hs)  # noqa: E731
    assert mean(last, "loss") < mean(history[:4], "loss") - 0.05, [h["loss"] for h in history]
    assert mean(last, "rewards/margins") > 0.05
    console = proc.stdout + proc.stderr
    assert "rewards/margins" in console

    # The reference is the model as loaded, at the end of training too (the trained experts
    # live in PEFT's active copy; the adapter disabled runs the step-0 copy).
    torch.testing.assert_close(torch.load(out / "ref_logits_end.pt"),
                               torch.load(out / "start_logits.pt"), rtol=0, atol=1e-5)

    # ... while the experts and routers did train (PEFT's modules_to_save copy, saved with the
    # adapter), so the equality above is the step-0 copy, not untrained experts.
    _assert_experts_trained(out, tiny_model_dir)

    from moce_plugin.export import export_model
    from moce_plugin.inference import load_moce_model

    model = load_moce_model(out)
    text = model.generate([rows[0]["question"]], cluster=rows[0]["cluster_id"], max_new_tokens=4)
    assert len(text) == 1
    exported = export_model(out, tmp_path / "exported")
    assert (exported / "config.json").is_file()


@pytest.mark.parametrize("start", ["plain", "moce_sft"])
def test_dpo_full_finetune_reference(tmp_path, tiny_model_dir, start):
    """Without an adapter axolotl loads a second model as the reference: from a plain base it
    is upcycled as the policy was (same init_seed), from a MoCE SFT output (SFT -> DPO) it
    loads the SFT experts; either way it equals the policy at step 0 and stays so."""
    from axolotl_helpers import write_cluster_jsonl

    from moce_plugin.inference import load_moce_model

    base, moce = tiny_model_dir, dict(num_clusters=3, experts_per_group=2, top_k=1,
                                      adapter_dim=8, router_aux_loss_coef=0.01)
    if start == "moce_sft":
        sft_dir = tmp_path / "sft"
        sft_dir.mkdir()
        data = write_cluster_jsonl(sft_dir / "train.jsonl", limit=60)
        run_train(base_config(tiny_model_dir, data, sft_dir, max_steps=3, save_steps=3,
                              learning_rate=0.1, val_set_size=0), sft_dir)
        base, moce = sft_dir / "model", dict(router_aux_loss_coef=0.01)

    rows = _rows()
    cfg = _dpo_config(base, tmp_path, rows, adapter=None, moce=moce)
    for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_linear"):
        cfg.pop(key)
    proc = run_train(cfg, tmp_path)
    out = tmp_path / "model"
    # start_logits.pt: written at each load (policy, then reference) on the probe batch.
    start_logits = torch.load(out / "start_logits.pt")
    if start == "moce_sft":
        assert f"MoCE: continuing from {base}" in proc.stdout + proc.stderr
        loaded = load_moce_model(base).logits(_probe_ids(), _probe_clusters())
        torch.testing.assert_close(start_logits, loaded, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.load(out / "ref_logits_end.pt"), start_logits,
                               rtol=0, atol=1e-5)
    _check_ids(out, rows, tiny_model_dir)
    history = _history(out)
    # Step 1: the reference computes exactly what the policy does.
    assert history[0]["rewards/margins"] == 0 and history[0]["rewards/chosen"] == 0
    assert any(h["rewards/margins"] != 0 for h in history[1:])
    after = load_moce_model(out).logits(_probe_ids(), _probe_clusters())
    assert not torch.allclose(after, start_logits)


def _assert_experts_trained(out, model_dir) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from moce_plugin.model.config import MoCEConfig
    from moce_plugin.model.upcycle import upcycle_model

    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    upcycle_model(fresh, MoCEConfig(num_clusters=3, experts_per_group=2, top_k=1,
                                    adapter_dim=8), dtype=torch.float32, freeze_base=True)
    init = fresh.state_dict()
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if "moce_experts" in k]
        assert keys
        for key in keys:
            start = init[key.replace("base_model.model.", "", 1)]
            assert (f.get_tensor(key) - start).abs().max() > 1e-3, key


def _probe_ids():
    from preference_ids_plugin import PROBE_IDS

    return PROBE_IDS


def _probe_clusters():
    from preference_ids_plugin import PROBE_CLUSTERS

    return PROBE_CLUSTERS


def test_orpo_lora_ids_for_chosen_and_rejected_and_loss_falls(tmp_path, tiny_model_dir):
    """ORPO (no reference): TRL concatenates chosen and rejected inside the trainer and calls
    the model with input_ids and attention_mask only; every MoCE layer still gets the row's
    cluster on both halves."""
    rows = _rows()
    prompts = [{"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"],
                "cluster_id": r["cluster_id"]} for r in rows]
    cfg = _dpo_config(tiny_model_dir, tmp_path, rows, rl="orpo", orpo_alpha=0.1)
    data = tmp_path / "orpo.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in prompts))
    cfg["datasets"] = [dict(path=str(data), ds_type="json", split="train")]
    cfg.pop("trl")
    run_train(cfg, tmp_path)
    out = tmp_path / "model"
    _check_ids(out, rows, tiny_model_dir, reference=False)
    history = _history(out)
    for key in ("rewards/margins", "log_odds_ratio", "nll_loss", "moce/aux_loss"):
        assert all(key in h for h in history), (key, history[0].keys())
    mean = lambda hs, k: sum(h[k] for h in hs) / len(hs)  # noqa: E731
    assert mean(history[-4:], "loss") < mean(history[:4], "loss") - 0.05, \
        [h["loss"] for h in history]


def test_kto_lora_ids_in_policy_reference_and_kl_forwards(tmp_path, tiny_model_dir):
    """KTO (unpaired): the main, KL and reference forwards each get every row's prompt cluster
    (a KL row pairs row i's prompt with another row's completion: row i's cluster)."""
    from transformers import AutoTokenizer

    rows = _rows()
    unpaired = [{"prompt": r["question"], "completion": r[key], "label": key == "chosen",
                 "cluster_id": r["cluster_id"]} for r in rows for key in ("chosen", "rejected")]
    cfg = _dpo_config(tiny_model_dir, tmp_path, rows, rl="kto", remove_unused_columns=False)
    data = tmp_path / "kto.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in unpaired))
    cfg["datasets"] = [dict(path=str(data), ds_type="json", split="train")]
    run_train(cfg, tmp_path)
    out = tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    forwards = torch.load(out / "preference_ids.pt")
    grads = [f["grad"] for f in forwards]
    assert grads.count(True) >= 1 and grads.count(False) >= 2 * grads.count(True), grads
    for f in forwards:
        mask = f["attention_mask"].bool()
        layers = list(f["layers"].values())
        assert len(layers) >= 2 and all(torch.equal(ids, layers[0]) for ids in layers)
        ids = layers[0]
        assert ids.shape == f["input_ids"].shape and (ids[~mask] == -1).all()
        for row in range(ids.shape[0]):
            want = _expected_cluster(tokenizer, rows, f["input_ids"][row][mask[row]])
            assert (ids[row][mask[row]] == want).all(), (row, ids[row].unique(), want)
    history = _history(out)
    for key in ("kl", "moce/aux_loss"):
        assert all(key in h for h in history), (key, history[0].keys())
    assert any(k.startswith("rewards/") for k in history[0])
    torch.testing.assert_close(torch.load(out / "ref_logits_end.pt"),
                               torch.load(out / "start_logits.pt"), rtol=0, atol=1e-5)
