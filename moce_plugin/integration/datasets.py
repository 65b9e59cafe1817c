"""Cluster ids from the raw data to the batch.

1. Before tokenization, every raw dataset gets an integer column (``moce.cluster_column``,
   default ``cluster_id``): from the cluster artifact (looked up by content, so
   shuffling/sharding do not matter) or as given in the data.
2. Each prompt strategy's ``tokenize_prompt`` is wrapped so its output carries
   ``moce_cluster_ids``: one id per token. Per-token ids survive axolotl's packing
   (examples of different clusters packed in one row keep their own ids), its caching
   (``dataset_prepared_path``; the moce settings are part of the cache hash) and the
   eval split, with no change to axolotl's code paths.
3. :class:`MoCEDataCollator` wraps whatever collator axolotl chose, takes the ids out
   before it runs, and pads them to the batch's shape with -1 (ignored positions).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..clustering.text import dataset_row_view, iter_rows
from ..errors import ClusterIdsError
from ..model.cluster_ids import (
    CLUSTER_IDS_KWARG,
    IGNORE_CLUSTER_ID,
    check_cluster_ids,
    single_group_ids,
)
from ..model.routing import current_thread_value, thread_value
from .args import cluster_model_of, moce_config_from_cfg
from .continuation import assign_rows, moce_source

# The cluster column of the dataset get_dataset_wrapper is preparing, for the process wrapper
# axolotl calls in between.
_PREPARING_COLUMN = "moce_preparing_cluster_column"
_PREPARING_DATASET = "moce_preparing_dataset_name"


#: Bad or missing cluster ids in a dataset: the one cluster-id error family.
ClusterIdError = ClusterIdsError


# ---- 1. raw rows -> cluster column -------------------------------------------------------
def _dataset_name(dataset_config: Any) -> str:
    try:
        return str(dataset_config.get("path") or dataset_config.get("name") or "<dataset>")
    except AttributeError:
        return str(dataset_config)


def _check_ids(values: Sequence[Any], num_clusters: int, column: str, name: str) -> None:
    """Integer ids in [0, num_clusters); the message names the first bad row and its value.

    What ``datasets`` hands over decides what can be checked: a JSON column mixing integers and
    strings is typed ``Json`` and each value decoded, so ``"2"`` arrives as the integer 2 and is
    accepted (it can only mean cluster 2); an all-string column arrives as strings and is
    refused; one float (``1.5``) makes the whole column float64, so the row named is the first
    non-integral value, not row 0's ``0.0`` (docs/clustering.md, "Your own cluster ids").
    """
    check_cluster_ids(
        list(values), num_clusters, allow_ignore=False, what=f"'{column}'",
        where=f"Dataset '{name}': ",
        fix=f". moce.num_clusters={num_clusters}: fix the column, set moce.num_clusters to the "
            "number of clusters in the data, or let preprocess/cluster.py assign them "
            "(moce.cluster_artifact).")


def attach_cluster_column(dataset: Any, dataset_config: Any, cfg: Any) -> Any:
    """Return ``dataset`` with a valid integer cluster column (raises ClusterIdError)."""
    moce = moce_config_from_cfg(cfg)
    column = moce.cluster_column
    name = _dataset_name(dataset_config)
    columns = list(getattr(dataset, "column_names", None) or [])
    if moce.cluster_artifact:
        model = cluster_model_of(moce)
        view = dataset_row_view(dataset_config)  # as clustering read the rows
        # Starting from a MoCE model: its artifact assigns the new rows too.
        ids = (assign_rows(model, dataset, name, view=view)
               if moce_source(cfg.get("base_model"))
               else model.lookup((view(r) for r in iter_rows(dataset)), dataset_name=name))
        if column in columns:
            dataset = dataset.remove_columns(column)
        return dataset.add_column(column, [int(i) for i in ids])
    if column not in columns:
        ids = single_group_ids(moce.groups, len(dataset))
        if ids is not None:
            return dataset.add_column(column, ids)
        raise ClusterIdError(
            f"Dataset '{name}' has no '{column}' column, and moce.cluster_artifact is not "
            f"set. Run `python preprocess/cluster.py <your.yml>` and set moce.cluster_artifact, "
            f"or add an integer '{column}' column (0..{moce.groups - 1}) to the data "
            f"(columns found: {columns})."
        )
    _check_ids(dataset[column], moce.groups, column, name)
    return dataset


# ---- 2. tokenized rows carry per-token ids ------------------------------------------------
class ClusterIdTokenizer:
    """Wraps ``tokenize_prompt`` (row-wise or batched) to add per-token ``moce_cluster_ids``.

    A picklable object (not a closure) so ``dataset_num_proc > 1`` works.
    """

    def __init__(self, tokenize: Callable, column: str, batched: bool,
                 dataset_name: str = "<dataset>", sequence_len: int | None = None) -> None:
        self.tokenize = tokenize
        self.column = column
        self.batched = batched
        self.dataset_name = dataset_name
        self.sequence_len = sequence_len

    def __call__(self, example: dict) -> dict:
        if not self.batched:
            cid = int(example[self.column])
            out = self.tokenize(example)
            out[CLUSTER_IDS_KWARG] = [cid] * len(out["input_ids"])
            return out
        ids = example[self.column]
        out = self.tokenize(example)
        if len(out["input_ids"]) == len(ids):
            out[CLUSTER_IDS_KWARG] = [[int(c)] * len(t) for c, t in zip(ids, out["input_ids"])]
            return out
        # The strategy split rows (``completion`` cuts a text longer than sequence_len into
        # chunks) or dropped some: tokenize row by row so each output row is known to come
        # from one input row, whose cluster every chunk keeps.
        per_row: dict[str, list] = {}
        for i, cid in enumerate(ids):
            part = self.tokenize({k: [v[i]] for k, v in example.items()})
            for key, values in part.items():
                per_row.setdefault(key, []).extend(values)
            per_row.setdefault(CLUSTER_IDS_KWARG, []).extend(
                [int(cid)] * len(t) for t in part["input_ids"])
        if len(per_row.get("input_ids", [])) != len(out["input_ids"]):
            # Rows merged across inputs: no output row has one source row to take an id from.
            raise ClusterIdError(
                f"Dataset '{self.dataset_name}': the prompt strategy returned "
                f"{len(out['input_ids'])} rows for {len(ids)} inputs and merges rows across "
                f"inputs (sequence_len {self.sequence_len}), so cluster ids can't be aligned. "
                "Use a row-wise dataset type for MoCE (alpaca, chat_template, completion)."
            )
        return per_row

    def __getattr__(self, item: str) -> Any:  # keep strategy attributes reachable
        if item == "tokenize":  # not set yet (unpickling): avoid recursion
            raise AttributeError(item)
        return getattr(self.tokenize, item)


def _wrap_strategy(prompt_tokenizer: Any, column: str, dataset_name: str = "<dataset>"
                   ) -> None:
    original = prompt_tokenizer.tokenize_prompt
    if isinstance(original, ClusterIdTokenizer):
        return
    batched = bool(getattr(prompt_tokenizer, "supports_batched", False))
    prompt_tokenizer.tokenize_prompt = ClusterIdTokenizer(
        original, column, batched, dataset_name, getattr(prompt_tokenizer, "sequence_len", None))


def _tokenized_with_ids(dataset: Any, column: str) -> Any:
    """An already-tokenized dataset (input_ids/labels columns) with a cluster column."""

    def add(row: dict) -> dict:
        return {CLUSTER_IDS_KWARG: [int(row[column])] * len(row["input_ids"])}

    return dataset.map(add, remove_columns=[column], desc="MoCE cluster ids")


# Replacements of axolotl functions, installed by moce_plugin.integration.patches.
def wrap_get_dataset_wrapper(original: Callable) -> Callable:
    """axolotl.utils.data.sft.get_dataset_wrapper: attach the cluster column to the raw rows
    and make the prompt strategy emit per-token ids."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_dataset_wrapper(*args: Any, **kwargs: Any):
        bound = signature.bind(*args, **kwargs)
        cfg = bound.arguments["cfg"]
        if not getattr(cfg, "moce", None):
            return original(*args, **kwargs)
        dataset_config = bound.arguments["dataset_config"]
        column = moce_config_from_cfg(cfg).cluster_column
        dataset = attach_cluster_column(bound.arguments["dataset"], dataset_config, cfg)
        bound.arguments["dataset"] = dataset
        if "input_ids" in dataset.column_names and "labels" in dataset.column_names:
            return _tokenized_with_ids(dataset, column), None
        with thread_value(_PREPARING_COLUMN, column), \
                thread_value(_PREPARING_DATASET, _dataset_name(dataset_config)):
            wrapped, prompter = original(*bound.args, **bound.kwargs)
        names = getattr(wrapped, "column_names", None)
        if names is not None and CLUSTER_IDS_KWARG not in names:
            raise ClusterIdError(
                f"Dataset '{_dataset_name(dataset_config)}' (type "
                f"{dataset_config.get('type')}) went through a strategy that drops extra "
                "columns, so its cluster ids were lost. Supported with MoCE: prompt-tokenizing "
                "types (alpaca, chat_template, completion, user-defined ...)."
            )
        return wrapped, prompter

    return get_dataset_wrapper


