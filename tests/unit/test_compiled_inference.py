"""Inference through a graph compiled once for every token count (what vLLM does): the
per-token ids read from a persistent buffer (``MoCEMLP.token_ids``) and the expert plan chosen
at run time inside the graph (``moce::inference_expert_outputs``), against the eager layer fed
by the routing context; and when the vLLM plugin lets vLLM compile (``eager_reason``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

from moce_plugin.model import layer as layer_mod
from moce_plugin.model.cluster_ids import IGNORE_CLUSTER_ID
from moce_plugin.model.config import MoCEConfig
from moce_plugin.model.layer import MoCEMLP
from moce_plugin.model.plans import GATHER_MAX_SLOTS
from moce_plugin.model.routing import cluster_ids_context, collector_stack
from moce_plugin.outputs.vllm_plugin import eager_reason

D = 16
ROUTINGS = [
    pytest.param(dict(top_k=2), id="top2"),
    pytest.param(dict(top_k="soft"), id="soft"),
    pytest.param(dict(top_k=1, num_general_experts=2, general_top_k=1), id="V-top1-gen1"),
]


def _mlp(kwargs: dict) -> MoCEMLP:
    cfg = MoCEConfig(num_clusters=3, experts_per_group=4, adapter_dim=8, **kwargs)
    base = torch.nn.Linear(D, D)
    mlp = MoCEMLP(base, D, cfg, 0).eval()
    with torch.no_grad():
        mlp.moce_experts.up.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return mlp


def _ids(tokens: int, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 3, (tokens,), generator=torch.Generator().manual_seed(seed))
    ids[0] = IGNORE_CLUSTER_ID  # padding: the frozen FFN only
    return ids


def _in_forward(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` without autograd inside a backbone forward (a pushed routing collector),
    as a MoCE layer runs in a model."""
    with torch.no_grad():
        collector_stack().append([])
        try:
            return layer(x)
        finally:
            collector_stack().pop()


def _eager(mlp: MoCEMLP, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The reference: the layer fed by the routing context, as in every other path."""
    with cluster_ids_context(ids):
        return _in_forward(mlp, x)


def _expected_plan(kwargs: dict, tokens: int):
    """The few-token rule from the settings: gather below N slots, dense from N, the sorted
    (named tuple) plans above GATHER_MAX_SLOTS."""
    experts, general = 4, kwargs.get("num_general_experts", 0)
    slots = experts if kwargs["top_k"] == "soft" else kwargs["top_k"]
    slots += kwargs.get("general_top_k", 0) if general else 0
    n = 3 * experts + general
    if tokens * slots > GATHER_MAX_SLOTS:
        return "sorted"
    return "dense" if n <= tokens * slots else "gather"


@pytest.mark.parametrize("kwargs", ROUTINGS)
def test_token_ids_buffer_equals_the_routing_context_and_is_not_saved(kwargs):
    mlp = _mlp(kwargs)
    reference = copy.deepcopy(mlp)
    keys = set(mlp.state_dict())
    buffer = torch.full((64,), 2, dtype=torch.long)  # stale ids past T must not be read
    mlp.token_ids = buffer
    assert set(mlp.state_dict()) == keys
    for tokens in (1, 5, 40):
        ids = _ids(tokens, tokens)
        x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(tokens))
        buffer[:tokens] = ids
        got = _in_forward(mlp, x)
        torch.testing.assert_close(got, _eager(reference, x, ids), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", ROUTINGS)
def test_one_compiled_graph_chooses_each_calls_plan_at_run_time(kwargs, monkeypatch):
    """Traced once with a dynamic token count (first at 40 tokens, a sorted plan), the graph
    takes gather / dense / sorted by each later call's size and gives eager's outputs, with
    no recompilation."""
    plans = []
    real = layer_mod.expert_outputs

    def spy(experts, plan, h, *args):
        plans.append(("sorted" if isinstance(plan, tuple) else plan, h.shape[0]))
        return real(experts, plan, h, *args)

    monkeypatch.setattr(layer_mod, "expert_outputs", spy)
    torch._dynamo.reset()
    counters.clear()
    mlp = _mlp(kwargs)
    reference = copy.deepcopy(mlp)
    buffer = torch.full((64,), IGNORE_CLUSTER_ID, dtype=torch.long)
    mlp.token_ids = buffer
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True, dynamic=True)
    # (one token would be a second graph: torch specializes sizes 0 and 1)
    for step, tokens in enumerate((40, 2, 3, 8, 40, 17)):
        ids = _ids(tokens, 100 + step)
        x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(step))
        buffer[:tokens] = ids
        plans.clear()
        got = _in_forward(compiled, x)
        assert plans == [(_expected_plan(kwargs, tokens), tokens)], (tokens, plans)
        plans.clear()
        torch.testing.assert_close(got, _eager(reference, x, ids), atol=1e-6, rtol=1e-5)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1


def test_vllm_compiles_moce_on_the_cpu_except_acmoe():
    assert eager_reason({"router": "linear"}, "cpu") is None
    assert eager_reason({}, "cpu") is None
    assert "ACMoE" in eager_reason({"router": "acmoe"}, "cpu")
    assert "cuda" in eager_reason({"router": "linear"}, "cuda")


def test_a_copied_layer_runs_its_own_weights_in_the_compiled_op():
    """deepcopy (PEFT's modules_to_save, a DPO reference) gives the copy its own op key: a
    compiled copy whose experts changed must not run the original's."""
    torch._dynamo.reset()
    original = _mlp(dict(top_k=2))
    copied = copy.deepcopy(original)
    with torch.no_grad():
        copied.moce_experts.up.mul_(-1)
    tokens = 8
    ids = _ids(tokens, 7)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(7))
    want = _eager(copied, x, ids)
    copied.token_ids = ids.clone()
    compiled = torch.compile(copied, backend="aot_eager", fullgraph=True)
    got = _in_forward(compiled, x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(want, _eager(original, x, ids))
