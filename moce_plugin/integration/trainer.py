"""Hooks MoCE into whatever trainer axolotl built (no trainer subclass needed).

* the load-balancing loss is added to the training loss after the trainer's own
  ``compute_loss`` (so it composes with axolotl's trainers), scaled for gradient
  accumulation exactly like the language-modelling loss;
* routing metrics (aux loss, router entropy, expert-load imbalance per layer) are added
  to the trainer's normal logs; full expert-load matrices go to
  ``<output_dir>/moce_routing.jsonl``;
* the data collators are wrapped to carry ``moce_cluster_ids``;
* every checkpoint gets ``moce_config.json`` and ``moce_weights.safetensors``
  (:func:`moce_plugin.outputs.folder.save_moce_files`).
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..model.config import MoCEConfig
from ..model.routing import CLUSTER_IDS_KWARG, aux_loss_of
from ..model.wrappers import metrics_of, pop_last_routing
from ..outputs.folder import ROUTING_LOG_NAME, save_moce_files, saved_meta
from ..utils import give_weights_new_file_mode
from .datasets import MoCEDataCollator
from .preference import is_preference_trainer, wrap_preference_collators


def attach_moce_to_trainer(trainer: Any, config: MoCEConfig) -> None:
    if getattr(trainer, "_moce_attached", False):
        return
    trainer._moce_attached = True
    _add_aux_loss(trainer, config.router_aux_loss_coef)
    _add_routing_logs(trainer)
    _keep_layer_metrics_off_console(trainer)
    if is_preference_trainer(trainer):
        # Rows carry their cluster column; the preference collator spreads it per token.
        wrap_preference_collators(trainer, config.cluster_column)
        _keep_cluster_id_column(trainer, config.cluster_column)
        return
    _wrap_collators(trainer)
    _keep_cluster_id_column(trainer)


def _add_aux_loss(trainer: Any, coef: float) -> None:
    original = trainer.compute_loss

    def compute_loss(self: Any, model: Any, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None, **kwargs: Any):
        result = original(model, inputs, return_outputs=return_outputs,
                          num_items_in_batch=num_items_in_batch, **kwargs)
        records = pop_last_routing(model)
        aux = aux_loss_of(records) if model.training and coef > 0 else None
        if aux is None:
            return result
        aux = aux * coef
        # The trainer divides the loss by the accumulation steps itself unless the model
        # normalises by num_items_in_batch; then we must (transformers' training_step rule).
        if (
            getattr(self, "model_accepts_loss_kwargs", False)
            and num_items_in_batch is not None
            and getattr(self, "compute_loss_func", None) is None
        ):
            aux = aux / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
        if return_outputs:
            loss, outputs = result
            return loss + aux.to(loss.dtype), outputs
        return result + aux.to(result.dtype)

    trainer.compute_loss = types.MethodType(compute_loss, trainer)


#: Per-layer metrics go to the trackers (wandb, tensorboard, ...) and trainer_state.json, not
#: to the console, which shows the aggregate (aux loss, router entropy, load imbalance).
LAYER_METRIC_PREFIX = "moce/layer_"


def _reduce_across_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            world = torch.distributed.get_world_size()
            out = []
            for t in tensors:
                t = t.clone()
                torch.distributed.all_reduce(t)
                out.append(t / world)
            return out
    return tensors


def routing_summary(metrics: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """(scalar logs, per-layer detail) from a RoutingMetrics accumulator; resets it."""
    if metrics is None or not metrics.steps:
        return {}, {}
    layers = sorted(metrics.load_sum)
    tensors = [metrics.aux_sum.float()]
    for i in layers:
        tensors += [metrics.load_sum[i].float(), metrics.tokens_sum[i].float(),
                    metrics.entropy_sum[i].float()]
        if i in metrics.general_load_sum:
            tensors.append(metrics.general_load_sum[i].float())
    tensors = [t.detach().cpu() for t in _reduce_across_ranks(tensors)]
    steps = metrics.steps
    logs: dict[str, float] = {"moce/aux_loss": float(tensors[0]) / steps}
    detail: dict[str, Any] = {"layers": {}}
    pos = 1
    entropies, imbalances = [], []
    for i in layers:
        load_sum, tokens, ent = tensors[pos], tensors[pos + 1], tensors[pos + 2]
        pos += 3
        general = None
        if i in metrics.general_load_sum:
            general = (tensors[pos] / steps).tolist()
            pos += 1
        load = load_sum / tokens.clamp(min=1)[:, None]  # [C, E] fraction of group slots
        num_experts = load.shape[-1]
        seen = tokens > 0
        # 1.0 = perfectly balanced; E = every slot on one expert.
        imbalance = float((load.max(-1).values[seen] * num_experts).mean()) if seen.any() else 0.0
        entropy = float(ent) / steps
        entropies.append(entropy)
        imbalances.append(imbalance)
        logs[f"{LAYER_METRIC_PREFIX}{i}/router_entropy"] = round(entropy, 5)
        logs[f"{LAYER_METRIC_PREFIX}{i}/load_imbalance"] = round(imbalance, 5)
        detail["layers"][str(i)] = {
            "expert_load": load.tolist(),
            "group_tokens": tokens.tolist(),
            "router_entropy": entropy,
            "general_load": general,
        }
    logs["moce/router_entropy"] = sum(entropies) / len(entropies)
    logs["moce/load_imbalance"] = sum(imbalances) / len(imbalances)
    metrics.reset()
    return logs, detail


def _add_routing_logs(trainer: Any) -> None:
    original = trainer.log

    def log(self: Any, logs: dict, *args: Any, **kwargs: Any):
        if "loss" in logs:
            extra, detail = routing_summary(metrics_of(self.model))
            logs.update(extra)
            if detail and self.is_world_process_zero():
                _append_routing_detail(self.args.output_dir, self.state.global_step, extra, detail)
        return original(logs, *args, **kwargs)

    trainer.log = types.MethodType(log, trainer)


def console_logs(logs: dict) -> dict:
    """What the console shows of a log entry: everything but the per-layer MoCE metrics."""
    return {k: v for k, v in logs.items() if not k.startswith(LAYER_METRIC_PREFIX)}


def _keep_layer_metrics_off_console(trainer: Any) -> None:
    """Wrap the callbacks that print logs (transformers' ProgressCallback/PrinterCallback) so
    they print the aggregate only; tracker callbacks still receive every metric."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    handler = getattr(trainer, "callback_handler", None)
    for callback in getattr(handler, "callbacks", []):
        if not isinstance(callback, (ProgressCallback, PrinterCallback)):
            continue
        if getattr(callback, "_moce_console", False):
            continue
        original = callback.on_log

        def on_log(args: Any, state: Any, control: Any, logs: dict | None = None,
                   _original: Any = original, **kwargs: Any) -> Any:
            return _original(args, state, control, logs=console_logs(logs or {}), **kwargs)

        callback.on_log = on_log
        callback._moce_console = True


def _append_routing_detail(output_dir: str, step: int, logs: dict, detail: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(Path(output_dir) / ROUTING_LOG_NAME, "a") as f:
        f.write(json.dumps({"step": step, "aux_loss": logs.get("moce/aux_loss"), **detail}) + "\n")


def _wrap_collators(trainer: Any) -> None:
    tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    side = getattr(tokenizer, "padding_side", "right") or "right"
    for attr in ("data_collator", "eval_data_collator"):
        inner = getattr(trainer, attr, None)
        if inner is not None and not isinstance(inner, MoCEDataCollator):
            setattr(trainer, attr, MoCEDataCollator(inner, padding_side=side))


def _keep_cluster_id_column(trainer: Any, column: str = CLUSTER_IDS_KWARG) -> None:
    """HF's remove_unused_columns drops columns not in forward's signature."""
    setter = getattr(trainer, "_set_signature_columns_if_needed", None)
    if callable(setter):
        setter()
        cols = trainer._signature_columns
        if cols is not None and column not in cols:
            cols.append(column)


class MoCECheckpointCallback(TrainerCallback):
    """Adds the MoCE files to every checkpoint the trainer writes."""

    def __init__(self, config: MoCEConfig, meta: dict | None = None) -> None:
        self.config = config
        self.meta = meta

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if model is None:
            return control
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # every rank gathers (sharded setups), the main process writes
        save_moce_files(model, self.config, checkpoint,
                        saved_meta(self.meta, "checkpoint", state.global_step),
                        write=state.is_world_process_zero)
        if state.is_world_process_zero:
            give_weights_new_file_mode(checkpoint)  # the trainer's model/adapter weights
        return control
