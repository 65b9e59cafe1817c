"""Stage 1 on several processes, launched as users launch it:
``accelerate launch -m moce_plugin.clustering.cli CFG`` with 2 gloo (CPU) ranks.

The ranks use the cheap deterministic ``BagEncoder`` (swapped in by tests/cluster_site's
sitecustomize), so the artifacts can be compared exactly:

* 2 ranks write the same artifact as 1 process (assignments, k, metadata; centroids to float
  tolerance), and both ranks embedded a share;
* a rank killed mid-embedding, then a rerun: the rerun finishes, keeps the finished shards and
  encodes no text twice, and its artifact equals the 1-process one;
* ``accelerate launch -m axolotl.cli.preprocess CFG`` with the artifact missing: stage 1 on
  both ranks (the same artifact), then axolotl's prepared data set.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench.launch import module_command

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
TOPICS = {
    "math": "add numbers sum integer equation solve",
    "code": "python function loop list write program",
    "poem": "write verse rhyme moon love sonnet",
}
ROWS_PER_TOPIC = 16


def write_data(path: Path) -> int:
    rows = []
    for topic, words in TOPICS.items():
        vocab = words.split()
        for i in range(ROWS_PER_TOPIC):
            picked = " ".join(vocab[(i + j) % len(vocab)] for j in range(3))
            rows.append({"instruction": f"{topic} {picked} item{i}", "input": "",
                         "output": "ok", "source": topic})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def write_config(workdir: Path, data: Path) -> Path:
    cfg = workdir / "moce.yml"
    cfg.write_text(
        f"datasets:\n  - path: {data}\n    type: alpaca\n    ds_type: json\n"
        "moce:\n  num_clusters: auto\n  cluster_artifact: clusters\n"
        "  clustering:\n    k_max: 6\n    report: false\n    cache_dir: cache\n"
        "    batch_size: 4\n    cache_shard_rows: 4\n"
    )
    return cfg


def run_stage1(workdir: Path, nproc: int, module: str = "moce_plugin.clustering.cli",
               cfg: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    """The CLI under `accelerate launch` (nproc > 1: its torchrun launcher, gloo on CPU) or as
    one plain process."""
    cfg = cfg or write_config(workdir, workdir.parent / "data.jsonl")
    cmd = module_command(module, [str(cfg)], nproc)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "AXOLOTL_DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1", "MOCE_TEST_ENCODER": "bag",
           **extra_env}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS / "cluster_site"), str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.pop("ACCELERATE_USE_CPU", None)
    try:
        return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=480)
    except subprocess.TimeoutExpired as err:  # a hang at the barrier is a failure
        raise AssertionError(f"stage 1 on {nproc} processes did not finish in 480s") from err


def cache_keys(workdir: Path) -> list[str]:
    keys: list[str] = []
    for shard in sorted((workdir / "cache").glob("emb-*/shard-*.npz")):
        with np.load(shard) as data:
            keys += [k.decode() for k in data["keys"].tolist()]
    return keys


def assert_same_artifact(a: Path, b: Path) -> None:
    assert (a / "assignments.jsonl").read_text() == (b / "assignments.jsonl").read_text()
    np.testing.assert_allclose(np.load(a / "centroids.npy"), np.load(b / "centroids.npy"),
                               rtol=1e-5, atol=1e-6)
    meta_a, meta_b = (json.loads((p / "metadata.json").read_text()) for p in (a, b))
    for meta in (meta_a, meta_b):
        meta.pop("created")
        meta["kmeans"].pop("sse")
        meta["k_selection"].pop("sse")
        meta["k_selection"].pop("silhouette")
        meta.pop("silhouette")
        meta["files"].pop("centroids.npy")  # float-level differences allowed above
    assert meta_a == meta_b


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage1_dist")
    n = write_data(root / "data.jsonl")
    work = root / "one"
    work.mkdir()
    proc = run_stage1(work, 1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(cache_keys(work)) == n
    return work / "clusters"


def test_two_ranks_write_the_one_process_artifact(one_process: Path) -> None:
    work = one_process.parent.parent / "two"
    work.mkdir()
    proc = run_stage1(work, 2)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert_same_artifact(work / "clusters", one_process)
    # both ranks did a share of the work, and no text was embedded twice
    for rank in (0, 1):
        line = next(l for l in log.splitlines() if f"rank {rank}/2: embedded" in l)
        assert int(line.split("embedded ")[1].split()[0]) > 0, line
    keys = cache_keys(work)
    assert len(keys) == len(set(keys)) == 3 * ROWS_PER_TOPIC
    assert json.loads((work / "clusters" / "metadata.json").read_text())["num_clusters"] >= 2


def test_killed_rank_then_rerun_resumes(one_process: Path) -> None:
    work = one_process.parent.parent / "killed"
    work.mkdir()
    killed = run_stage1(work, 2, MOCE_TEST_KILL_RANK="1", MOCE_TEST_KILL_AFTER="2")
    assert killed.returncode != 0
    assert not (work / "clusters").exists()
    before = {p.name for p in (work / "cache").glob("emb-*/shard-*.npz")}
    assert before, "no shard was finished before the kill"
    assert len(cache_keys(work)) < 3 * ROWS_PER_TOPIC

    proc = run_stage1(work, 2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    after = {p.name for p in (work / "cache").glob("emb-*/shard-*.npz")}
    assert before < after  # the finished shards were kept, the rest added
    keys = cache_keys(work)
    assert len(keys) == len(set(keys)) == 3 * ROWS_PER_TOPIC  # nothing encoded twice
    assert_same_artifact(work / "clusters", one_process)


def test_axolotl_preprocess_under_accelerate_launch(one_process: Path, tiny_model_dir) -> None:
    """`accelerate launch -m axolotl.cli.preprocess CFG` on 2 gloo ranks with the artifact
    missing: the plugin runs stage 1 on both ranks (the one-process artifact), then axolotl
    prepares the data set on the same launch."""
    import yaml
    from axolotl_helpers import base_config

    work = one_process.parent.parent / "preprocess"
    work.mkdir()
    clustering = yaml.safe_load(write_config(work, work.parent / "data.jsonl").read_text())
    cfg = base_config(tiny_model_dir, work.parent / "data.jsonl", work, val_set_size=0)
    cfg["moce"] = {**cfg["moce"], **clustering["moce"]}
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_stage1(work, 2, module="axolotl.cli.preprocess", cfg=path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert_same_artifact(work / "clusters", one_process)
    assert any(p.is_dir() for p in (work / "prepared").iterdir())
