"""Loading trained MoCE outputs and generating with automatic cluster assignment.

    from moce_plugin import load_moce_model
    moce = load_moce_model("outputs/cpu-smollm2-moce/model")
    print(moce.generate(["Write a python function that reverses a list."])[0])

An output directory is what ``axolotl train`` wrote with the plugin enabled (or what
:func:`moce_plugin.outputs.export.export_model` wrote): ``moce_config.json`` (written when training
starts) and ``moce_weights.safetensors`` (at every checkpoint and the end); the full model
(``config.json`` + safetensors) when no adapter was used, or ``adapter_config.json`` +
``adapter_model.safetensors`` for LoRA/QLoRA; and the cluster artifact (``cluster_artifact/``,
copied when training starts). A folder left by an interrupted run (SIGINT: axolotl saves the
model, but not our files) loads its MoCE tensors from the model/adapter weights instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..clustering.text import Request
from ..errors import LoadError
from ..model.cluster_ids import check_cluster_ids, single_group_ids
from ..model.config import MoCEConfig
from ..model.routers import LEGACY_PEFT_KEY_MAPPING
from ..model.routing import CLUSTER_IDS_KWARG
from ..model.state_dict import load_moce_state_dict
from ..model.upcycle import upcycle_model
from ..model.wrappers import config_of
from ..utils import FileFormatError, read_json
from .fingerprint import fingerprint_checked, fingerprint_difference
from .folder import (
    ARTIFACT_DIR_NAME,
    ARTIFACT_META_KEY,
    MOCE_CONFIG_NAME,
    MOCE_WEIGHTS_NAME,
    check_moce_weights,
    model_weight_files,
    read_meta,
    read_moce_config,
    read_moce_weights,
)
from .hf_native import match_cache_to_clusters, plain_base_config

LOG = logging.getLogger(__name__)

# A full save of an upcycled model names the frozen MLP "mlp.base_mlp"; loading it into the
# plain architecture first maps it back.
BASE_MLP_KEY_MAPPING = {r"\.base_mlp\.": "."}


def _forget_base_mlp_mapping(model: Any) -> None:
    """transformers reverses load-time renamings when the model is saved again; ours has no
    reverse (export wrote keys like ``.base_mlp.odel.layers.0...``), and once upcycled the
    model's own names are the ones to save."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [
            c for c in conversions
            if getattr(c, "_original_source_patterns", None) != list(BASE_MLP_KEY_MAPPING)
        ]


#: The load errors' name here (documented for ``moce_plugin.inference`` users).
MoCELoadError = LoadError


def _config_dir(path: Path) -> Path:
    """Where moce_config.json is: the folder itself, or for a checkpoint written without it
    (the run was stopped between the trainer's save and ours) the run's output_dir."""
    if not path.is_dir():
        raise MoCELoadError(f"{path} is not a directory")
    if (path / MOCE_CONFIG_NAME).is_file():
        return path
    if path.name.startswith("checkpoint-") and (path.parent / MOCE_CONFIG_NAME).is_file():
        return path.parent
    raise MoCELoadError(
        f"{path} is missing {MOCE_CONFIG_NAME}: it is not the output of a MoCE training "
        "(axolotl train with plugins: [moce_plugin.MoCEPlugin]) or of moce-export. "
        "Use the training's output_dir or one of its checkpoint-* folders."
    )


