"""Damage to a cluster artifact or a data file is reported as damage, naming the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_clustering import FakeEncoder, fake_options, topic_examples

from moce_plugin.clustering import (
    ASSIGNMENTS_FILE,
    METADATA_FILE,
    ClusteringError,
    ClusterModel,
    load_yaml_datasets,
    rows_from_examples,
    run_clustering,
)
from moce_plugin.clustering.errors import ClusterArtifactError

ROWS = 90


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    rows = rows_from_examples("topics.jsonl", topic_examples(ROWS // 3), "auto")
    run_clustering(rows, tmp_path / "art", 3, fake_options(tmp_path), FakeEncoder(),
                   progress=False)
    return tmp_path / "art"


def _lines(path: Path) -> list[str]:
    return (path / ASSIGNMENTS_FILE).read_text().splitlines(keepends=True)


def _drop_checksums(path: Path, keep_rows: bool = True) -> None:
    meta = json.loads((path / METADATA_FILE).read_text())
    del meta["files"]
    if not keep_rows:
        del meta["num_rows"]
    (path / METADATA_FILE).write_text(json.dumps(meta))


def test_metadata_records_checksums_and_rows(artifact: Path) -> None:
    files = json.loads((artifact / METADATA_FILE).read_text())["files"]
    assert files[ASSIGNMENTS_FILE]["rows"] == ROWS
    for name in (ASSIGNMENTS_FILE, "centroids.npy"):
        assert files[name]["sha256"] == hashlib.sha256((artifact / name).read_bytes()).hexdigest()


def test_assignments_cut_mid_line_is_damage(artifact: Path) -> None:
    text = (artifact / ASSIGNMENTS_FILE).read_text()
    (artifact / ASSIGNMENTS_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ClusterArtifactError, match=r"assignments.jsonl is damaged: it has \d+ "
                       rf"rows, metadata.json records {ROWS}") as err:
        ClusterModel.load(artifact)
    assert "data changed" not in str(err.value) and str(artifact) in str(err.value)


def test_assignments_cut_at_line_boundary_is_damage_not_changed_data(artifact: Path) -> None:
    (artifact / ASSIGNMENTS_FILE).write_text("".join(_lines(artifact)[:-5]))
    with pytest.raises(ClusterArtifactError, match=f"has {ROWS - 5} rows"):
        ClusterModel.load(artifact)


def test_edited_assignments_fail_the_checksum(artifact: Path) -> None:
    lines = _lines(artifact)
    rec = json.loads(lines[0])
    lines[0] = json.dumps({**rec, "cluster": (rec["cluster"] + 1) % 3}) + "\n"
    (artifact / ASSIGNMENTS_FILE).write_text("".join(lines))
    with pytest.raises(ClusterArtifactError, match="assignments.jsonl is damaged: its sha256"):
        ClusterModel.load(artifact)


def test_edited_centroids_fail_the_checksum(artifact: Path) -> None:
    centroids = artifact / "centroids.npy"
    data = bytearray(centroids.read_bytes())
    data[-1] ^= 0xFF
    centroids.write_bytes(bytes(data))
    with pytest.raises(ClusterArtifactError, match="centroids.npy is damaged: its sha256"):
        ClusterModel.load(artifact)


def test_artifact_without_checksums_still_loads_and_is_checked_by_rows(artifact: Path) -> None:
    _drop_checksums(artifact)
    model = ClusterModel.load(artifact)
    assert len(model.lookup(topic_examples(ROWS // 3), "topics.jsonl")) == ROWS
    (artifact / ASSIGNMENTS_FILE).write_text("".join(_lines(artifact)[:-1]))
    with pytest.raises(ClusterArtifactError, match=f"has {ROWS - 1} rows"):
        ClusterModel.load(artifact)


def test_oldest_artifact_cut_mid_line_names_file_and_line(artifact: Path) -> None:
    _drop_checksums(artifact, keep_rows=False)
    lines = _lines(artifact)
    (artifact / ASSIGNMENTS_FILE).write_text("".join(lines[:3]) + lines[3][:10])
    model = ClusterModel.load(artifact)
    with pytest.raises(ClusterArtifactError, match="assignments.jsonl is damaged at line 4"):
        model.lookup(topic_examples(ROWS // 3), "topics.jsonl")


def test_damaged_metadata_names_the_file(artifact: Path) -> None:
    (artifact / METADATA_FILE).write_text('{"format_version": 1, ')
    with pytest.raises(ClusterArtifactError, match=r"metadata.json is damaged \(not valid JSON"):
        ClusterModel.load(artifact)


@pytest.mark.parametrize("content", ["", "\n  \n", "[]", "[ ]\n"],
                         ids=["zero-bytes", "blank", "empty-list", "empty-list-spaces"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_empty_dataset_file_says_empty(tmp_path: Path, content: str, suffix: str) -> None:
    data = tmp_path / f"train{suffix}"
    data.write_text(content)
    cfg = {"datasets": [{"path": str(data), "type": "alpaca", "ds_type": "json"}]}
    with pytest.raises(ClusteringError, match=rf"the data set '{data}' is empty") as err:
        load_yaml_datasets(cfg)
    assert "StopIteration" not in str(err.value) and "Relative paths" not in str(err.value)


@pytest.mark.parametrize("kind", ["jsonl-blank-lines", "csv-header-only", "parquet-no-rows"])
def test_empty_dataset_found_when_loading(tmp_path: Path, kind: str) -> None:
    """Files too big for the quick look, or in a format with a header, but with no rows."""
    if kind == "jsonl-blank-lines":
        data, ds_type = tmp_path / "train.jsonl", "json"
        data.write_text("\n" * 200)
    elif kind == "csv-header-only":
        data, ds_type = tmp_path / "train.csv", "csv"
        data.write_text("instruction,input,output\n")
    else:
        from datasets import Dataset

        data, ds_type = tmp_path / "train.parquet", "parquet"
        Dataset.from_dict({"instruction": [], "input": [], "output": []}).to_parquet(data)
    cfg = {"datasets": [{"path": str(data), "type": "alpaca", "ds_type": ds_type}]}
    with pytest.raises(ClusteringError, match=rf"the data set '{data}' is empty"):
        load_yaml_datasets(cfg)


def test_empty_split_returned_by_the_loader_says_empty(monkeypatch) -> None:
    """Loaders that return zero rows without an error (a hub data set's empty split)."""
    import axolotl.utils.data.shared as shared
    from datasets import Dataset

    monkeypatch.setattr(shared, "load_dataset_with_config",
                        lambda *a, **k: Dataset.from_dict({"instruction": []}))
    cfg = {"datasets": [{"path": "org/some-dataset", "type": "alpaca"}]}
    with pytest.raises(ClusteringError, match="the data set 'org/some-dataset' is empty"):
        load_yaml_datasets(cfg)
