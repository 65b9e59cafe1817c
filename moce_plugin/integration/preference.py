"""Cluster ids through axolotl's preference-tuning path (``rl: dpo`` / ``ipo`` / ``orpo`` /
``kto``).

A preference row's cluster is its prompt's cluster (``clustering.text.request_text`` of the
raw row, the same text stage 1 embedded and inference sends), the same for chosen and rejected.

1. Raw rows: axolotl's RL loader (``axolotl.utils.data.rl``) loads each dataset with
   ``load_dataset_with_config``; the replacement below attaches the cluster column there, with
   the dataset's config in hand, as the SFT path does (:func:`attach_cluster_column`).
2. The row transform of the preference type (``chatml.intel``, ``llama3.ultra``, ...) may drop
   every raw column (``remove_columns: __all__``): the column is put back after it, row for row.
   TRL's tokenization then keeps it beside ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``.
3. :class:`MoCEPreferenceCollator` wraps TRL's preference collator: the batch is
   ``[chosen rows; rejected rows]`` and ``moce_cluster_ids`` is the row's cluster on every real
   token of both halves, -1 on padding. TRL hands every batch key except its own masks to the
   policy's forward and to the reference's (the LoRA-disabled model or the reference copy).

axolotl does not pack preference rows (TRL 1.9's DPO ``padding_free`` is disabled), so there is
no packed path to carry ids through.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..model.cluster_ids import CLUSTER_IDS_KWARG, IGNORE_CLUSTER_ID
from ..model.routing import current_thread_value, thread_value
from .args import moce_config_from_cfg
from .datasets import ClusterIdError, attach_cluster_column

_RL_CFG = "moce_rl_cfg"


#: The batch key of an ORPO batch's row clusters ``[B]`` (popped before the forward).
ROW_CLUSTERS_KEY = "moce_row_clusters"


def preference_kind(trainer: Any) -> str | None:
    """"dpo" (TRL's DPOTrainer: axolotl's dpo and ipo), "orpo" (trl.experimental's
    ORPOTrainer) or None."""
    names = {cls.__name__ for cls in type(trainer).__mro__}
    if "DPOTrainer" in names:
        return "dpo"
    if "ORPOTrainer" in names:
        return "orpo"
    if "KTOTrainer" in names:
        return "kto"
    return None


def is_preference_trainer(trainer: Any) -> bool:
    return preference_kind(trainer) is not None


# ---- 1./2. the cluster column through axolotl's RL data path ------------------------------
def wrap_rl_load_split(original: Callable) -> Callable:
    """axolotl.utils.data.rl._load_split(cfg, split): make the config reachable from the
    dataset loader below (it gets only the dataset's own config)."""

    @functools.wraps(original)
    def _load_split(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(cfg, "moce", None):
            return original(cfg, *args, **kwargs)
        with thread_value(_RL_CFG, cfg):
            return original(cfg, *args, **kwargs)

    return _load_split


def wrap_rl_load_dataset(original: Callable) -> Callable:
    """axolotl.utils.data.rl.load_dataset_with_config: the raw preference rows get their
    cluster column (artifact lookup by the prompt's request text, or the data's column)."""

    @functools.wraps(original)
    def load_dataset_with_config(dataset_config: Any, *args: Any, **kwargs: Any) -> Any:
        dataset = original(dataset_config, *args, **kwargs)
        cfg = current_thread_value(_RL_CFG)
        if cfg is None:
            return dataset
        if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):  # DatasetDict
            for split in list(dataset.keys()):
                dataset[split] = attach_cluster_column(dataset[split], dataset_config, cfg)
            return dataset
        return attach_cluster_column(dataset, dataset_config, cfg)

    return load_dataset_with_config


def wrap_rl_map_dataset(original: Callable) -> Callable:
    """axolotl.utils.data.rl._map_dataset: the preference type's row transform keeps the
    cluster column (one output row per input row, so the column is put back as it was)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _map_dataset(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        cfg = bound.arguments["cfg"]
        if not getattr(cfg, "moce", None):
            return original(*args, **kwargs)
        column = moce_config_from_cfg(cfg).cluster_column
        dataset = bound.arguments["dataset"]
        if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):
            dataset = dataset["train"]  # what axolotl maps
        ids = list(dataset[column])
        out = original(*args, **kwargs)
        if len(out) != len(ids):
            raise ClusterIdError(
                f"The preference transform returned {len(out)} rows for {len(ids)}, so the "
                "rows' cluster ids cannot be aligned; use a row-wise preference type "
                "(chatml.*, llama3.*, chat_template.default, user_defined)."
            )
        if column in out.column_names:
            if list(out[column]) == ids:
                return out
            out = out.remove_columns(column)
        return out.add_column(column, ids)

    return _map_dataset


def check_preference_dataset(dataset: Any, column: str, split: str) -> None:
    """A prepared preference dataset carries the cluster column (a cache made without the
    plugin does not)."""
    names = getattr(dataset, "column_names", None)
    if dataset is None or names is None or column in names:
        return
    raise ClusterIdError(
        f"The {split} preference dataset has no '{column}' column: it was prepared without the "
        "MoCE plugin. Delete the prepared dataset (dataset_prepared_path) or point "
        "dataset_prepared_path elsewhere, and run again with plugins: [moce_plugin.MoCEPlugin]."
    )


# ---- 3. collation --------------------------------------------------------------------------
class MoCEPreferenceCollator:
    """Wraps TRL's ``DataCollatorForPreference`` (DPO): adds ``moce_cluster_ids`` ``[2B, S]``,
    the row's cluster on the real tokens of its chosen (rows 0..B-1) and rejected (rows
    B..2B-1) sequence, -1 on padding. For ORPO (whose collator pads chosen and rejected
    apart, concatenated later in the trainer) it adds the row clusters ``[B]`` under
    :data:`ROW_CLUSTERS_KEY`; :func:`wrap_orpo_forward` spreads them."""

    def __init__(self, inner: Callable, column: str, kind: str = "dpo") -> None:
        self.inner = inner
        self.column = column
        self.kind = kind

    def __call__(self, features: list[dict], *args: Any, **kwargs: Any) -> dict:
        clusters = []
        stripped = []
        for feature in features:
            if self.column not in feature:
                raise ClusterIdError(
                    f"A preference example has no '{self.column}' column. The dataset was "
                    "prepared without the MoCE plugin; re-prepare it with plugins: "
                    "[moce_plugin.MoCEPlugin]."
                )
            feature = dict(feature)
            clusters.append(int(feature.pop(self.column)))
            stripped.append(feature)
        batch = self.inner(stripped, *args, **kwargs)
        rows = torch.tensor(clusters, dtype=torch.long)
        if self.kind == "orpo":
            batch[ROW_CLUSTERS_KEY] = rows
            return batch
        if self.kind == "kto":  # one sequence per example (unpaired)
            batch[CLUSTER_IDS_KWARG] = row_cluster_ids(rows, batch["attention_mask"])
            return batch
        batch[CLUSTER_IDS_KWARG] = preference_cluster_ids(rows, batch["attention_mask"])
        return batch

    def __getattr__(self, item: str) -> Any:
        if item == "inner":  # not set yet (unpickling): avoid recursion
            raise AttributeError(item)
        return getattr(self.inner, item)


def preference_cluster_ids(row_clusters: torch.Tensor, attention_mask: torch.Tensor
                           ) -> torch.Tensor:
    """Per-token ids of a ``[chosen; rejected]`` batch: row ``i`` and row ``B + i`` both get
    example ``i``'s cluster on their real tokens, -1 elsewhere."""
    both = torch.cat([row_clusters, row_clusters])
    if both.shape[0] != attention_mask.shape[0]:
        raise ClusterIdError(
            f"the preference batch has {attention_mask.shape[0]} sequences for "
            f"{row_clusters.shape[0]} examples; expected chosen and rejected per example."
        )
    return row_cluster_ids(both, attention_mask)


