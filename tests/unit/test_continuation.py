"""Starting a run from a MoCE output or export (`base_model:` naming one): the config is
adapted or refused before loading, the experts and routers of the loaded model are loaded
into the upcycled model (same logits), and new data is assigned by the loaded artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from axolotl_helpers import sample_rows
from fake_encoder import BagEncoder
from pydantic import ValidationError

from moce_plugin.integration.args import MoCEArgs
from moce_plugin.integration.continuation import (
    MoCEContinuationError,
    assign_rows,
    load_moce_source,
    moce_source,
    prepare_continuation,
)
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.upcycle import moce_experts_modules, upcycle_model
from moce_plugin.outputs.folder import MOCE_WEIGHTS_NAME, save_moce_files, saved_meta
from moce_plugin.outputs.load import BASE_MLP_KEY_MAPPING

LOADED = MoCEConfig(num_clusters=3, experts_per_group=2, top_k=1, adapter_dim=8)
IDS = torch.arange(4, 28).view(2, 12)
CLUSTERS = torch.tensor([0, 2])


def _trained_moce(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    upcycle_model(model, LOADED)
    torch.manual_seed(1)
    with torch.no_grad():  # "trained": experts and routers far from their initialisation
        for _, module in moce_experts_modules(model):
            for p in module.parameters():
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def moce_output(tmp_path_factory, tiny_model_dir):
    """What `axolotl train` leaves for a full (no adapter) MoCE run: the upcycled model's own
    save (FFN under mlp.base_mlp, experts beside it), tokenizer, moce config + weights."""
    folder = tmp_path_factory.mktemp("moce_out") / "model"
    model = _trained_moce(tiny_model_dir)
    model.save_pretrained(folder)
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    meta = {"base_model": str(tiny_model_dir), "adapter": None, "prompt_format": "alpaca"}
    save_moce_files(model, LOADED, folder, saved_meta(meta, "final"))
    with torch.no_grad():
        logits = model(input_ids=IDS, moce_cluster_ids=CLUSTERS).logits
    return folder, logits


def _data(folder, **moce) -> dict:
    return {"base_model": str(folder), "moce": moce}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_plain_base_is_not_a_moce_source(tiny_model_dir, tmp_path):
    data = _data(tiny_model_dir, num_clusters=3)
    assert prepare_continuation(data) is None
    assert data == _data(tiny_model_dir, num_clusters=3)
    assert moce_source(None) is None and moce_source(tmp_path / "nothing") is None


def test_model_keys_are_taken_from_the_loaded_model(moce_output):
    folder, _ = moce_output
    data = _data(folder, router_aux_loss_coef=0.05)
    source = prepare_continuation(data)
    assert source is not None and source.artifact is None and not source.export
    moce = MoCEConfig(**data["moce"])
    for key in ("num_clusters", "experts_per_group", "top_k", "adapter_dim", "layers"):
        assert getattr(moce, key) == getattr(LOADED, key), key
    assert moce.router_aux_loss_coef == 0.05  # a training setting: the new run's own
    # The FFN stored as mlp.base_mlp.* loads into the plain architecture's mlp.*.
    assert data["model_kwargs"] == {"key_mapping": BASE_MLP_KEY_MAPPING}


def test_keys_contradicting_the_loaded_model_are_named(moce_output):
    folder, _ = moce_output
    with pytest.raises(MoCEContinuationError) as err:
        prepare_continuation(_data(folder, top_k=2, experts_per_group=4, adapter_dim=8))
    msg = str(err.value)
    assert "moce.top_k: 2 here, 1 in the loaded model" in msg
    assert "moce.experts_per_group: 4 here, 2 in the loaded model" in msg
    assert "adapter_dim" not in msg  # the same value is fine
    # Through axolotl's config validation (the plugin's input args), before any loading.
    with pytest.raises(ValidationError, match="moce.top_k: 2 here, 1 in the loaded model"):
        MoCEArgs.model_validate(_data(folder, top_k=2))


def test_lora_output_and_unfinished_output_are_refused(moce_output, tmp_path):
    folder, _ = moce_output
    lora = _copy(folder, tmp_path / "lora")
    (lora / "adapter_config.json").write_text("{}")
    with pytest.raises(MoCEContinuationError, match="LoRA/QLoRA MoCE output.*moce-export"):
        prepare_continuation(_data(lora, num_clusters=3))
    started = _copy(folder, tmp_path / "started")
    (started / MOCE_WEIGHTS_NAME).unlink()
    cfg = json.loads((started / "moce_config.json").read_text())
    cfg["_meta"]["saved"] = "start"
    (started / "moce_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoCEContinuationError, match="saved when training started"):
        prepare_continuation(_data(started, num_clusters=3))


def _fake_artifact(path: Path, fingerprint: str) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"fingerprint": fingerprint}))
    return path


def test_the_loaded_models_artifact_is_kept(moce_output, tmp_path):
    folder, _ = moce_output
    clustered = _copy(folder, tmp_path / "clustered")
    own = _fake_artifact(clustered / "cluster_artifact", "A")
    data = _data(clustered)
    prepare_continuation(data)
    assert data["moce"]["cluster_artifact"] == str(own.resolve())
    same = _fake_artifact(tmp_path / "same", "A")  # a copy of it (e.g. the stage-1 original)
    data = _data(clustered, cluster_artifact=str(same))
    prepare_continuation(data)
    assert data["moce"]["cluster_artifact"] == str(own.resolve())
    other = _fake_artifact(tmp_path / "other", "B")
    with pytest.raises(MoCEContinuationError, match="not the cluster artifact of base_model"):
        prepare_continuation(_data(clustered, cluster_artifact=str(other)))
    # Trained on a cluster column: no artifact's clusters are its groups.
    with pytest.raises(MoCEContinuationError, match="trained on a cluster column"):
        prepare_continuation(_data(folder, cluster_artifact=str(other)))


def test_loaded_experts_give_the_loaded_models_logits(moce_output):
    from transformers import AutoModelForCausalLM

    folder, expected = moce_output
    source = moce_source(folder)
    # What axolotl builds with the model_kwargs the config got, then the plugin's hook.
    model = AutoModelForCausalLM.from_pretrained(folder, key_mapping=BASE_MLP_KEY_MAPPING)
    upcycle_model(model, source.config)
    assert load_moce_source(model, source) == MOCE_WEIGHTS_NAME
    with torch.no_grad():
        got = model.eval()(input_ids=IDS, moce_cluster_ids=CLUSTERS).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The model saves its own (upcycled) names again, not the load-time mapping's reverse.
    assert not any(getattr(c, "_original_source_patterns", None) == list(BASE_MLP_KEY_MAPPING)
                   for c in getattr(model, "_weight_conversions", None) or [])
    wrong = AutoModelForCausalLM.from_pretrained(folder, key_mapping=BASE_MLP_KEY_MAPPING)
    upcycle_model(wrong, MoCEConfig(num_clusters=3, experts_per_group=2, top_k=1,
                                    adapter_dim=16))
    with pytest.raises(MoCEContinuationError, match="shape"):
        load_moce_source(wrong, source)


def test_an_export_is_read_with_its_base_family_config(moce_output, tmp_path):
    from moce_plugin.export import export_model

    folder, _ = moce_output
    dest = export_model(folder, tmp_path / "exported")
    assert json.loads((dest / "config.json").read_text())["model_type"] == "moce"
    data = _data(dest)
    source = prepare_continuation(data)
    assert source.export
    plain = json.loads((Path(data["base_model_config"]) / "config.json").read_text())
    assert plain["model_type"] == "llama" and "moce" not in plain
    assert data["tokenizer_config"] == str(dest)
    # No "MoCE does not support model_type 'moce'" at config load any more.
    MoCEArgs.model_validate(_data(dest, router_aux_loss_coef=0.01))


def _artifact(tmp_path: Path, template: str, rows: list[dict]):
    from moce_plugin.clustering import ClusteringOptions, rows_from_yaml, run_clustering

    data = tmp_path / "clustered.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"datasets": [{"path": str(data), "ds_type": "json", "type": "alpaca"}]}
    options = ClusteringOptions(text_template=template, cache_dir=str(tmp_path / "cache"),
                                report=False)
    model = run_clustering(rows_from_yaml(cfg, template), tmp_path / "art", 3, options,
                           BagEncoder(), progress=False, log=lambda _m: None)
    model.use_encoder(BagEncoder())
    return model


def _alpaca(rows):
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in rows]


def test_new_rows_are_assigned_by_the_loaded_artifact(tmp_path):
    from datasets import Dataset

    old, new = _alpaca(sample_rows(60)), _alpaca(sample_rows()[200:230])
    model = _artifact(tmp_path, "auto", old)
    dataset = Dataset.from_list(old[:10] + new)
    ids = assign_rows(model, dataset, "new")
    assert ids[:10] == model.lookup(old[:10], "old")  # clustered rows keep their cluster
    assert ids[10:] == model.assign_requests(new).tolist()  # new rows: as at inference
    assert len(set(ids[10:])) > 1


def test_data_the_artifact_template_cannot_read_is_refused(tmp_path):
    from datasets import Dataset

    rows = [{"question": r["instruction"], "answer": r["output"]} for r in sample_rows(60)]
    model = _artifact(tmp_path, "{question}", rows)
    alpaca = Dataset.from_list(_alpaca(sample_rows(5)))
    with pytest.raises(MoCEContinuationError,
                       match=r"text template '\{question\}' reads \['question'\]"):
        assign_rows(model, alpaca, "new")


def test_training_data_of_a_continued_run_is_assigned_by_the_loaded_artifact(moce_output,
                                                                             tmp_path):
    """The plugin's dataset step: with base_model a MoCE output, rows the artifact never saw
    are assigned by it; with a plain base the same rows are refused as unclustered."""
    from datasets import Dataset

    from moce_plugin.clustering import ClusterArtifactError
    from moce_plugin.integration.args import cluster_model_of, moce_config_from_cfg
    from moce_plugin.integration.datasets import attach_cluster_column

    folder, _ = moce_output
    old, new = _alpaca(sample_rows(60)), _alpaca(sample_rows()[200:230])
    clustered = _copy(folder, tmp_path / "clustered")
    shutil.copytree(_artifact(tmp_path, "auto", old).path, clustered / "cluster_artifact")
    cfg = MoCEArgs.model_validate(_data(clustered, router_aux_loss_coef=0.01)).model_dump()
    cfg["base_model"] = str(clustered)
    artifact = cluster_model_of(moce_config_from_cfg(cfg))
    artifact.use_encoder(BagEncoder())
    out = attach_cluster_column(Dataset.from_list(new), {"path": "new.jsonl"}, cfg)
    assert out["cluster_id"] == artifact.assign_requests(new).tolist()
    cfg["base_model"] = "/a/plain/base"
    with pytest.raises(ClusterArtifactError, match="not in the cluster artifact"):
        attach_cluster_column(Dataset.from_list(new), {"path": "new.jsonl"}, cfg)
