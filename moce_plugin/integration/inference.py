"""``axolotl inference`` (and its ``--chat`` / ``--gradio``) with a MoCE config.

axolotl loads the model through the plugin's hooks, then calls ``model.generate`` with token
ids only. The plugin gives that model the export's prompt -> cluster assignment
(:func:`moce_plugin.outputs.hf_native.attach_prompt_clusters`): each prompt's cluster comes
from the trained model's cluster artifact by the request-text rule of training, the same
cluster ``moce-generate``, an export and vLLM give it; a chat's KV cache is reused across
turns only while the conversation stays in one cluster.

The trained model is ``lora_model_dir`` (LoRA/QLoRA outputs) or ``base_model`` (a full MoCE
output, checkpoint or export; see :mod:`.continuation`). A ``moce:`` block that contradicts
the LoRA output's recorded one is refused before loading, as for a resumed run.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..model.config import MoCEConfig
from ..outputs.folder import MOCE_CONFIG_NAME, read_meta, read_moce_config
from ..utils import describe_difference
from .continuation import MODEL_KEYS, moce_source

# True while axolotl's ModelLoader loads a model for inference (set by the patch below).
_LOADING_FOR_INFERENCE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "moce_loading_for_inference", default=False)


def wrap_model_loader_load(original: Callable) -> Callable:
    """``ModelLoader.load`` telling the plugin's hooks whether the model is for inference
    (``ModelLoader(..., inference=True)``: config validation drops ``cfg.inference``)."""

    @functools.wraps(original)
    def load(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _LOADING_FOR_INFERENCE.set(bool(getattr(self, "inference", False)))
        try:
            return original(self, *args, **kwargs)
        finally:
            _LOADING_FOR_INFERENCE.reset(token)

    return load


def is_inference(cfg: Any) -> bool:
    """Whether axolotl is loading the model for inference (``axolotl inference``)."""
    return _LOADING_FOR_INFERENCE.get() or bool(cfg.get("inference"))


def _lora_output(cfg: Any) -> Path | None:
    folder = cfg.get("lora_model_dir")
    if folder and (Path(str(folder)) / MOCE_CONFIG_NAME).is_file():
        return Path(str(folder))
    return None


def check_inference_config(cfg: Any, moce: MoCEConfig) -> None:
    """Refuse, before loading, a ``moce:`` block whose model-defining keys differ from those
    the LoRA output in ``lora_model_dir`` was trained with: the adapter would fail to load
    (another shape) or another model would answer (``top_k``, the activation, ...)."""
    folder = _lora_output(cfg)
    if folder is None:
        return
    trained = read_moce_config(folder).model_dump(mode="json")
    given = moce.model_dump(mode="json")
    diff = {k: (trained.get(k), given.get(k)) for k in MODEL_KEYS
            if trained.get(k) != given.get(k)}
    if diff:
        raise ConfigError(
            f"lora_model_dir {folder}: the YAML's moce: block differs from the one this output "
            f"was trained with ({describe_difference(diff, 'output')}). Set moce."
            f"{', moce.'.join(diff)} to the values in {folder / MOCE_CONFIG_NAME}, or use the "
            "YAML that trained it."
        )


def _trained_folder(cfg: Any) -> tuple[Path, dict] | None:
    """The trained model's folder and its recorded meta (a checkpoint's from its run)."""
    lora = _lora_output(cfg)
    if lora is not None:
        return lora, read_meta(lora)
    source = moce_source(cfg.get("base_model"))
    return (source.folder, source.meta) if source is not None else None


def inference_cluster_model(cfg: Any, moce: MoCEConfig) -> Any:
    """The cluster artifact that assigns prompts: the trained folder's own copy (or the
    artifact it recorded, by fingerprint, as :func:`~moce_plugin.load_moce_model` finds it),
    else the YAML's ``moce.cluster_artifact``; None without one."""
    from ..outputs.hf_native import ENCODER_DIR_NAME
    from ..outputs.load import output_cluster_model

    trained = _trained_folder(cfg)
    if trained is not None:
        folder, meta = trained
        model = output_cluster_model(folder, moce, None, meta)
        if model is not None and (folder / ENCODER_DIR_NAME).is_dir():
            model.set_encoder_path(str(folder / ENCODER_DIR_NAME))  # an export's own copy
        return model
    if moce.cluster_artifact:
        from .args import cluster_model_of

        return cluster_model_of(moce)
    return None


