"""Stale state is refused, not used: an artifact made with other clustering settings than the
YAML's, a resume with another ``moce:`` block, damaged or non-finite MoCE weights, and an
output falling back to another artifact than its own (docs/robustness.md, "Stale state")."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_clustering import FakeEncoder, topic_examples

from moce_plugin.clustering import ClusteringOptions, rows_from_examples, run_clustering
from moce_plugin.clustering.errors import ClusterArtifactError
from moce_plugin.integration.args import MoCEArgs

MADE_WITH = {"text_template": "{instruction}", "prefix": "query: ", "k_max": 5, "seed": 3}


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    rows = rows_from_examples("topics.jsonl", topic_examples(10), MADE_WITH["text_template"])
    options = ClusteringOptions(cache_dir=str(tmp_path / "cache"), report=False, **MADE_WITH)
    run_clustering(rows, tmp_path / "art", 3, options, FakeEncoder(), progress=False)
    return tmp_path / "art"


def _validate(artifact: Path, clustering: dict) -> MoCEArgs:
    return MoCEArgs.model_validate({"moce": {"cluster_artifact": str(artifact),
                                             "clustering": clustering}})


# ---- item 2: the YAML's clustering settings are the artifact's --------------------------------
def test_same_clustering_settings_train(artifact: Path) -> None:
    # settings that do not change the clusters may differ; k_max only mattered for k=auto
    ok = {**MADE_WITH, "batch_size": 8, "report": True, "cache_dir": "/elsewhere", "k_max": 9}
    assert _validate(artifact, ok).moce.num_clusters == 3


@pytest.mark.parametrize(("change", "named"), [
    ({"text_template": "{input}"}, "text_template: artifact '{instruction}', YAML '{input}'"),
    ({"embedding_model": "intfloat/e5-large-v2"}, "embedding_model: artifact "),
    ({"prefix": ""}, "prefix: artifact 'query: ', YAML ''"),
    ({"seed": 0, "normalize": False}, "normalize: artifact True, YAML False; seed: artifact 3"),
    ({"algorithm": "minibatch"}, "algorithm: artifact 'kmeans', YAML 'minibatch'"),
])
def test_changed_clustering_settings_are_refused_naming_the_keys(artifact: Path, change: dict,
                                                                  named: str) -> None:
    with pytest.raises(ValueError, match="moce.clustering differs from the settings the cluster "
                       f"artifact {artifact} was made with") as err:
        _validate(artifact, {**MADE_WITH, **change})
    message = str(err.value)
    assert named in message and "Re-cluster with `moce-cluster" in message
    for key in change:
        assert f"moce.clustering.{key}" in message


def test_a_yaml_without_the_settings_is_refused_too(artifact: Path) -> None:
    """Removing the template from the YAML (back to 'auto') changes the clusters as well."""
    with pytest.raises(ValueError, match="text_template: artifact '{instruction}', YAML 'auto'"):
        _validate(artifact, {})


def test_check_settings_raises_the_artifact_error(artifact: Path) -> None:
    from moce_plugin.clustering import ClusterModel

    with pytest.raises(ClusterArtifactError, match="prefix"):
        ClusterModel.load(artifact).check_settings(ClusteringOptions(**{**MADE_WITH,
                                                                        "prefix": ""}))


# ---- item 3: a resume keeps the checkpoint's moce: block -------------------------------------
TRAINED = {"num_clusters": 3, "experts_per_group": 2, "top_k": 1, "adapter_dim": 8,
           "adapter_activation": "sigmoid"}


def _run_with_checkpoint(tmp_path: Path, in_checkpoint: bool = True) -> Path:
    from moce_plugin.model.config import MoCEConfig
    from moce_plugin.outputs.folder import write_moce_config

    out = tmp_path / "run"
    checkpoint = out / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (out / "checkpoint-2").mkdir()
    write_moce_config(checkpoint if in_checkpoint else out, MoCEConfig(**TRAINED),
                      {"saved": "checkpoint", "step": 4})
    return out


def _load_datasets(out: Path, moce: dict, **cfg) -> None:
    from axolotl.utils.dict import DictDefault

    from moce_plugin.integration.plugin import MoCEPlugin

    MoCEPlugin().load_datasets(DictDefault(moce=moce, output_dir=str(out),
                                           model_config_type="llama", **cfg), preprocess=False)


@pytest.mark.parametrize(("change", "named"), [
    ({"top_k": 2}, "top_k: checkpoint 1, YAML 2"),
    ({"adapter_activation": "relu"}, "adapter_activation: checkpoint 'sigmoid', YAML 'relu'"),
    ({"adapter_dim": 16}, "adapter_dim: checkpoint 8, YAML 16"),
    ({"router_aux_loss_coef": 0.1, "layers": [0]}, "router_aux_loss_coef: checkpoint 0.01"),
])
@pytest.mark.parametrize("how", ["explicit", "auto", "config in output_dir"])
def test_resume_with_another_moce_block_is_refused_naming_the_keys(tmp_path: Path, change: dict,
                                                                    named: str, how: str):
    out = _run_with_checkpoint(tmp_path, in_checkpoint=how != "config in output_dir")
    resume = ({"auto_resume_from_checkpoints": True} if how == "auto" else
              {"resume_from_checkpoint": str(out / "checkpoint-4")})
    with pytest.raises(ValueError, match=rf"resume_from_checkpoint {out / 'checkpoint-4'}: the "
                       "YAML's moce: block differs") as err:
        _load_datasets(out, {**TRAINED, **change}, **resume)
    message = str(err.value)
    assert named in message and "start a new run" in message
    assert all(f"moce.{k}" in message for k in change)


def test_resume_with_the_same_moce_block_goes_on(tmp_path: Path) -> None:
    out = _run_with_checkpoint(tmp_path)
    _load_datasets(out, {**TRAINED, "init_seed": 5},  # the seed only initialises
                   resume_from_checkpoint=str(out / "checkpoint-4"))
    _load_datasets(out, {**TRAINED, "top_k": 2})  # a new run into the same folder


# ---- item 4: MoCE weights are the saved ones, and finite --------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from axolotl_helpers import sample_rows
    from tiny_models import save_tiny_model_dir

    texts = [t for r in sample_rows(200) for t in (r["instruction"], r["output"])]
    return save_tiny_model_dir(tmp_path_factory.mktemp("base"), texts)


def _overwrite_tensor_bytes(file: Path, count: int = 16) -> None:
    """Overwrite ``count`` float32 values inside the last tensor's data with NaN, header kept:
    what a bad disk block or a stray write does."""
    import struct

    data = bytearray(file.read_bytes())
    data[-4 * count:] = struct.pack("<f", float("nan")) * count
    file.write_bytes(bytes(data))


def test_overwritten_moce_weights_are_refused_by_checksum(tmp_path: Path, base_dir) -> None:
    from test_inference import _full_output

    from moce_plugin.outputs.export import export_model
    from moce_plugin.outputs.folder import MOCE_WEIGHTS_NAME, read_meta
    from moce_plugin.outputs.load import load_moce_model
    from moce_plugin.utils import FileFormatError

    out = tmp_path / "run"
    _full_output(base_dir, out)
    recorded = read_meta(out)["moce_weights"]
    assert len(recorded["sha256"]) == 64 and recorded["tensors"] > 0
    load_moce_model(out)  # intact: loads
    _overwrite_tensor_bytes(out / MOCE_WEIGHTS_NAME)
    with pytest.raises(FileFormatError, match=rf"{out / MOCE_WEIGHTS_NAME} is damaged: its MoCE "
                       "tensors differ from the checksum recorded in moce_config.json"):
        load_moce_model(out)
    with pytest.raises(FileFormatError, match="differ from the checksum"):  # export loads too
        export_model(out, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_non_finite_moce_weights_are_refused_naming_the_tensor(tmp_path: Path, base_dir) -> None:
    import torch
    from test_inference import CFG, _full_output

    from moce_plugin.outputs.folder import read_meta, save_moce_files
    from moce_plugin.outputs.load import load_moce_model
    from moce_plugin.utils import FileFormatError

    out = tmp_path / "run"
    model = _full_output(base_dir, out)
    name, param = next((n, p) for n, p in model.named_parameters() if "moce_experts" in n)
    with torch.no_grad():
        param.view(-1)[:16] = float("nan")  # diverged training: saved with a matching checksum
    save_moce_files(model, CFG, out, read_meta(out))
    with pytest.raises(FileFormatError, match=r"MoCE tensor layers\.\d+\.\S+ holds 16 "
                       r"non-finite values \(NaN/inf\)"):
        load_moce_model(out)


def test_a_checkpoint_borrowing_its_runs_config_is_not_checked_against_its_checksum(
        tmp_path: Path, base_dir) -> None:
    import shutil

    import torch
    from test_inference import CFG, IDS, _full_output, _logits, _perturb

    from moce_plugin.outputs.folder import MOCE_CONFIG_NAME, read_meta, save_moce_files
    from moce_plugin.outputs.load import load_moce_model

    out = tmp_path / "run"
    model = _full_output(base_dir, out)
    checkpoint = out / "checkpoint-2"
    shutil.copytree(out, checkpoint)
    _perturb(model, seed=5)  # the checkpoint's MoCE weights differ from the final ones
    save_moce_files(model, CFG, checkpoint, read_meta(out))
    (checkpoint / MOCE_CONFIG_NAME).unlink()  # stopped between the trainer's save and ours
    clusters = torch.tensor([0, 2])
    torch.testing.assert_close(_logits(load_moce_model(checkpoint).model, IDS, clusters),
                               _logits(model, IDS, clusters), atol=1e-5, rtol=1e-5)


# ---- item 5: an output uses only the artifact it was trained with -----------------------------
def _cluster(path: Path, n_per_topic: int) -> str:
    rows = rows_from_examples("topics.jsonl", topic_examples(n_per_topic), "auto")
    options = ClusteringOptions(cache_dir=str(path.parent / "cache"), report=False)
    return run_clustering(rows, path, 3, options, FakeEncoder(), progress=False).fingerprint


def _output_with_artifact(tmp_path: Path, base_dir) -> tuple[Path, Path]:
    """A full output trained with the artifact at the YAML's path ``art`` (training records
    its fingerprint, as the plugin does, and copies it into the output)."""
    from test_inference import CFG, _full_output

    from moce_plugin.outputs.folder import copy_cluster_artifact, read_meta, write_moce_config

    art, out = tmp_path / "art", tmp_path / "run"
    fingerprint = _cluster(art, 10)
    _full_output(base_dir, out)
    write_moce_config(out, CFG.model_copy(update={"cluster_artifact": str(art)}),
                      {**read_meta(out), "cluster_artifact_fingerprint": fingerprint})
    copy_cluster_artifact(art, out)
    return out, art


def test_training_records_the_artifact_fingerprint(tmp_path: Path, base_dir) -> None:
    from axolotl.utils.dict import DictDefault
    from transformers import AutoModelForCausalLM

    from moce_plugin.clustering import ClusterModel
    from moce_plugin.integration.plugin import MoCEPlugin

    fingerprint = _cluster(tmp_path / "art", 10)
    plugin = MoCEPlugin()
    cfg = DictDefault(moce={"cluster_artifact": str(tmp_path / "art")},
                      base_model=str(base_dir), datasets=[])
    plugin.add_callbacks_pre_trainer(cfg, AutoModelForCausalLM.from_pretrained(base_dir))
    assert plugin._meta["cluster_artifact_fingerprint"] == fingerprint == \
        ClusterModel.load(tmp_path / "art").fingerprint


def test_output_without_its_copy_refuses_a_reclustered_artifact(tmp_path: Path,
                                                                base_dir) -> None:
    import shutil

    from moce_plugin.outputs.load import MoCELoadError, load_moce_model

    out, art = _output_with_artifact(tmp_path, base_dir)
    assert load_moce_model(out).cluster_model.path == out / "cluster_artifact"
    shutil.rmtree(out / "cluster_artifact")
    assert load_moce_model(out).cluster_model.path == art  # the same artifact: fine
    _cluster(art, 12)  # re-clustered since (other rows): same k, other ids
    with pytest.raises(MoCELoadError, match=rf"cluster artifact {art} is not the one this model "
                       r"was trained with \(fingerprint \w{12}, recorded \w{12}\).*Restore"):
        load_moce_model(out)
    with pytest.raises(MoCELoadError, match="is not the one this model was trained with"):
        load_moce_model(out, cluster_artifact=str(art))


def test_resume_refuses_a_reclustered_artifact(tmp_path: Path) -> None:
    from moce_plugin.model.config import MoCEConfig
    from moce_plugin.outputs.folder import write_moce_config

    art, out = tmp_path / "art", tmp_path / "run"
    fingerprint = _cluster(art, 10)
    moce = {**TRAINED, "cluster_artifact": str(art)}
    (out / "checkpoint-4").mkdir(parents=True)
    write_moce_config(out / "checkpoint-4", MoCEConfig(**moce),
                      {"cluster_artifact_fingerprint": fingerprint})
    _load_datasets(out, moce, resume_from_checkpoint=str(out / "checkpoint-4"))
    _cluster(art, 12)
    from moce_plugin.integration import args

    args._load_artifact.cache_clear()  # a new process in real use
    args._resolved.cache_clear()
    with pytest.raises(ValueError, match=rf"cluster_artifact: checkpoint 'fingerprint \w{{12}}', "
                       rf"YAML '{art} \(fingerprint \w{{12}}\)'"):
        _load_datasets(out, moce, resume_from_checkpoint=str(out / "checkpoint-4"))