def wrap_tokenized_process(original: Callable) -> Callable:
    """axolotl.datasets.TokenizedPromptDataset.process: wrap the strategy's tokenize_prompt
    (only while get_dataset_wrapper above is preparing a MoCE dataset)."""

    @functools.wraps(original)
    def process(self: Any, dataset: Any) -> Any:
        column = current_thread_value(_PREPARING_COLUMN)
        if column:
            _wrap_strategy(self.prompt_tokenizer, column,
                           current_thread_value(_PREPARING_DATASET) or "<dataset>")
        return original(self, dataset)

    return process


def wrap_dataset_hash(original: Callable) -> Callable:
    """axolotl.utils.data.sft.generate_dataset_hash_from_config: the prepared-data cache must
    change with the MoCE settings that change the data."""

    @functools.wraps(original)
    def generate_dataset_hash_from_config(cfg: Any, cfg_datasets: list, tokenizer_name: str):
        base = original(cfg, cfg_datasets, tokenizer_name)
        if not getattr(cfg, "moce", None):
            return base
        return hashlib.md5(f"{base}|{moce_data_fingerprint(cfg)}".encode()).hexdigest()

    return generate_dataset_hash_from_config


def moce_data_fingerprint(cfg: Any) -> str:
    """What of the moce config changes the prepared data (so the cache hash must too)."""
    moce = moce_config_from_cfg(cfg)
    parts = ["moce-data-v1", moce.cluster_column, str(moce.num_clusters)]
    if moce.cluster_artifact:
        parts.append(cluster_model_of(moce).fingerprint)
    return "|".join(parts)