def attach_inference_clusters(cfg: Any, moce: MoCEConfig, model: Any) -> None:
    """Make ``model.generate`` assign each prompt's cluster (see the module docstring)."""
    from axolotl.cli.utils.load import resolve_chat_template_str
    from axolotl.loaders import load_tokenizer

    from ..outputs.hf_native import attach_prompt_clusters

    cluster_model = inference_cluster_model(cfg, moce)
    if cluster_model is None and moce.groups > 1:
        raise ConfigError(
            "axolotl inference: this MoCE model has no cluster artifact (it was trained on a "
            f"{moce.cluster_column!r} column), so a prompt can't be given a cluster. Choose "
            "the cluster yourself: `moce-generate OUTPUT_DIR --cluster ID --prompt ...`."
        )
    if cluster_model is not None:
        cluster_model.check_num_clusters(moce.groups)
    tokenizer = load_tokenizer(cfg)
    # The template axolotl renders chats with (the YAML's or the first dataset's): the
    # assigner reads the user turns back out of the rendered prompt by it.
    template = resolve_chat_template_str(cfg, tokenizer)
    if template:
        tokenizer.chat_template = template
    attach_prompt_clusters(model, _console_assigner(moce, cluster_model, tokenizer))


# ---- axolotl's generation metrics during training (do_causal_lm_eval) ----------------------
def check_eval_generation(cfg: Any, moce: MoCEConfig) -> None:
    """Refuse, before any work, axolotl evaluations that run the model on text whose MoCE
    cluster cannot be known: they would fail (or log a traceback) at the first evaluation,
    after the training steps before it."""
    if cfg.get("do_bench_eval"):
        raise ConfigError(
            "do_bench_eval: axolotl's multiple-choice benchmark calls the model on its own "
            "prompts without cluster ids, which MoCE layers need. Remove do_bench_eval and run "
            "the benchmark on the trained output with lm-eval (`lm_eval --model moce "
            "--model_args path=OUTPUT_DIR ...`, docs/inference.md), which assigns each prompt's "
            "cluster."
        )
    if not cfg.get("do_causal_lm_eval"):
        return
    metrics = list(cfg.get("eval_causal_lm_metrics") or [])
    if "perplexity" in metrics:
        raise ConfigError(
            "eval_causal_lm_metrics: perplexity scores the generated text alone, whose MoCE "
            "cluster is unknown (a cluster belongs to the request, which it does not see). "
            "Remove it: eval_loss is the model's perplexity on the eval split, under each "
            "row's cluster."
        )
    if not moce.cluster_artifact and moce.groups > 1:
        raise ConfigError(
            "do_causal_lm_eval generates from each eval row's decoded prompt, whose cluster "
            "comes from the cluster artifact; this run has none (its ids come from the "
            f"{moce.cluster_column!r} column). Cluster with preprocess/cluster.py and set "
            "moce.cluster_artifact, or remove do_causal_lm_eval."
        )


def attach_eval_generation_clusters(cfg: Any, moce: MoCEConfig, trainer: Any) -> None:
    """axolotl's ``do_causal_lm_eval`` decodes each eval row's prompt, re-tokenizes it and
    calls ``generate`` with token ids only: that generate gets each prompt's cluster by the
    request-text rule of every other path (the training artifact's ``ClusterAssigner``, as
    ``axolotl inference``). Only ``generate`` is wrapped: a training forward without ids
    still fails loudly."""
    if not cfg.get("do_causal_lm_eval") or getattr(trainer, "_moce_eval_generate", False):
        return
    from ..outputs.hf_native import assign_clusters_in_generate
    from .args import cluster_model_of

    cluster_model = cluster_model_of(moce) if moce.cluster_artifact else None
    tokenizer = getattr(trainer, "processing_class", None) or trainer.tokenizer
    assign_clusters_in_generate(trainer.model, _console_assigner(moce, cluster_model, tokenizer))
    trainer._moce_eval_generate = True


def _console_assigner(moce: MoCEConfig, cluster_model: Any, tokenizer: Any) -> Any:
    """The export's prompt -> cluster rule with axolotl's tokenizer, logging each prompt's
    cluster under axolotl's logger names so its console shows them."""
    from ..outputs.hf_native import ClusterAssigner

    return ClusterAssigner(None, moce.groups, cluster_model is not None, tokenizer=tokenizer,
                           cluster_model=cluster_model,
                           logger=logging.getLogger("axolotl.integrations.moce.clusters"))
