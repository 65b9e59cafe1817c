"""MoCE models inside vLLM: vLLM's own class of the base family, each selected decoder
layer's MLP wrapped in :class:`~moce_plugin.model.layer.MoCEMLP` (vLLM's MLP as the frozen FFN,
the same routers / plans / expert ops as training and the Hugging Face path).

Per-request clusters inside continuous batching
-----------------------------------------------
vLLM flattens every scheduled token of every running request into one ``[tokens]`` batch
(prefill chunks and decode steps mixed). Its model runner knows, for that step, which request
each token belongs to (``req_indices``, filled by ``_prepare_inputs``) and each request's
state (``requests[req_id]``: the whole prompt's token ids and its ``SamplingParams``). The
model itself only sees tokens and positions, so :func:`install_runner_hook` wraps the runner's
``_model_forward`` (its documented override point): before each forward it maps every token
to its request's cluster. The model writes those ``[tokens]`` ids in place into one persistent
buffer that every MoCE layer reads (``MoCEMLP.token_ids``), so the graph vLLM compiles once
reads each step's ids, like vLLM's own LoRA index mapping; the expert plan is chosen at run
time inside that graph (``moce::inference_expert_outputs``).

A request's cluster is chosen once, the first time one of its tokens is scheduled, and kept
until it finishes: ``SamplingParams.extra_args["moce_cluster"]`` if the client gave one, else
from the WHOLE prompt's token ids (known to the runner even when the prompt is prefilled in
chunks) by the export's :class:`~.hf_native.ClusterAssigner`: decoded tokens ->
``clustering.text.prompt_request`` / ``request_text`` -> ``ClusterModel.assign_requests``, the
same function as training's lookup and the Hugging Face export.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.registry import _VLLM_MODELS
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from ..errors import MissingClusterIdsError
from ..model.cluster_ids import IGNORE_CLUSTER_ID, check_cluster_ids
from ..model.config import MoCEConfig
from ..model.layer import MoCEMLP
from ..model.routing import cluster_ids_context, collector_stack, current_cluster_ids
from .hf_native import (
    HAS_ARTIFACT_KEY,
    LOG_ENV,
    MOCE_KEY,
    ClusterAssigner,
    check_export_weights,
    log,
)
from .vllm_plugin import CLUSTER_ARG, VLLM_BASE_ARCHITECTURES

#: The key prefix of moce_weights.safetensors (see :mod:`~moce_plugin.model.state_dict`).
MOCE_FILE_PREFIX = "layers."


class MoCEVLLMMixin:
    """Mixed in before vLLM's ``*ForCausalLM`` of the base family."""

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        hf_config = vllm_config.model_config.hf_config
        moce = MoCEConfig(**getattr(hf_config, MOCE_KEY))
        layers = self.model.layers
        hidden = hf_config.hidden_size
        self.moce_layers = []
        for index in moce.resolve_layers(len(layers)):
            layer = layers[index]
            if not hasattr(layer, "mlp"):  # a pipeline stage's missing layer
                continue
            layer.mlp = MoCEMLP(layer.mlp, hidden, moce, index)
            self.moce_layers.append(index)
        self.moce_config = moce
        # Each step's per-token ids, written in place before the forward and read by every
        # MoCE layer as its first T entries: a compiled graph sees them (thread-local ids
        # would be fixed at trace time).
        self.moce_token_ids = torch.full(
            (vllm_config.scheduler_config.max_num_batched_tokens,), IGNORE_CLUSTER_ID,
            dtype=torch.long, device=vllm_config.device_config.device)
        for index in self.moce_layers:
            layers[index].mlp.token_ids = self.moce_token_ids
        folder = Path(vllm_config.model_config.model)
        if folder.is_dir():
            # The refusal of the Hugging Face path (NaN/inf or overwritten MoCE tensors, named),
            # before vLLM reads the weights in.
            check_export_weights(folder, self)
        self.moce_assigner = ClusterAssigner(folder if folder.is_dir() else None, moce.groups,
                                             bool(getattr(hf_config, HAS_ARTIFACT_KEY, False)))
        self._moce_clusters: dict[str, int] = {}
        if os.environ.get(LOG_ENV, "") not in ("", "0") and not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        install_runner_hook()

    # ---- clusters --------------------------------------------------------------------------
    def moce_request_cluster(self, req_id: str, state: Any) -> int:
        """The cluster of one request (chosen once, on its first scheduled token)."""
        cluster = self._moce_clusters.get(req_id)
        if cluster is not None:
            return cluster
        extra = getattr(state.sampling_params, "extra_args", None) or {}
        if extra.get(CLUSTER_ARG) is not None:
            cluster = int(check_cluster_ids(
                torch.tensor([int(extra[CLUSTER_ARG])]), self.moce_config.groups,
                fix=f": this model has {self.moce_config.groups} clusters: pass "
                    f"{CLUSTER_ARG} in [0, {self.moce_config.groups}), or leave it out to let "
                    "the model assign the prompt's cluster.")[0])
            if log.isEnabledFor(logging.INFO):
                log.info("moce cluster %d <- %s=%d (request %s)", cluster, CLUSTER_ARG, cluster,
                         req_id)
        else:
            prompt = state.prompt_token_ids
            if prompt is None:
                raise MissingClusterIdsError(
                    f"A MoCE request without prompt token ids (prompt embeddings) needs its "
                    f"cluster: pass SamplingParams(extra_args={{'{CLUSTER_ARG}': <id>}}) "
                    f"(OpenAI: extra_body={{'vllm_xargs': {{'{CLUSTER_ARG}': <id>}}}}).")
            cluster = int(self.moce_assigner.assign(torch.tensor([list(prompt)]), None)[0])
        self._moce_clusters[req_id] = cluster
        return cluster

    def moce_token_clusters(self, runner: Any, num_tokens: int) -> torch.Tensor:
        """``[num_tokens]`` cluster ids of this step's flattened tokens (padding: ignored)."""
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        per_request = np.array([self.moce_request_cluster(r, runner.requests[r])
                                for r in req_ids], dtype=np.int64)
        scheduled = int(runner.num_scheduled_tokens.np[:num_reqs].sum())
        ids = np.full(num_tokens, IGNORE_CLUSTER_ID, dtype=np.int64)
        ids[:scheduled] = per_request[runner.req_indices.np[:scheduled]]
        if len(self._moce_clusters) > 4 * max(num_reqs, 64):  # drop finished requests
            live = set(runner.requests)
            self._moce_clusters = {k: v for k, v in self._moce_clusters.items() if k in live}
        return torch.from_numpy(ids)

    def load_weights(self, weights: Any) -> Any:
        # An export holds the MoCE weights twice: in the model's own files (names as in this
        # module tree) and in moce_weights.safetensors (``layers.<i>.*``, what
        # load_moce_model reads); vLLM reads every *.safetensors, so the copy is skipped.
        return super().load_weights((name, tensor) for name, tensor in weights
                                    if not name.startswith(MOCE_FILE_PREFIX))

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                *args: Any, **kwargs: Any) -> Any:
        num_tokens = positions.shape[-1]
        ids = current_cluster_ids()
        buffer = self.moce_token_ids
        if num_tokens > buffer.shape[0]:
            raise MissingClusterIdsError(
                f"MoCE in vLLM: a step of {num_tokens} tokens, more than the "
                f"{buffer.shape[0]} of max_num_batched_tokens the model was built for (this "
                "vLLM version is not supported by moce_plugin).")
        if ids is None:
            # vLLM's own warm-up / profiling runs call the model directly: no requests,
            # every token runs the frozen FFN only.
            buffer[:num_tokens].fill_(IGNORE_CLUSTER_ID)
        elif ids.shape[0] != num_tokens:
            raise MissingClusterIdsError(
                f"MoCE in vLLM: {ids.shape[0]} cluster ids for {num_tokens} tokens (the model "
                "runner's layout changed; this vLLM version is not supported by moce_plugin).")
        else:
            buffer[:num_tokens].copy_(ids, non_blocking=True)
        with _moce_forward(buffer[:num_tokens]):
            return super().forward(input_ids, positions, *args, **kwargs)


