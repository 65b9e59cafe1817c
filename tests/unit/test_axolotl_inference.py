"""`axolotl inference` with a MoCE config (the model-loading side; the end-to-end run is in
tests/e2e/test_e2e_pipeline.py::test_axolotl_inference_and_evaluate_on_a_moce_output): the
plugin knows the model is loaded for inference, and a moce: block that contradicts the LoRA
output being loaded is refused before loading."""

from __future__ import annotations

import pytest
from axolotl.utils.dict import DictDefault
from test_inference import base_dir

from moce_plugin.errors import ConfigError
from moce_plugin.integration.inference import (
    check_inference_config,
    is_inference,
    wrap_model_loader_load,
)
from moce_plugin.model.config import MoCEConfig
from moce_plugin.outputs.folder import write_moce_config

__all__ = ["base_dir"]

TRAINED = dict(num_clusters=3, experts_per_group=2, top_k=2, adapter_dim=8)


class _Loader:
    """What the patch wraps: axolotl's ModelLoader with its ``inference`` flag."""

    def __init__(self, inference: bool) -> None:
        self.inference = inference
        self.seen: list[bool] = []

    def load(self, cfg):
        self.seen.append(is_inference(cfg))
        return "model"


@pytest.mark.parametrize("inference", [True, False])
def test_hooks_see_whether_the_loader_loads_for_inference(inference):
    loader = _Loader(inference)
    load = wrap_model_loader_load(_Loader.load)
    cfg = DictDefault({})  # config validation dropped `inference`
    assert load(loader, cfg) == "model"
    assert loader.seen == [inference]
    assert is_inference(cfg) is False  # only while loading


def test_a_moce_block_other_than_the_lora_outputs_is_refused(tmp_path):
    write_moce_config(tmp_path, MoCEConfig(**TRAINED), {})
    cfg = DictDefault({"lora_model_dir": str(tmp_path)})
    check_inference_config(cfg, MoCEConfig(**TRAINED))  # the same block: fine
    check_inference_config(cfg, MoCEConfig(**TRAINED, router_aux_loss_coef=0.5))  # training
    with pytest.raises(ConfigError, match=r"lora_model_dir .*top_k: output 2, YAML 1; "
                       r"adapter_dim: output 8, YAML 16.*moce\.top_k, moce\.adapter_dim"):
        check_inference_config(cfg, MoCEConfig(**{**TRAINED, "top_k": 1, "adapter_dim": 16}))
    check_inference_config(DictDefault({}), MoCEConfig(**{**TRAINED, "top_k": 1}))  # no output


@pytest.mark.parametrize("key", ["lora_model_dir", "base_model"])
def test_prompts_are_assigned_by_the_trained_outputs_artifact(tmp_path, base_dir, key):
    """The output's own artifact copy (or the artifact it recorded), not whatever the YAML's
    moce.cluster_artifact holds now: re-clustered since, it is refused."""
    import shutil

    from test_stale_state import _cluster, _output_with_artifact

    from moce_plugin.integration.inference import inference_cluster_model
    from moce_plugin.outputs.load import MoCELoadError

    out, art = _output_with_artifact(tmp_path, base_dir)
    cfg = DictDefault({key: str(out)})
    moce = MoCEConfig(**{**TRAINED, "cluster_artifact": str(art)})
    _cluster(art, 12)  # the YAML's artifact re-clustered after training
    assert inference_cluster_model(cfg, moce).path == out / "cluster_artifact"
    shutil.rmtree(out / "cluster_artifact")
    with pytest.raises(MoCELoadError, match="not the one this model was trained with"):
        inference_cluster_model(cfg, moce)
    assert inference_cluster_model(DictDefault({}), moce).path == art  # no trained folder
