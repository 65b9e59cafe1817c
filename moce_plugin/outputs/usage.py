"""Which groups and experts a dataset's tokens use, per cluster and per layer.

    python -m moce_plugin.usage OUTPUT_DIR --data rows.jsonl [--max-rows 200] [--out usage]

Rows are formatted like training (alpaca fields, or a `text` column), assigned their
cluster by the model's cluster artifact (or a `cluster_id` column), run through the model
(teacher forcing, no generation) and the routing of every real token is counted. Writes
``<out>.json`` (per layer: expert load [C, E] and tokens per group; rows per cluster and
source) and ``<out>.png`` (heatmap).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..model.routing import CLUSTER_IDS_KWARG, routing_stats
from ..model.upcycle import pop_last_routing
from ..utils import cli_errors, read_json, read_jsonl
from .load import MoCEInferenceModel, MoCELoadError, load_moce_model
from .plots import plot_usage


def _row_text(moce: MoCEInferenceModel, row: dict) -> tuple[str, str]:
    """(prompt used for clustering, full text the model reads)."""
    if "instruction" in row:
        prompt = (row["instruction"] + ("\n" + row["input"] if row.get("input") else "")).strip()
        return prompt, moce.format_prompt(prompt) + str(row.get("output", ""))
    text = str(row.get("text", ""))
    return text, text


@torch.no_grad()
def measure_usage(moce: MoCEInferenceModel, rows: list[dict], batch_size: int = 8,
                  max_length: int = 512) -> dict[str, Any]:
    prompts, texts = zip(*(_row_text(moce, r) for r in rows))
    if all("cluster_id" in r for r in rows) and moce.cluster_model is None:
        clusters = [int(r["cluster_id"]) for r in rows]
    else:
        clusters = moce.assign_clusters(list(prompts))
    tok = moce.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    load_sum: dict[int, np.ndarray] = {}
    tokens_sum: dict[int, np.ndarray] = {}
    device = next(moce.model.parameters()).device
    for start in tqdm(range(0, len(rows), batch_size), desc="expert usage"):
        chunk = list(texts[start:start + batch_size])
        batch = tok(chunk, return_tensors="pt", padding=True, truncation=True,
                    max_length=max_length).to(device)
        ids = torch.tensor(clusters[start:start + batch_size], device=device)
        per_token = ids[:, None].expand_as(batch["input_ids"]).clone()
        per_token[batch["attention_mask"] == 0] = -1  # padding is not counted
        with routing_stats():
            moce.model(**batch, **{CLUSTER_IDS_KWARG: per_token})
        for record in pop_last_routing(moce.model):
            i = record.layer_index
            weighted = (record.expert_load * record.group_tokens[:, None]).cpu().numpy()
            load_sum[i] = load_sum.get(i, 0) + weighted
            tokens_sum[i] = tokens_sum.get(i, 0) + record.group_tokens.cpu().numpy()
    layers = {
        str(i): {"expert_load": (load_sum[i] / np.maximum(tokens_sum[i], 1)[:, None]).tolist(),
                 "group_tokens": tokens_sum[i].tolist()}
        for i in sorted(load_sum)
    }
    by_source: dict[str, list[int]] = defaultdict(lambda: [0] * moce.config.groups)
    for row, c in zip(rows, clusters):
        if "source" in row:
            by_source[str(row["source"])][c] += 1
    return {"rows": len(rows), "rows_per_cluster": np.bincount(
        clusters, minlength=moce.config.groups).tolist(), "layers": layers,
        "rows_per_cluster_and_source": dict(by_source)}


def write_usage(usage: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(usage, indent=2))
    loads = {i: np.asarray(v["expert_load"]) for i, v in usage["layers"].items()}
    first = next(iter(usage["layers"].values()))
    png = plot_usage(loads, np.asarray(first["group_tokens"]),
                     usage["rows_per_cluster_and_source"] or None, out.with_suffix(".png"))
    return json_path, png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="MoCE output directory")
    parser.add_argument("--data", required=True, help="jsonl/json rows (alpaca fields or text)")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--base-model", help="base model for LoRA outputs (default: recorded)")
    parser.add_argument("--out", default="moce_usage", help="output path without extension")
    parser.add_argument("--device", default=None)
    parser.add_argument("--allow-different-base", action="store_true",
                        help="accept a base model whose weights differ from training's")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    with cli_errors(args.debug, "moce_plugin.usage"):
        rows = read_rows(Path(args.data))
        rows = rows[: args.max_rows] if args.max_rows else rows
        moce = load_moce_model(args.model, base_model=args.base_model, device=args.device,
                               allow_different_base=args.allow_different_base)
        if moce.cluster_model is None and moce.config.groups > 1 and not all(
                "cluster_id" in r for r in rows):
            raise MoCELoadError(
                "this model has no cluster artifact, so rows can't be assigned a cluster: "
                f"give every row of {args.data} a cluster_id column."
            )
        json_path, png = write_usage(
            measure_usage(moce, rows, args.batch_size, args.max_length), args.out)
    print(f"wrote {json_path} and {png}")


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSON list or JSONL file; damage and emptiness are reported with the name."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    rows = read_json(path, "data file") if head.startswith("[") else read_jsonl(
        path, "data file")
    if not rows:
        raise ValueError(f"the data file {path} is empty: give it at least one row.")
    return rows


if __name__ == "__main__":
    main()
