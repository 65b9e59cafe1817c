"""The moce: block is validated at config load with errors that name the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from moce_plugin.integration.args import MoCEArgs
from moce_plugin.model.config import MoCEConfig


def test_paper_defaults():
    cfg = MoCEConfig(num_clusters=4)
    assert (cfg.experts_per_group, cfg.top_k, cfg.adapter_dim, cfg.adapter_scaling) == (4, 2, 64, 1)
    assert cfg.num_general_experts == 0 and cfg.adapter_activation == "sigmoid"


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_clusters=0), "num_clusters must be >= 1"),
    (dict(num_clusters=2, top_k=5), "larger than moce.experts_per_group"),
    (dict(num_clusters=2, top_k=0), "top_k must be >= 1"),
    (dict(num_clusters=2, general_top_k=1), "num_general_experts is 0"),
    (dict(num_clusters=2, num_general_experts=1), "general top-k 2 exceeds"),
    (dict(), "num_clusters is required"),
    (dict(num_clusters=2, adapter_activation="swish2"), "adapter_activation"),
    (dict(num_clusters=2, router="attention"), "router"),
    (dict(num_clusters=2, experts_per_grop=3), "experts_per_grop"),
    (dict(num_clusters=2, layers=[]), "empty list"),
])
def test_bad_values_fail_clearly(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        MoCEConfig(**kwargs)


def test_layer_indices_checked_against_model():
    cfg = MoCEConfig(num_clusters=2, layers=[0, -1, 9])
    with pytest.raises(ValueError, match="has 4 decoder layers"):
        cfg.resolve_layers(4)
    assert MoCEConfig(num_clusters=2, layers=[0, -1]).resolve_layers(4) == [0, 3]


def test_axolotl_level_checks():
    with pytest.raises(ValidationError, match="adapter 'ia3' is not supported"):
        MoCEArgs.model_validate({"moce": {"num_clusters": 2}, "adapter": "ia3"})
    with pytest.raises(ValidationError, match="use_reentrant"):
        MoCEArgs.model_validate({"moce": {"num_clusters": 2}, "gradient_checkpointing": True,
                                 "gradient_checkpointing_kwargs": {"use_reentrant": True}})
    with pytest.raises(ValidationError, match="does not exist.*preprocess/cluster.py"):
        MoCEArgs.model_validate({"moce": {"cluster_artifact": "/nonexistent/artifact"}})


def test_gradient_checkpointing_defaults_to_non_reentrant():
    data = {"moce": {"num_clusters": 2}, "gradient_checkpointing": True}
    MoCEArgs.model_validate(data)
    assert data["gradient_checkpointing_kwargs"] == {"use_reentrant": False}


def test_config_round_trip(tmp_path):
    cfg = MoCEConfig(num_clusters=3, top_k="soft", num_general_experts=2, general_top_k=1)
    from moce_plugin.outputs.folder import read_meta, read_moce_config, write_moce_config

    write_moce_config(tmp_path, cfg, {"base_model": "x"})
    assert read_moce_config(tmp_path) == cfg
    assert read_meta(tmp_path) == {"base_model": "x"}
    with pytest.raises(FileNotFoundError, match="not a MoCE output"):
        read_moce_config(tmp_path / "nope")


@pytest.mark.parametrize("key,value", [
    ("rl", "grpo"), ("streaming", True), ("batch_flattening", True),
    ("tensor_parallel_size", 2), ("context_parallel_size", 2),
    ("pretraining_dataset", [{"path": "x"}]), ("activation_offloading", True),
])
def test_unsupported_axolotl_options_fail_with_reason(key, value):
    with pytest.raises(ValidationError, match=f"{key}.*(not supported|replaces)"):
        MoCEArgs.model_validate({"moce": {"num_clusters": 2}, key: value})
    MoCEArgs.model_validate({"moce": {"num_clusters": 2}, "tensor_parallel_size": 1})


@pytest.mark.parametrize("rl", ["grpo", "gdpo", "ebft"])
def test_rl_types_without_preference_rows_are_refused_alone(rl):
    with pytest.raises(ValidationError, match=r"rows are generated during training"):
        MoCEArgs.model_validate({"moce": {"num_clusters": 2}, "rl": rl})
    for ok in ("dpo", "ipo", "orpo", "kto"):
        MoCEArgs.model_validate({"moce": {"num_clusters": 2}, "rl": ok})


def test_precomputed_reference_log_probs_are_refused():
    with pytest.raises(ValidationError, match="precompute_ref_log_probs is not supported"):
        MoCEArgs.model_validate({"moce": {"num_clusters": 2}, "rl": "dpo",
                                 "precompute_ref_log_probs": True})


@pytest.mark.parametrize("clustering,match", [
    ({"kmax": 4}, r"unknown moce.clustering option\(s\) \['kmax'\]"),
    ({"algorithm": "dbscan"}, "algorithm must be one of"),
    ({"k_max": 0}, "k_max must be a positive integer"),
    ({"text_template": "no field"}, "names no field"),
    (["k_max", 4], "must be a mapping"),
])
def test_clustering_block_is_validated_at_config_load(clustering, match):
    with pytest.raises(ValueError, match=match):
        MoCEArgs.model_validate({"moce": {"num_clusters": 2, "clustering": clustering}})
    ok = {"moce": {"num_clusters": 2, "clustering": {"k_max": 4, "text_template": "{question}"}}}
    moce = MoCEArgs.model_validate(ok).moce
    assert moce.clustering.k_max == 4 and moce.clustering.text_template == "{question}"
    # Saved as the options the YAML set, so MoCEConfig (what outputs/ loads) reads it back.
    dumped = moce.model_dump(mode="json")
    assert dumped["clustering"] == {"k_max": 4, "text_template": "{question}"}
    assert MoCEConfig(**dumped).clustering == dumped["clustering"]


def test_clustering_typo_fails_axolotl_config_load(tmp_path, model_dir):
    """A typo such as `kmax: 4` must stop axolotl's own load_cfg, not be silently ignored."""
    import yaml
    from axolotl.cli.config import load_cfg
    from axolotl_helpers import base_config, write_cluster_jsonl

    data = write_cluster_jsonl(tmp_path / "d.jsonl", limit=10)
    cfg = base_config(model_dir, data, tmp_path)
    cfg["moce"]["clustering"] = {"kmax": 4}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(Exception, match="unknown moce.clustering option.*kmax"):
        load_cfg(str(tmp_path / "c.yml"))
