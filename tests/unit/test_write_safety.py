"""Nothing a user points at is ever replaced: every folder the package writes (cluster
artifact, an output's cluster_artifact/ copy, exports) replaces only an earlier one of its
kind, is refused before any work otherwise, gets the user's umask, and a killed run's
temporaries are cleaned up by the next run (docs/robustness.md, "Nothing is replaced")."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_clustering import FakeEncoder, fake_options, topic_examples

from moce_plugin.clustering import ClusterModel, rows_from_examples, run_clustering
from moce_plugin.clustering import cli as cluster_cli
from moce_plugin.clustering.errors import ClusterArtifactError
from moce_plugin.outputs.folder import (
    ARTIFACT_DIR_NAME,
    check_artifact_copy_target,
    copy_cluster_artifact,
)
from moce_plugin.utils import atomic_dir


def _tree(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


class NoEncoder(FakeEncoder):
    def encode(self, texts: list[str]):
        raise AssertionError("texts were embedded before the artifact path was checked")


def _rows(n: int = 10):
    return rows_from_examples("topics.jsonl", topic_examples(n), "auto")


def _user_things(tmp_path: Path) -> dict[str, Path]:
    """What a mistyped cluster_artifact may point at: a user's folder, a file, the data."""
    folder = tmp_path / "data" / "mydata"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"instruction": "mine"}\n')
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("keep me")
    afile = tmp_path / "results.csv"
    afile.write_text("a,b\n1,2\n")
    data = tmp_path / "data" / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in topic_examples(10)))
    damaged = tmp_path / "damaged"  # looks like an artifact, but its metadata is not ours
    damaged.mkdir()
    (damaged / "metadata.json").write_text('{"author": "me"}')
    return {"folder": folder, "file": afile, "data": data, "foreign metadata": damaged}


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    run_clustering(_rows(), tmp_path / "art", 3, fake_options(tmp_path), FakeEncoder(),
                   progress=False)
    return tmp_path / "art"


# ---- item 1: only an earlier artifact is replaced ---------------------------------------------
@pytest.mark.parametrize("what", ["folder", "file", "data", "foreign metadata"])
def test_clustering_never_replaces_what_is_not_an_artifact(tmp_path: Path, what: str) -> None:
    target = _user_things(tmp_path)[what]
    before, hidden = _tree(target), _hidden(target.parent)
    with pytest.raises(ClusterArtifactError, match=rf"{target} already exists and is not a "
                       "cluster artifact .*nothing was done. Point moce.cluster_artifact"):
        run_clustering(_rows(), target, 3, fake_options(tmp_path), NoEncoder(), progress=False)
    assert _tree(target) == before and _hidden(target.parent) == hidden


