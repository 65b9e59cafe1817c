"""Options users rely on, each with its effect checked: the aux-loss coefficient (and its
gradient-accumulation scaling), the logged routing values, a custom cluster column,
train_base_model, and register_architecture."""

from __future__ import annotations

import json
import types

import pytest
import torch
import yaml
from axolotl_helpers import base_config, sample_rows
from tiny_models import tiny_causal_lm

from moce_plugin import ArchitectureSpec, register_architecture
from moce_plugin.integration import trainer as moce_trainer
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.routing import CLUSTER_IDS_KWARG, RoutingRecord
from moce_plugin.model.upcycle import RoutingMetrics, is_moce_model, upcycle_model


class _Model(torch.nn.Module):
    training = True


def _record(aux: float) -> RoutingRecord:
    return RoutingRecord(layer_index=0, aux_loss=torch.tensor(aux), expert_load=None,
                         group_tokens=None, entropy=None)


@pytest.mark.parametrize("accepts_loss_kwargs,accumulation,expected", [
    (False, 4, 1.0 + 0.25 * 2.0),  # the trainer divides the whole loss by 4 itself
    (True, 4, 1.0 + 0.25 * 2.0 / 4),  # the model normalises: we divide the aux part
])
def test_aux_loss_coefficient_is_applied_and_scaled(monkeypatch, accepts_loss_kwargs,
                                                    accumulation, expected):
    fake = types.SimpleNamespace(
        compute_loss=lambda model, inputs, **kw: torch.tensor(1.0),
        model_accepts_loss_kwargs=accepts_loss_kwargs, compute_loss_func=None,
        current_gradient_accumulation_steps=accumulation,
    )
    monkeypatch.setattr(moce_trainer, "pop_last_routing", lambda model: [_record(2.0)])
    moce_trainer._add_aux_loss(fake, coef=0.25)
    loss = fake.compute_loss(_Model(), {}, num_items_in_batch=torch.tensor(10))
    assert float(loss) == pytest.approx(expected)


def test_logged_load_imbalance_and_entropy_values():
    metrics = RoutingMetrics()
    metrics.update([RoutingRecord(
        layer_index=3, aux_loss=torch.tensor(1.5),
        expert_load=torch.tensor([[1.0, 0.0], [0.5, 0.5]]), group_tokens=torch.tensor([10., 30.]),
        entropy=torch.tensor(0.4))])
    logs, detail = moce_trainer.routing_summary(metrics)
    # imbalance = mean over groups of E * max share = (2 * 1.0 + 2 * 0.5) / 2
    assert logs["moce/load_imbalance"] == pytest.approx(1.5)
    assert logs["moce/layer_3/load_imbalance"] == pytest.approx(1.5)
    assert logs["moce/router_entropy"] == pytest.approx(0.4)
    assert logs["moce/aux_loss"] == pytest.approx(1.5)
    assert detail["layers"]["3"]["group_tokens"] == [10.0, 30.0]
    assert metrics.steps == 0  # read and reset


def test_custom_cluster_column_is_used(tmp_path, model_dir):
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets

    data = tmp_path / "d.jsonl"
    domain = {"alpaca": 2, "code_alpaca": 0, "gsm8k": 1}
    data.write_text("\n".join(json.dumps({**r, "domain": domain[r["source"]]})
                              for r in sample_rows(30)))
    cfg = base_config(model_dir, data, tmp_path, val_set_size=0, sequence_len=1024)
    cfg["moce"]["cluster_column"] = "domain"
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    meta = load_datasets(cfg=load_cfg(str(tmp_path / "c.yml")))
    ids = sorted(row[0] for row in meta.train_dataset[CLUSTER_IDS_KWARG])
    assert ids == sorted(domain[r["source"]] for r in sample_rows(30))


@pytest.mark.parametrize("train_base", [False, True])
def test_train_base_model_unfreezes_the_base(train_base):
    from moce_plugin.integration.plugin import MoCEPlugin

    model = tiny_causal_lm("llama")
    cfg = {"moce": {"num_clusters": 2, "train_base_model": train_base}, "adapter": None}
    MoCEPlugin().post_model_build(cfg, model)
    base = [p.requires_grad for n, p in model.named_parameters() if "moce_experts" not in n]
    moce = [p.requires_grad for n, p in model.named_parameters() if "moce_experts" in n]
    assert all(moce) and moce
    assert all(base) if train_base else not any(base)


