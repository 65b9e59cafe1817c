"""The shipped example configs parse and their moce blocks validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moce_plugin.model.config import MoCEConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    cfg = yaml.safe_load(path.read_text())
    assert "moce_plugin.MoCEPlugin" in cfg["plugins"]
    moce = MoCEConfig(**cfg["moce"])
    assert moce.cluster_artifact, "examples take their clusters from preprocessing"
    assert cfg["datasets"]


def test_paper_example_matches_the_paper():
    cfg = yaml.safe_load((EXAMPLES[0].parent / "llama2-moce.yml").read_text())
    moce = MoCEConfig(**cfg["moce"])
    assert (moce.experts_per_group, moce.top_k, moce.adapter_dim, moce.adapter_scaling) == (
        4, 2, 64, 1.0)
    assert cfg["sequence_len"] == 512 and cfg["learning_rate"] == 2e-4
    assert cfg["num_epochs"] == 1 and cfg["micro_batch_size"] * 8 == 32
    assert cfg["base_model"] == "meta-llama/Llama-2-7b-chat-hf"