def check_prepared_dataset(dataset: Any, split: str) -> None:
    """After loading: every row carries ids (a cache made without the plugin does not)."""
    if dataset is None:
        return
    names = getattr(dataset, "column_names", None)
    if names is not None and CLUSTER_IDS_KWARG not in names:
        raise ClusterIdError(
            f"The {split} dataset has no '{CLUSTER_IDS_KWARG}' column: it was prepared without "
            "the MoCE plugin. Delete the prepared dataset (dataset_prepared_path) or point "
            "dataset_prepared_path elsewhere, and run again with plugins: "
            "[moce_plugin.MoCEPlugin]."
        )


# ---- 3. collation ------------------------------------------------------------------------
class MoCEDataCollator:
    """Wraps axolotl's collator; adds ``moce_cluster_ids`` ``[B, S]`` (-1 = ignore)."""

    def __init__(self, inner: Callable, padding_side: str = "right") -> None:
        self.inner = inner
        self.padding_side = padding_side

    def __call__(self, features: list, return_tensors: str | None = None) -> dict:
        packed = bool(features) and isinstance(features[0], list)
        rows = features if packed else [[f] for f in features]
        ids_per_row: list[np.ndarray] = []
        stripped_rows = []
        for pack in rows:
            parts, stripped = [], []
            for feature in pack:
                if CLUSTER_IDS_KWARG not in feature:
                    raise ClusterIdError(
                        f"A training example has no '{CLUSTER_IDS_KWARG}'. The dataset was "
                        "prepared without the MoCE plugin or by a strategy that drops columns; "
                        "re-prepare it with plugins: [moce_plugin.MoCEPlugin]."
                    )
                feature = dict(feature)
                parts.append(np.asarray(feature.pop(CLUSTER_IDS_KWARG), dtype=np.int64))
                stripped.append(feature)
            ids_per_row.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
            stripped_rows.append(stripped)
        inner_features = stripped_rows if packed else [r[0] for r in stripped_rows]
        if return_tensors is None:
            batch = self.inner(inner_features)
        else:
            batch = self.inner(inner_features, return_tensors=return_tensors)
        batch[CLUSTER_IDS_KWARG] = self._pad(ids_per_row, batch["input_ids"])
        return batch

    def _pad(self, ids_per_row: list[np.ndarray], input_ids: torch.Tensor) -> torch.Tensor:
        bsz, seq = input_ids.shape[0], input_ids.shape[-1]
        out = torch.full((bsz, seq), IGNORE_CLUSTER_ID, dtype=torch.long)
        for i, ids in enumerate(ids_per_row):
            n = min(len(ids), seq)
            values = torch.from_numpy(ids[:n])
            if self.padding_side == "left":
                out[i, seq - n:] = values
            else:
                out[i, :n] = values
        return out

    def __getattr__(self, item: str) -> Any:
        if item == "inner":  # not set yet (unpickling): avoid recursion
            raise AttributeError(item)
        return getattr(self.inner, item)
