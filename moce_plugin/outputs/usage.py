"""Which groups and experts a dataset's tokens use, per cluster and per layer.

    moce-usage OUTPUT_DIR --data rows.jsonl [--max-rows 200] [--out usage]

Rows may be in any format training accepts (alpaca, chat ``messages``/``conversations``,
completion ``text``, user-defined fields); each is assigned its cluster from the row itself by
the model's cluster artifact (the training rule, so a training row gets its training cluster;
or a ``cluster_id`` column without an artifact), formatted like training, run through the model
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

from ..clustering.text import CHAT_KEYS, chat_messages, request_text
from ..model.routing import CLUSTER_IDS_KWARG, routing_stats
from ..model.metrics import RoutingMetrics
from ..model.wrappers import pop_last_routing
from ..utils import cli_errors, read_json, read_jsonl
from .load import MoCEInferenceModel, MoCELoadError, add_loading_arguments, load_moce_model
from .plots import plot_usage


# Where the answer of a row sits, per training format (alpaca, user-defined, DPO-like).
_ANSWER_KEYS = ("output", "answer", "response", "completion", "chosen")


def model_text(moce: MoCEInferenceModel, row: dict) -> str:
    """The full text the model reads for a row (teacher forcing): chat rows through the
    tokenizer's chat template, alpaca rows in the alpaca frame, completion rows as they are,
    other rows as the formatted request text plus their answer."""
    for key in CHAT_KEYS:
        turns = row.get(key)
        if isinstance(turns, list) and turns:
            messages = chat_messages(turns)
            if getattr(moce.tokenizer, "chat_template", None):
                return moce.tokenizer.apply_chat_template(messages, tokenize=False)
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    answer = next((str(row[k]) for k in _ANSWER_KEYS if row.get(k)), "")
    if "instruction" in row and moce.prompt_format == "alpaca":
        from axolotl.prompters import AlpacaPrompter

        return next(iter(AlpacaPrompter().build_prompt(
            row["instruction"], row.get("input") or None, answer or None)))
    if "text" in row and not answer:
        return str(row["text"])
    return moce.format_prompt(_request_of(moce, row)) + answer


def _request_of(moce: MoCEInferenceModel, row: dict) -> str:
    template = moce.cluster_model.template if moce.cluster_model is not None else "auto"
    return request_text(row, template)


@torch.no_grad()
def measure_usage(moce: MoCEInferenceModel, rows: list[dict], batch_size: int = 8,
                  max_length: int = 512) -> dict[str, Any]:
    texts = [model_text(moce, r) for r in rows]
    if all("cluster_id" in r for r in rows) and moce.cluster_model is None:
        clusters = [int(r["cluster_id"]) for r in rows]
    else:
        # The rows themselves are the requests: the same text (and cluster) as in training.
        clusters = moce.assign_clusters(rows)
    tok = moce.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    metrics = RoutingMetrics()  # the same accumulation as the training logs
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
        metrics.update(pop_last_routing(moce.model))
    layers = {
        str(i): {"expert_load": metrics.expert_load(i).cpu().tolist(),
                 "group_tokens": metrics.tokens_sum[i].cpu().tolist()}
        for i in sorted(metrics.load_sum)
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
    parser.add_argument("--data", required=True, help="jsonl/json rows in a training data format")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default="moce_usage", help="output path without extension")
    parser.add_argument("--device", default=None)
    add_loading_arguments(parser)
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
