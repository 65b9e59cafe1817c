"""Every patch moce-plugin makes to axolotl or transformers, with the reason, in one place.

Module-level patches (:data:`PATCHES`) replace a function of an installed library; they are
installed once per process by :func:`install_patches` (from the plugin's ``register``) and
``tests/unit/test_patches.py`` checks that each target still exists in the installed axolotl.
Instance-level patches wrap methods of one object only and are listed in
:data:`INSTANCE_PATCHES` for the record; they are made where the object is created.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Patch:
    module: str  # importable module holding the target
    attribute: str  # "func" or "Class.method"
    replacement: str  # "module:factory"; factory(original) -> replacement
    why: str
    also_in: tuple[str, ...] = ()  # modules that imported the target by name
    only_without_cuda: bool = False  # CPU-only (gloo) work-arounds: no change on CUDA machines


PATCHES: tuple[Patch, ...] = (
    Patch(
        "axolotl.utils.data.sft", "get_dataset_wrapper",
        "moce_plugin.integration.datasets:wrap_get_dataset_wrapper",
        "attach each raw row's cluster id (artifact lookup or data column) before axolotl "
        "tokenizes, and turn it into per-token ids; axolotl has no per-row hook here.",
        also_in=("axolotl.utils.data.wrappers",),
    ),
    Patch(
        "axolotl.datasets", "TokenizedPromptDataset.process",
        "moce_plugin.integration.datasets:wrap_tokenized_process",
        "wrap the prompt strategy's tokenize_prompt so its output carries moce_cluster_ids "
        "(they then survive packing, caching and the eval split unchanged).",
    ),
    Patch(
        "axolotl.utils.data.sft", "generate_dataset_hash_from_config",
        "moce_plugin.integration.datasets:wrap_dataset_hash",
        "the dataset_prepared_path cache must change when the cluster artifact or the "
        "cluster column changes, or training would reuse stale ids.",
        also_in=("axolotl.utils.data.rl",),
    ),
    Patch(
        "axolotl.utils.data.rl", "_load_split",
        "moce_plugin.integration.preference:wrap_rl_load_split",
        "preference datasets: the config must reach the dataset loader below, which axolotl "
        "calls with the dataset's own config only.",
    ),
    Patch(
        "axolotl.utils.data.rl", "load_dataset_with_config",
        "moce_plugin.integration.preference:wrap_rl_load_dataset",
        "preference datasets: attach each raw row's cluster column (its prompt's cluster) "
        "before axolotl's preference transform; the RL path has no per-row hook.",
    ),
    Patch(
        "axolotl.loaders.model", "ModelLoader.load",
        "moce_plugin.integration.inference:wrap_model_loader_load",
        "axolotl inference loads with ModelLoader(inference=True), but config validation "
        "drops cfg.inference, so plugin hooks can't tell; MoCE then makes generate assign "
        "each prompt's cluster (it gets token ids only).",
    ),
    Patch(
        "axolotl.utils.data.rl", "_map_dataset",
        "moce_plugin.integration.preference:wrap_rl_map_dataset",
        "preference types may drop every raw column (remove_columns: __all__); the cluster "
        "column is put back after the row-for-row transform.",
    ),
    Patch(
        "axolotl.cli.merge_lora", "do_merge_lora",
        "moce_plugin.integration.plugin:wrap_merge_lora",
        "axolotl merges LoRA shard by shard without building the model, which would drop the "
        "MoCE layers; for MoCE configs moce_plugin.outputs.export does the merge.",
    ),
    Patch(
        "axolotl.integrations.expert_parallel.shard", "save_fsdp2_lora_adapter",
        "moce_plugin.integration.fsdp_save:wrap_save_fsdp2_lora_adapter",
        "FSDP2 + LoRA: axolotl gathers only lora_* parameters for the final adapter save and "
        "fails on PEFT's modules_to_save copy of MoCE (KeyError ...router).",
    ),
    Patch(
        "accelerate.parallelism_config", "ParallelismConfig.build_device_mesh",
        "moce_plugin.integration.cpu_dist:wrap_build_device_mesh",
        "FSDP2 on CPU: axolotl builds the device mesh with device_type 'cuda'.",
        only_without_cuda=True,
    ),
    Patch(
        "accelerate.state", "PartialState._prepare_backend",
        "moce_plugin.integration.cpu_dist:wrap_prepare_backend",
        "several CPU ranks get no backend (one process) unless ACCELERATE_USE_CPU, which in "
        "turn switches DeepSpeed off: use gloo.",
        only_without_cuda=True,
    ),
    Patch(
        "accelerate.state", "AcceleratorState.__init__",
        "moce_plugin.integration.cpu_dist:wrap_accelerator_state_init",
        "accelerate enables FSDP only for GPU-like distributed types; FSDP2 runs on gloo.",
        only_without_cuda=True,
    ),
    Patch(
        "axolotl.loaders.model", "ModelLoader._set_device_map_config",
        "moce_plugin.integration.cpu_dist:wrap_set_device_map_config",
        "FSDP + QLoRA on CPU: axolotl pins each rank to device_map {'': LOCAL_RANK}, a CUDA "
        "index, and transformers fails with 'Cannot access accelerator device'.",
        only_without_cuda=True,
    ),
)

INSTANCE_PATCHES: tuple[tuple[str, str], ...] = (
    ("Trainer.compute_loss", "adds the load-balancing loss to whatever loss axolotl's "
     "trainer computes, scaled for gradient accumulation (integration/trainer.py)."),
    ("Trainer.log", "adds the aggregated routing metrics to the step logs and writes the "
     "per-layer detail to moce_routing.jsonl (integration/trainer.py)."),
    ("Trainer.data_collator / eval_data_collator", "wrapped by MoCEDataCollator to pad the "
     "per-token cluster ids (integration/trainer.py); for DPO by MoCEPreferenceCollator "
     "(integration/preference.py)."),
    ("*ForCausalLM._validate_model_kwargs", "lets generate() pass moce_cluster_ids through "
     "**kwargs to every forward step (model/upcycle.py)."),
    ("*ForCausalLM.generate (training with do_causal_lm_eval only)", "axolotl's generation "
     "metrics call generate with the decoded eval prompts' token ids only: each prompt's "
     "cluster is assigned from its text by the training artifact (integration/inference.py "
     "attach_eval_generation_clusters)."),
    ("*ForCausalLM.generate and a forward pre-hook (axolotl inference only)", "axolotl's "
     "inference CLIs call generate with token ids only: each prompt's cluster is assigned "
     "from its text (outputs/hf_native.py attach_prompt_clusters, integration/inference.py)."),
)

_PATCHED_FLAG = "_moce_patched"


def _resolve(module: str, attribute: str) -> tuple[Any, str, Any]:
    """(owner object, attribute name, current value) of a dotted target."""
    owner: Any = importlib.import_module(module)
    *parents, name = attribute.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name, getattr(owner, name)


def _factory(path: str) -> Callable[[Callable], Callable]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def check_targets() -> list[str]:
    """Problems with the patch targets in the installed libraries (empty when all exist)."""
    problems = []
    for patch in PATCHES:
        for module in (patch.module, *patch.also_in):
            try:
                _, _, value = _resolve(module, patch.attribute)
            except (ImportError, AttributeError) as exc:
                problems.append(f"{module}.{patch.attribute}: {exc}")
                continue
            if not callable(value):
                problems.append(f"{module}.{patch.attribute} is not callable")
    return problems


def install_patches() -> None:
    """Install every module-level patch once (idempotent)."""
    import torch

    for patch in PATCHES:
        if patch.only_without_cuda and torch.cuda.is_available():
            continue
        owner, name, original = _resolve(patch.module, patch.attribute)
        if getattr(original, _PATCHED_FLAG, False):
            continue
        replacement = _factory(patch.replacement)(original)
        setattr(replacement, _PATCHED_FLAG, True)
        setattr(owner, name, replacement)
        for module in patch.also_in:
            alias_owner, alias_name, _ = _resolve(module, patch.attribute)
            setattr(alias_owner, alias_name, replacement)