def test_register_architecture_adds_a_family(monkeypatch):
    from moce_plugin.model import architectures

    # the family registered here must not outlive the test (other tests list the families)
    monkeypatch.setattr(architectures, "_REGISTRY", dict(architectures._REGISTRY))
    model = tiny_causal_lm("llama")
    model.config.model_type = "my_llama_fork"
    with pytest.raises(ValueError, match="does not support model_type 'my_llama_fork'"):
        upcycle_model(model, MoCEConfig(num_clusters=2))
    register_architecture(ArchitectureSpec("my_llama_fork", layers_path="model.layers"))
    upcycle_model(model, MoCEConfig(num_clusters=2))
    assert is_moce_model(model)
    ids = torch.randint(0, 100, (1, 5))
    model(input_ids=ids, **{CLUSTER_IDS_KWARG: torch.tensor([1])})


def test_pre_tokenized_dataset_gets_per_token_ids(tmp_path, model_dir):
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = tmp_path / "tok.jsonl"
    rows = []
    for i, r in enumerate(sample_rows(24)):
        ids = tok(r["instruction"] + " " + r["output"])["input_ids"][:64]
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids),
                     "cluster_id": i % 3})
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = base_config(model_dir, data, tmp_path, val_set_size=0)
    cfg["datasets"] = [{"path": str(data), "ds_type": "json"}]  # no type: pre-tokenized
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    meta = load_datasets(cfg=load_cfg(str(tmp_path / "c.yml")))
    by_tokens = {tuple(r["input_ids"]): r["cluster_id"] for r in rows}
    for row in meta.train_dataset:
        assert row[CLUSTER_IDS_KWARG] == [by_tokens[tuple(row["input_ids"])]] * len(
            row["input_ids"])
    assert len(meta.train_dataset) == 24


# ---- the remote code of exported folders ----------------------------------------------------
# Written verbatim by 0.1.x exports (before moce_plugin.hf existed): folders on disk and on the
# Hub carry these files, so the path they import must keep working.
_CONFIG_CODE_0_1 = '''"""MoCE (moce-plugin) configuration; base family: llama."""

try:
    from moce_plugin.outputs.hf_native import moce_config_class
except ImportError as exc:  # the classes live in the package, versioned with it
    raise ImportError("pip install moce-plugin") from exc

MoCEConfig = moce_config_class("llama")
'''
_MODELING_CODE_0_1 = '''"""MoCE (moce-plugin) model; base family: llama."""

from .configuration_moce import MoCEConfig

try:
    from moce_plugin.outputs.hf_native import moce_causal_lm_class
except ImportError as exc:  # the classes live in the package, versioned with it
    raise ImportError("pip install moce-plugin") from exc

MoCEForCausalLM = moce_causal_lm_class(MoCEConfig)
'''


def _remote_code(tmp_path, monkeypatch, package: str, config_code: str, modeling_code: str):
    """Import an export's two remote-code files as transformers does (a package, relative
    import of the config), without a model folder."""
    import importlib

    pkg = tmp_path / package
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "configuration_moce.py").write_text(config_code)
    (pkg / "modeling_moce.py").write_text(modeling_code)
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(f"{package}.modeling_moce")


@pytest.mark.parametrize("written_by", ["current", "0.1.x"])
def test_export_remote_code_builds_a_moce_model(tmp_path, monkeypatch, written_by):
    from tiny_models import TINY_KWARGS
    from transformers import LlamaForCausalLM

    from moce_plugin.outputs.hf_export import CONFIG_CODE, MODELING_CODE
    from moce_plugin.outputs.hf_native import MoCECausalLMMixin

    if written_by == "current":
        config_code, modeling_code = (CONFIG_CODE.format(base="llama"),
                                      MODELING_CODE.format(base="llama"))
        # New exports import the documented stable path, never the internal module.
        for code in (config_code, modeling_code):
            assert "from moce_plugin.hf import " in code and "hf_native" not in code
    else:
        config_code, modeling_code = _CONFIG_CODE_0_1, _MODELING_CODE_0_1
    remote = _remote_code(tmp_path, monkeypatch, f"moce_export_{written_by.replace('.', '_')}",
                          config_code, modeling_code)
    config = remote.MoCEConfig(**TINY_KWARGS, moce={"num_clusters": 2, "adapter_dim": 4},
                               moce_base_model_type="llama")
    assert config.model_type == "moce"
    model = remote.MoCEForCausalLM(config)
    assert isinstance(model, LlamaForCausalLM) and isinstance(model, MoCECausalLMMixin)
    assert is_moce_model(model)
    out = model(input_ids=torch.randint(3, 100, (2, 5)),
                **{CLUSTER_IDS_KWARG: torch.tensor([0, 1])})
    assert out.logits.shape == (2, 5, TINY_KWARGS["vocab_size"])


def test_stable_hf_path_is_the_implementation():
    import moce_plugin.hf as hf
    from moce_plugin.outputs import hf_native

    for name in hf.__all__:
        assert getattr(hf, name) is getattr(hf_native, name), name