def _newest_checkpoint(path: Path) -> Path | None:
    steps = [(int(p.name.split("-")[1]), p) for p in path.glob("checkpoint-*")
             if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


def _check_weights_present(path: Path, meta: dict, own_config: bool) -> None:
    if (path / MOCE_WEIGHTS_NAME).is_file():
        return
    newest = _newest_checkpoint(path)
    use = (f"its newest checkpoint is {newest}: load that, or resume training "
           "(resume_from_checkpoint) and let it finish." if newest else
           "it has no checkpoint yet: train again.")
    if not model_weight_files(path):
        raise MoCELoadError(
            f"{path} has neither {MOCE_WEIGHTS_NAME} nor model/adapter weights: the run "
            f"stopped before it saved anything here (e.g. SIGTERM); {use}"
        )
    if own_config and meta.get("saved") == "start":
        raise MoCELoadError(
            f"{path} holds the weights axolotl saved when training started, not trained ones: "
            f"the run stopped (e.g. SIGTERM) before it finished; {use}"
        )


def _check_base_matches(model: Any, meta: dict, given: str | None = None,
                        allow_different_base: bool = False, check_weights: bool = True) -> None:
    """The MoCE weights only fit the base they were trained on: same config, and (when the
    base weights come from elsewhere than the folder) the same weights by fingerprint."""
    expected = meta.get("base_config")
    cfg = model.config
    diffs = {
        k: (v, getattr(cfg, k, None))
        for k, v in (expected or {}).items()
        if getattr(cfg, k, None) != v
    }
    if diffs:
        details = ", ".join(f"{k}: trained {a}, given {b}" for k, (a, b) in diffs.items())
        raise MoCELoadError(
            f"The base model differs from the one MoCE was trained on ({details}). Pass the "
            f"training's base model (recorded: {meta.get('base_model')!r}) as base_model=."
        )
    if not check_weights:
        return
    recorded = meta.get("base_fingerprint")
    difference = fingerprint_difference(recorded, model)
    if difference and not allow_different_base:
        raise MoCELoadError(
            f"The base model {given!r} has the same shape as the one MoCE was trained on "
            f"(recorded: {meta.get('base_model')!r}) but other weights: {difference}. Pass "
            "the training's base model, or allow_different_base=True "
            "(--allow-different-base) if you mean to use another one."
        )
    if difference:
        LOG.warning("base model %s differs from training's (%s); allowed", given, difference)
    elif not fingerprint_checked(recorded):
        LOG.info("base weights not checked: no usable fingerprint recorded (%s)",
                 (recorded or {}).get("skipped") or "older output")


def _resolve_base(name: str, path: Path) -> str:
    """A recorded base model path as written at training time is relative to the training's
    working directory: when it does not exist from here, look for it relative to the output
    folder and its parents (the training ran in one of them); hub ids pass through."""
    if Path(name).is_absolute() or Path(name).exists():
        return name
    for folder in (path, *path.resolve().parents):
        if (folder / name / "config.json").is_file():
            LOG.info("base model %r found as %s", name, folder / name)
            return str(folder / name)
    return name


def _load_base(auto_cls: Any, name: str, recorded_in: str, **kwargs: Any) -> Any:
    """``from_pretrained`` of the base model; when it cannot be found the error names the
    model, where the name came from and ``--base-model``."""
    try:
        return auto_cls.from_pretrained(name, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoCELoadError(
            f"cannot load the base model {name!r} ({recorded_in}): {first} Pass the "
            "training's base model as --base-model PATH (base_model= in Python)."
        ) from exc


def _resize_to_trained_vocab(model: Any, meta: dict, adapter_dir: Path) -> None:
    """A run that adds tokens (``tokens:``, new ``special_tokens``) trains on a base whose
    embeddings axolotl resized to the tokenizer (new rows: a random initialisation). PEFT then
    saves the resized embedding (and an untied head) with the adapter, frozen or not
    (``save_embedding_layers``); the base is resized the same way and given those saved
    tensors before it is fingerprinted and the adapter is applied. An adapter without them
    cannot rebuild the new tokens' rows: refused, not guessed."""
    trained = (meta.get("base_config") or {}).get("vocab_size")
    embeddings = model.get_input_embeddings()
    if not trained or embeddings is None or embeddings.num_embeddings == trained:
        return
    from safetensors import safe_open

    head = model.get_output_embeddings()
    tied = head is None or head.weight is embeddings.weight
    names = {m: n for n, m in model.named_modules()}
    # key in the adapter -> the accessor of the module (resizing replaces the modules)
    wanted = {f"base_model.model.{names[embeddings]}.weight": model.get_input_embeddings}
    if not tied:
        wanted[f"base_model.model.{names[head]}.weight"] = model.get_output_embeddings
    saved: dict[str, torch.Tensor] = {}
    for file in model_weight_files(adapter_dir):
        if file.suffix != ".safetensors":
            continue
        with _named_weight_errors(adapter_dir), safe_open(str(file), "pt") as f:
            saved.update({k: f.get_tensor(k) for k in f.keys() if k in wanted})
    missing = [k.removeprefix("base_model.model.") for k in wanted if k not in saved]
    if missing:
        raise MoCELoadError(
            f"{adapter_dir} was trained with {trained} token embeddings (the run added tokens; "
            f"the base has {embeddings.num_embeddings}) but its adapter does not hold the "
            f"resized {', '.join(missing)}: the new tokens' rows were not saved, so the trained "
            "model cannot be rebuilt. Train with lora_modules_to_save including the embedding "
            "and the output head (axolotl asks for it with tokens:)."
        )
    model.resize_token_embeddings(trained, mean_resizing=False)
    with torch.no_grad():
        for key, module_of in wanted.items():
            weight = module_of().weight
            weight.copy_(saved[key].to(weight.dtype))


@contextmanager
def _named_weight_errors(path: Path) -> Iterator[None]:
    """A damaged safetensors file met while transformers / PEFT load the folder is reported
    with the folder's weight files named (their error names none)."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        names = ", ".join(str(f) for f in model_weight_files(path)) or str(path)
        raise FileFormatError(
            f"{names} is damaged (safetensors cannot read it: {' '.join(str(exc).split())}); "
            "restore it from a copy, or load the newest checkpoint-* of the run instead."
        ) from exc


@dataclass
class MoCEInferenceModel:
    """A loaded MoCE model with its tokenizer and cluster model."""

    model: Any
    tokenizer: Any
    config: MoCEConfig
    cluster_model: Any | None = None
    prompt_format: str = "raw"
    meta: dict = field(default_factory=dict)

    # ---- clusters --------------------------------------------------------------------
    def assign_clusters(self, requests: Sequence[Request]) -> list[int]:
        """Cluster of each request: a plain prompt (as given to :meth:`generate`, or already
        formatted by :meth:`format_prompt`), chat messages, or a row in the training format.
        The request text is the training rows' (:func:`moce_plugin.clustering.request_text`)."""
        if self.cluster_model is None:
            ids = single_group_ids(self.config.groups, len(requests))
            if ids is not None:
                return ids
            raise MoCELoadError(
                "This model has no cluster artifact (it was trained on a cluster_id column), so "
                "clusters can't be assigned from text: pass the cluster explicitly (--cluster "
                "ID on the command line, cluster= in Python)."
            )
        return [int(c) for c in self.cluster_model.assign_requests(list(requests))]

    def _cluster_ids(self, prompts: Sequence[str], cluster: int | Sequence[int] | None):
        if cluster is None:
            ids = self.assign_clusters(prompts)
        elif isinstance(cluster, int):
            ids = [cluster] * len(prompts)
        else:
            ids = list(cluster)
        groups = self.config.groups
        return check_cluster_ids(
            ids, groups, batch_shape=(len(prompts),), allow_ignore=False, what="cluster",
            fix=f"; cluster= takes one id per prompt in [0, {groups}) (or one id for all)",
        ).to(torch.long)

    # ---- prompts ---------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        if self.prompt_format == "alpaca":
            from axolotl.prompters import AlpacaPrompter

            return next(iter(AlpacaPrompter().build_prompt(prompt)))
        if self.prompt_format == "chat" and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def encode(self, prompts: Sequence[str]) -> dict:
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # generation continues at the right edge
        texts = [self.format_prompt(p) for p in prompts]
        batch = tok(texts, return_tensors="pt", padding=True)
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    # ---- generation ------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        cluster: int | Sequence[int] | None = None,
        max_new_tokens: int = 128,
        streamer: Any = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Generate for a batch that may mix clusters; returns the new text of each prompt."""
        prompts = list(prompts)
        batch = self.encode(prompts)
        ids = self._cluster_ids(prompts, cluster).to(batch["input_ids"].device)
        match_cache_to_clusters(generate_kwargs.get("past_key_values"), ids)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        out = self.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            **{CLUSTER_IDS_KWARG: ids},
            **generate_kwargs,
        )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def stream(self, prompt: str, cluster: int | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield text pieces of one generation as they are produced."""
        from threading import Thread

        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        thread = Thread(
            target=self.generate, args=([prompt],),
            kwargs=dict(cluster=cluster, streamer=streamer, **kwargs), daemon=True,
        )
        thread.start()
        yield from streamer
        thread.join()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, cluster_ids: torch.Tensor, **kwargs: Any):
        return self.model(input_ids=input_ids, **{CLUSTER_IDS_KWARG: cluster_ids}, **kwargs).logits


@contextmanager
def _transformers_errors_only() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def output_cluster_model(path: Path, config: MoCEConfig, cluster_artifact: str | None,
                         meta: dict | None = None):
    """The cluster artifact of the MoCE output at ``path``: ``cluster_artifact`` if given, the
    output's own copy, its run folder's (a checkpoint), or the one its config names; refused
    when its fingerprint is not the one ``meta`` recorded. None when the model has none."""
    candidates = [cluster_artifact, path / ARTIFACT_DIR_NAME, path.parent / ARTIFACT_DIR_NAME,
                  config.cluster_artifact]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            from ..clustering import ClusterModel

            model = ClusterModel.load(candidate)
            model.check_num_clusters(config.groups)
            recorded = (meta or {}).get(ARTIFACT_META_KEY)
            if recorded and model.fingerprint != recorded:
                raise MoCELoadError(
                    f"The cluster artifact {candidate} is not the one this model was trained "
                    f"with (fingerprint {model.fingerprint[:12]}, recorded "
                    f"{recorded[:12]}): it was re-clustered since, so its ids mean other "
                    f"clusters. Restore {path / ARTIFACT_DIR_NAME} (the copy training made), "
                    "or pass cluster_artifact=<the artifact training used>."
                )
            return model
    if config.cluster_artifact or cluster_artifact:
        raise MoCELoadError(
            "The cluster artifact of this model was not found (looked in "
            f"{path / ARTIFACT_DIR_NAME} and {config.cluster_artifact}). Pass "
            "cluster_artifact=<dir written by "
            "preprocess/cluster.py>."
        )
    return None


def load_moce_model(
    path: str | Path,
    base_model: str | None = None,
    cluster_artifact: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    merge_lora: bool = False,
    prompt_format: str | None = None,
    allow_different_base: bool = False,
) -> MoCEInferenceModel:
    """Load a MoCE output directory (see module docstring) for inference.

    Args:
        base_model: the base model for LoRA outputs, or to override the recorded one.
        cluster_artifact: override where the cluster artifact is read from.
        merge_lora: merge LoRA into the base weights (faster generation).
        prompt_format: 'alpaca', 'chat' or 'raw'; default: what the training data used.
        allow_different_base: accept a base whose weights differ from the fingerprint
            recorded at training (same config); by default that is an error.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config_dir = _config_dir(path)
    config = read_moce_config(config_dir)
    meta = read_meta(config_dir)
    _check_weights_present(path, meta, own_config=config_dir == path)
    dtype = dtype or torch.float32
    adapter_cfg = path / "adapter_config.json"

    def check_base(model: Any, given: str | Path, from_folder: bool = False) -> None:
        _check_base_matches(model, meta, str(given), allow_different_base,
                            check_weights=not from_folder)

    if adapter_cfg.is_file():
        from peft import PeftModel

        base = base_model or read_json(adapter_cfg, "adapter config").get(
            "base_model_name_or_path")
        if not base:
            raise MoCELoadError(f"{adapter_cfg} names no base model: pass base_model=")
        where = "given" if base_model else f"recorded in {adapter_cfg}"
        base = base if base_model else _resolve_base(base, path)
        model = _load_base(AutoModelForCausalLM, base, where, dtype=dtype)
        _resize_to_trained_vocab(model, meta, path)
        check_base(model, base)
        upcycle_model(model, config, dtype=dtype)
        # 0.1.0 LoRA adapters store the router tensors under flat keys (LEGACY_KEYS).
        key_mapping = {**(getattr(model, "_checkpoint_conversion_mapping", None) or {}),
                       **LEGACY_PEFT_KEY_MAPPING}
        with _named_weight_errors(path):
            model = PeftModel.from_pretrained(model, path, key_mapping=key_mapping)
        if merge_lora:
            model = model.merge_and_unload()
        tokenizer_source = path if (path / "tokenizer_config.json").is_file() else base
    elif (path / "config.json").is_file():
        source = base_model or path
        # The saved model also holds the moce_experts tensors, which the plain architecture
        # reports as "unexpected"; they are loaded from moce_weights below, so keep it quiet.
        with _transformers_errors_only(), _named_weight_errors(Path(source)):
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, key_mapping=BASE_MLP_KEY_MAPPING, **plain_base_config(source)
            )
        _forget_base_mlp_mapping(model)
        # The folder's own (possibly trained) base weights are not checked, another base is.
        check_base(model, source, from_folder=base_model is None)
        upcycle_model(model, config, dtype=dtype)
        tokenizer_source = path if (path / "tokenizer_config.json").is_file() else (
            base_model or meta.get("base_model") or path)
    else:
        base = base_model or meta.get("base_model")
        if not base:
            raise MoCELoadError(
                f"{path} holds MoCE weights but no model: pass base_model= (the training's base)."
            )
        where = "given" if base_model else f"recorded in {config_dir / MOCE_CONFIG_NAME}"
        base = base if base_model else _resolve_base(base, path)
        model = _load_base(AutoModelForCausalLM, base, where, dtype=dtype)
        check_base(model, base)
        upcycle_model(model, config, dtype=dtype)
        tokenizer_source = base
    # moce_weights.safetensors is authoritative for MoCE (also under PEFT's modules_to_save);
    # without it (interrupted run) the MoCE tensors inside the model/adapter weights are.
    state, source_file = read_moce_weights(path, model)
    if not state:
        raise MoCELoadError(
            f"{path}: {source_file} holds no MoCE tensors (moce_experts): these weights were "
            "not saved from a MoCE model. Use the training's output_dir or a checkpoint-*."
        )
    # the checksum in _meta is this folder's own weights' (a checkpoint borrowing its run's
    # config has none of its own); non-finite values are refused everywhere
    check_moce_weights(state, path / source_file,
                       meta if config_dir == path and source_file == MOCE_WEIGHTS_NAME else None)
    load_moce_state_dict(model, state)
    if device is not None:
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source,
                                              **plain_base_config(tokenizer_source))
    cluster_model = output_cluster_model(path, config, cluster_artifact, meta)
    assert config_of(model) is not None
    return MoCEInferenceModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        cluster_model=cluster_model,
        prompt_format=prompt_format or meta.get("prompt_format", "raw"),
        meta=meta,
    )


def add_loading_arguments(parser: Any) -> None:
    """The command-line options every CLI that loads an output folder shares."""
    parser.add_argument("--base-model", help="base model for LoRA outputs (default: recorded)")
    parser.add_argument("--allow-different-base", action="store_true",
                        help="accept a base model whose weights differ from training's")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