def row_cluster_ids(row_clusters: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Row ``i``'s cluster on its real tokens, -1 on padding."""
    ids = row_clusters[:, None].expand_as(attention_mask)
    return torch.where(attention_mask.bool(), ids, torch.full_like(ids, IGNORE_CLUSTER_ID))


def wrap_preference_collators(trainer: Any, column: str) -> None:
    kind = preference_kind(trainer) or "dpo"
    for attr in ("data_collator", "eval_data_collator"):
        inner = getattr(trainer, attr, None)
        if inner is not None and not isinstance(inner, MoCEPreferenceCollator):
            setattr(trainer, attr, MoCEPreferenceCollator(inner, column, kind))
    if kind == "orpo":
        wrap_orpo_forward(trainer)
    if kind == "kto":
        wrap_kto_kl_forward(trainer)


def wrap_kto_kl_forward(trainer: Any) -> None:
    """TRL's KTOTrainer._compute_kl_logps(model, batch) runs the KL sequences (row ``i``'s
    prompt with another row's completion) with every other batch key, so the
    ``moce_cluster_ids`` of the main sequences (another width) would go with them: they are
    replaced by the KL sequences' own, row ``i``'s cluster (its prompt's) on their real
    tokens. Used for the policy's and the reference's KL forward alike."""
    original = trainer._compute_kl_logps
    if getattr(original, "_moce", False):
        return

    def _compute_kl_logps(model: Any, batch: dict) -> Any:
        if "KL_input_ids" not in batch or CLUSTER_IDS_KWARG not in batch:
            return original(model, batch)
        # Right padding: position 0 is a real token of every row, carrying its cluster.
        rows = batch[CLUSTER_IDS_KWARG][:, 0]
        kl_ids = row_cluster_ids(rows, batch["KL_attention_mask"].to(rows.device))
        return original(model, {**batch, CLUSTER_IDS_KWARG: kl_ids})

    _compute_kl_logps._moce = True  # type: ignore[attr-defined]
    trainer._compute_kl_logps = _compute_kl_logps


class _WithClusterIds:
    """The model, called with the batch's ``moce_cluster_ids`` added (TRL's ORPO forward
    passes only input_ids and attention_mask)."""

    def __init__(self, model: Any, ids: torch.Tensor) -> None:
        self.model = model
        self.ids = ids

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **{CLUSTER_IDS_KWARG: self.ids}, **kwargs)

    def __getattr__(self, item: str) -> Any:
        return getattr(self.model, item)


