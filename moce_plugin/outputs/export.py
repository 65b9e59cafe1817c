"""Merge LoRA into the base and write one self-contained MoCE directory.

    python -m moce_plugin.export OUTPUT_DIR DEST [--base-model PATH] [--dtype bfloat16]

DEST holds the merged weights (safetensors, with the MoCE parameters), config, tokenizer,
``moce_config.json`` / ``moce_weights.safetensors``, the cluster artifact and a README card;
``moce_plugin.inference.load_moce_model(DEST)`` reloads it with one call.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from .folder import ARTIFACT_DIR_NAME, read_meta, save_moce_files
from .hf_export import write_hf_native
from .load import load_moce_model

CARD = """---
library_name: transformers
tags: [moce, mixture-of-experts, axolotl]
base_model: {base_model}
---
# MoCE model

Mixture-of-Clustered-Experts adapters (moce-plugin) on `{base_model}`: {groups} expert groups x
{experts} experts, top-k = {top_k}, {general} general experts, adapter dim {dim}.
Cluster ids come from `{artifact}` (sequence-level k-means over sentence embeddings).

```python
from moce_plugin.inference import load_moce_model
moce = load_moce_model("<this folder>")
print(moce.generate(["your prompt"])[0])
```
"""


def export_model(
    source: str | Path, dest: str | Path, base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    source, dest = Path(source), Path(dest)
    moce = load_moce_model(source, base_model=base_model, merge_lora=True, dtype=dtype)
    meta = dict(read_meta(source))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    moce.model.save_pretrained(tmp)
    moce.tokenizer.save_pretrained(tmp)
    meta["adapter"] = None
    meta["exported_from"] = str(source)
    save_moce_files(moce.model, moce.config, tmp, meta)
    if moce.cluster_model is not None:
        shutil.copytree(moce.cluster_model.path, tmp / ARTIFACT_DIR_NAME)
    cfg = moce.config
    (tmp / "README.md").write_text(CARD.format(
        base_model=meta.get("base_model"), groups=cfg.groups, experts=cfg.experts_per_group,
        top_k=cfg.top_k, general=cfg.num_general_experts, dim=cfg.adapter_dim,
        artifact=ARTIFACT_DIR_NAME if moce.cluster_model is not None else "a cluster_id column",
    ))
    write_hf_native(tmp, moce, source)  # config/auto_map, remote code, model card
    (tmp / "moce_export.json").write_text(json.dumps({"source": str(source)}, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="MoCE output directory (axolotl output_dir or checkpoint)")
    parser.add_argument("dest", help="directory to write")
    parser.add_argument("--base-model", help="base model for LoRA outputs (default: recorded)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    out = export_model(args.source, args.dest, args.base_model, getattr(torch, args.dtype))
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
