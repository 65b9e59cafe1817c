"""One home per concept: the MoCE module name, the sharded gather, chat roles, per-thread
values, and the old ``model.upcycle`` import names."""

from __future__ import annotations

import threading

import torch
from tiny_models import tiny_causal_lm

from moce_plugin.clustering.text import chat_messages, request_text
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.routing import current_thread_value, thread_value
from moce_plugin.model.state_dict import full_tensor
from moce_plugin.model.upcycle import MOCE_MODULE_NAME, upcycle_model
from moce_plugin.model.wrappers import moce_layers


def test_module_name_is_the_layers_attribute_and_the_trainable_set():
    model = upcycle_model(tiny_causal_lm("llama"),
                          MoCEConfig(num_clusters=2, experts_per_group=2, top_k=1))
    layers = list(moce_layers(model))
    assert layers and all(hasattr(m, MOCE_MODULE_NAME) for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{MOCE_MODULE_NAME}." in n for n in trainable)


def test_full_tensor_is_detached_and_gathers_dtensor_like_shards():
    p = torch.nn.Parameter(torch.ones(2))
    out = full_tensor(p)
    assert not out.requires_grad and torch.equal(out, p.data)

    class Sharded(torch.Tensor):  # stands in for an FSDP2 DTensor
        def full_tensor(self) -> torch.Tensor:
            return torch.arange(4.0, requires_grad=True)

    gathered = full_tensor(torch.zeros(2).as_subclass(Sharded))
    assert torch.equal(gathered, torch.arange(4.0)) and not gathered.requires_grad


def test_chat_messages_normalise_both_spellings():
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
             {"role": "User", "content": "again"}, "not a turn"]
    assert chat_messages(turns) == [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "yo"},
                                    {"role": "user", "content": "again"}]
    assert request_text({"conversations": turns}) == "hi\nagain"


def test_thread_values_are_per_thread_and_restored():
    seen = []
    with thread_value("k", "outer"):
        with thread_value("k", "inner"):
            assert current_thread_value("k") == "inner"
            worker = threading.Thread(target=lambda: seen.append(current_thread_value("k")))
            worker.start()
            worker.join()
        assert current_thread_value("k") == "outer"
    assert current_thread_value("k") is None and seen == [None]


def test_old_upcycle_names_still_import():
    from moce_plugin.model import upcycle

    for name in ("RoutingMetrics", "aux_loss_of", "config_of", "find_backbone", "is_moce_model",
                 "load_moce_state_dict", "metrics_of", "moce_experts_modules", "moce_layers",
                 "moce_state_dict", "pop_last_routing", "validate_cluster_ids",
                 "cast_moce_parameters"):
        assert callable(getattr(upcycle, name)), name