def wrap_orpo_forward(trainer: Any) -> None:
    """trl.experimental.orpo.ORPOTrainer.concatenated_forward(model, batch) concatenates
    ``[chosen; rejected]`` and calls ``model(input_ids, attention_mask=...)``: the model it
    calls gets the per-token ids of that concatenated batch (the row's cluster on both halves'
    real tokens, -1 on padding), computed with the trainer's own concatenation."""
    original = trainer.concatenated_forward
    if getattr(original, "_moce", False):
        return

    def concatenated_forward(model: Any, batch: dict) -> Any:
        rows = batch.pop(ROW_CLUSTERS_KEY, None)
        if rows is None:
            raise ClusterIdError(
                "An ORPO batch reached the model without the rows' clusters: its collator is "
                "not MoCE's. Please report this configuration."
            )
        concatenated = trainer.concatenated_inputs(
            batch, is_encoder_decoder=trainer.is_encoder_decoder,
            padding_value=trainer.padding_value, device=trainer.accelerator.device)
        mask = concatenated["concatenated_attention_mask"]
        ids = preference_cluster_ids(rows.to(mask.device), mask)
        return original(_WithClusterIds(model, ids), batch)

    concatenated_forward._moce = True  # type: ignore[attr-defined]
    trainer.concatenated_forward = concatenated_forward