@contextmanager
def _moce_forward(ids: torch.Tensor) -> Iterator[None]:
    """What the backbone hooks do around a Hugging Face forward: the ids, and a collector
    so each MoCE layer sees the previous layer's record (ACMoE) and runs as a forward."""
    stack = collector_stack()
    stack.append([])
    try:
        with cluster_ids_context(ids):
            yield
    finally:
        stack.pop()


def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    model = self.get_model()
    if not isinstance(model, MoCEVLLMMixin):
        return _ORIGINAL_MODEL_FORWARD(self, *args, **kwargs)
    positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
    ids = model.moce_token_clusters(self, positions.shape[-1])
    with cluster_ids_context(ids):
        return _ORIGINAL_MODEL_FORWARD(self, *args, **kwargs)


_ORIGINAL_MODEL_FORWARD = GPUModelRunner._model_forward


def install_runner_hook() -> None:
    """Wrap ``GPUModelRunner._model_forward`` (the CPU runner inherits it) once."""
    if GPUModelRunner._model_forward is not _model_forward:
        GPUModelRunner._model_forward = _model_forward


def _moce_class(base_arch: str) -> type:
    module_name, class_name = _VLLM_MODELS[base_arch]
    base = getattr(import_module(f"vllm.model_executor.models.{module_name}"), class_name)
    return type(f"MoCE{base_arch}", (MoCEVLLMMixin, base), {"__module__": __name__})


def __getattr__(name: str) -> type:
    """``MoCE<Base>ForCausalLM`` classes, built on first use (vLLM's registry imports
    ``moce_plugin.outputs.vllm_model:<name>``)."""
    for base_arch in VLLM_BASE_ARCHITECTURES.values():
        if name == f"MoCE{base_arch}":
            cls = _moce_class(base_arch)
            globals()[name] = cls
            return cls
    raise AttributeError(name)