def test_cluster_command_refuses_before_loading_the_data(tmp_path: Path, monkeypatch,
                                                          capsys) -> None:
    target = _user_things(tmp_path)["folder"]
    before = _tree(target)

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the artifact path was checked")

    monkeypatch.setattr(cluster_cli, "rows_from_yaml", no_data)
    cfg = tmp_path / "moce.yml"
    cfg.write_text(yaml.safe_dump({"datasets": [{"path": "x.jsonl", "type": "alpaca"}],
                                   "moce": {"num_clusters": 3, "cluster_artifact": str(target)}}))
    assert cluster_cli.main([str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {target} already exists and is not a "
                                               "cluster artifact (a folder of 2 entries")
    assert _tree(target) == before


def test_clustering_replaces_an_earlier_artifact_or_an_empty_folder(tmp_path: Path,
                                                                     artifact: Path) -> None:
    new = run_clustering(_rows(), artifact, 2, fake_options(tmp_path), FakeEncoder(),
                         progress=False)
    assert new.num_clusters == 2 == ClusterModel.load(artifact).num_clusters
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_clustering(_rows(), empty, 2, fake_options(tmp_path), FakeEncoder(),
                          progress=False).num_clusters == 2
    assert _hidden(tmp_path) == []


def test_a_link_to_an_artifact_stays_a_link(tmp_path: Path, artifact: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(artifact)
    run_clustering(_rows(), link, 2, fake_options(tmp_path), FakeEncoder(), progress=False)
    assert link.is_symlink() and ClusterModel.load(artifact).num_clusters == 2


def test_training_refuses_an_artifact_that_is_a_file(tmp_path: Path) -> None:
    afile = _user_things(tmp_path)["file"]
    with pytest.raises(ClusterArtifactError, match=f"cluster artifact {afile} is a file"):
        ClusterModel.load(afile)


def test_output_artifact_copy_replaces_only_an_earlier_copy(tmp_path: Path,
                                                             artifact: Path) -> None:
    out = tmp_path / "run"
    copy_cluster_artifact(artifact, out)  # new
    copy_cluster_artifact(artifact, out)  # an earlier copy: replaced
    assert ClusterModel.load(out / ARTIFACT_DIR_NAME).fingerprint == \
        ClusterModel.load(artifact).fingerprint
    mine = out / ARTIFACT_DIR_NAME
    for p in mine.iterdir():
        p.unlink()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ClusterArtifactError, match=f"{mine} already exists and is not a "
                       "cluster artifact .* choose another output_dir"):
        check_artifact_copy_target(artifact, out)
    with pytest.raises(ClusterArtifactError, match="choose another output_dir"):
        copy_cluster_artifact(artifact, out)
    assert (mine / "notes.txt").read_text() == "mine" and _hidden(out) == []


def test_training_refuses_a_foreign_cluster_artifact_folder_before_loading(tmp_path: Path,
                                                                           artifact: Path):
    from axolotl.utils.dict import DictDefault

    from moce_plugin.integration.plugin import MoCEPlugin

    out = tmp_path / "run"
    (out / ARTIFACT_DIR_NAME).mkdir(parents=True)
    (out / ARTIFACT_DIR_NAME / "notes.txt").write_text("mine")
    cfg = DictDefault(moce={"cluster_artifact": str(artifact)}, output_dir=str(out),
                      model_config_type="llama")
    with pytest.raises(ClusterArtifactError, match="choose another output_dir"):
        MoCEPlugin().load_datasets(cfg, preprocess=False)
    (out / ARTIFACT_DIR_NAME / "notes.txt").unlink()  # empty: fine
    MoCEPlugin().load_datasets(cfg, preprocess=False)


def test_atomic_dir_failure_keeps_the_earlier_artifact(tmp_path: Path, artifact: Path) -> None:
    from moce_plugin.clustering.artifact import ARTIFACT_KIND

    before = _tree(artifact)

    def boom(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_dir(artifact, boom, ARTIFACT_KIND)
    assert _tree(artifact) == before and _hidden(tmp_path) == []


# ---- item 14: the user's umask, not mkdtemp's 0700 ---------------------------------------------
@pytest.fixture
def umask():
    def set_umask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    os.umask(old)
    yield set_umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "want"), [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_written_folders_follow_the_umask(tmp_path: Path, umask, mask: int, want: int) -> None:
    umask(mask)
    art = run_clustering(_rows(), tmp_path / "art", 3, fake_options(tmp_path), FakeEncoder(),
                         progress=False).path
    assert _mode(art) == want
    art.chmod(0o700)  # an artifact made private (or by an older version): its copy still follows
    copy = copy_cluster_artifact(art, tmp_path / "run")
    assert _mode(copy) == want and _mode(tmp_path / "run") == want


# ---- item 15: a killed run's temporaries are removed by the next run --------------------------
def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _leftover(parent: Path, name: str, mtime: float | None = None) -> Path:
    path = parent / name
    path.mkdir()
    (path / "centroids.npy").write_bytes(b"half")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_stale_temporaries_of_the_target_are_removed_and_nothing_else(tmp_path: Path) -> None:
    from moce_plugin.utils import _HOST

    dead, live = _dead_pid(), os.getppid()
    stale = [
        _leftover(tmp_path, f".art.tmp-{_HOST}-{dead}-0123abcd"),  # its process is gone
        _leftover(tmp_path, f".art.tmp-{_HOST}-{live}-0123abcd", mtime=946684800),  # pid reused
        _leftover(tmp_path, ".art.tmp-k3x_9a2z", mtime=946684800),  # an older version's name
    ]
    kept = [
        _leftover(tmp_path, f".art.tmp-{_HOST}-{live}-4567abcd"),  # a run still writing
        _leftover(tmp_path, f".art.tmp-otherhost-{dead}-0123abcd"),  # pid not checkable here
        _leftover(tmp_path, f".arty.tmp-{_HOST}-{dead}-0123abcd"),  # another target's
        _leftover(tmp_path, ".art.tmp-mine"),  # not a name the package writes
        _leftover(tmp_path, f".art.old-{_HOST}-{dead}-0123abcd"),  # the only earlier artifact
    ]
    run_clustering(_rows(), tmp_path / "art", 3, fake_options(tmp_path), FakeEncoder(),
                   progress=False)
    assert [p.exists() for p in stale] == [False] * 3
    assert [p.exists() for p in kept] == [True, True, True, True, False]  # .old-: superseded


def test_a_run_killed_while_writing_is_cleaned_up_by_the_next(tmp_path: Path,
                                                               artifact: Path) -> None:
    before = _tree(artifact)
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from moce_plugin.clustering.artifact import ARTIFACT_KIND\n"
        "from moce_plugin.utils import atomic_dir\n"
        "def fill(tmp):\n"
        "    (tmp / 'centroids.npy').write_bytes(b'half')\n"
        "    print('filling', flush=True)\n"
        "    time.sleep(60)\n"
        f"atomic_dir(Path({str(artifact)!r}), fill, ARTIFACT_KIND)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "filling"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p for p in _hidden(tmp_path) if p.startswith(".art.tmp-")]
    assert _tree(artifact) == before  # the earlier artifact is intact
    run_clustering(_rows(), artifact, 2, fake_options(tmp_path), FakeEncoder(), progress=False)
    assert _hidden(tmp_path) == [] and ClusterModel.load(artifact).num_clusters == 2
