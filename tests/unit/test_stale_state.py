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
