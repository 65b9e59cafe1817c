"""Mutation check of issue 25's tests: the planted bugs that survived the second round and
the bad-input fixes, planted one at a time in a scratch copy of the repository; each must make
its named tests fail (``python tests/mutate_teeth.py [name-substring ...]``). Prints CAUGHT /
MISSED per bug."""

from __future__ import annotations

import sys

from mutation_runner import Mutant, run_mutants

MUTANTS: list[Mutant] = [
    # -- the five survivors of the second round
    ("entropy: padding counted in the logged router entropy", "moce_plugin/model/layer.py",
     "entropy = router_entropy(routing.probs, valid)",
     "entropy = router_entropy(routing.probs, torch.ones_like(valid))",
     "tests/unit/test_teeth.py", "entropy"),
    ("acmoe: moving-average weights swapped", "moce_plugin/model/routers.py",
     "m * running + (1 - m) * batch", "(1 - m) * running + m * batch",
     "tests/unit/test_teeth.py", "acmoe"),
    ("acmoe: statistics updated in eval mode", "moce_plugin/model/routers.py",
     "            if self.training:\n                m = self.momentum",
     "            if True:\n                m = self.momentum",
     "tests/unit/test_teeth.py", "acmoe"),
    ("text: template fields formatted with str(v)", "moce_plugin/clustering/text.py",
     "values = _EmptyMissing({k: _as_text(v) for k, v in row.items()})",
     "values = _EmptyMissing({k: str(v) for k, v in row.items()})",
     "tests/unit/test_teeth.py", "template"),
    ("hf-native: attention mask ignored when decoding", "moce_plugin/outputs/hf_native.py",
     "            if attention_mask is not None:\n                row = [",
     "            if False:\n                row = [",
     "tests/unit/test_teeth.py", "left_padded"),
    ("load: full output with base_model= not fingerprinted", "moce_plugin/outputs/load.py",
     "check_base(model, source, from_folder=base_model is None)",
     "check_base(model, source, from_folder=True)",
     "tests/unit/test_teeth.py", "fingerprint"),
    # -- the kept-back classes: generation paths against full recomputation
    ("generate: cached steps take the prompt's first per-token id",
     "moce_plugin/model/routing.py",
     "return ids[:, -seq:] if ids.shape[1] > seq", "return ids[:, :seq] if ids.shape[1] > seq",
     "tests/unit/test_teeth.py", "cached_generation and per_token"),
    ("generate: batch padded on the right", "moce_plugin/outputs/load.py",
     'tok.padding_side = "left"  # generation continues at the right edge',
     'tok.padding_side = "right"', "tests/unit/test_teeth.py", "left_padded_batch_generation"),
    # -- issue 25 items 6-13
    ("6: damaged moce_weights raises safetensors' own error", "moce_plugin/outputs/folder.py",
     "        return load_file(str(file))\n    except (SafetensorError, RuntimeError) as exc:",
     "        return load_file(str(file))\n    except KeyError as exc:",
     "tests/unit/test_user_errors.py", "truncated_moce"),
    ("6: damaged adapter raises safetensors' own error", "moce_plugin/outputs/load.py",
     "    except SafetensorError as exc:\n        names",
     "    except KeyError as exc:\n        names",
     "tests/unit/test_user_errors.py", "truncated_adapter"),
    ("7: artifact location checked only after loading the data",
     "moce_plugin/clustering/cli.py",
     "    check_locations(Path(out), options)\n",
     "", "tests/unit/test_user_errors.py", "under_a_file"),
    ("8: clustering ignores the dataset's roles and fields", "moce_plugin/clustering/pipeline.py",
     "loaded = [(name, ds, dataset_row_view(entry))",
     "loaded = [(name, ds, dataset_row_view(None))",
     "tests/unit/test_request_text.py", "custom_roles"),
    ("8: training lookup ignores the dataset's roles", "moce_plugin/integration/datasets.py",
     "view = dataset_row_view(dataset_config)", "view = dataset_row_view(None)",
     "tests/unit/test_request_text.py", "custom_roles"),
    ("8: role aliases not mapped", "moce_plugin/clustering/text.py",
     "canonical.get(role.lower(), role)", "role",
     "tests/unit/test_request_text.py", "custom_roles"),
    ("9: no size limit", "moce_plugin/model/size.py",
     "if limit is not None and nbytes > limit:", "if False:",
     "tests/unit/test_user_errors.py", "absurd"),
    ("9: size counts one adapter matrix", "moce_plugin/model/size.py",
     "+ 2 * experts * hidden_size * config.adapter_dim)",
     "+ experts * hidden_size * config.adapter_dim)",
     "tests/unit/test_user_errors.py", "parameter_count"),
    ("10: relative base not resolved", "moce_plugin/outputs/load.py",
     "recorded in {adapter_cfg}\"\n"
     "        base = base if base_model else _resolve_base(base, path)",
     "recorded in {adapter_cfg}\"\n        base = base",
     "tests/unit/test_user_errors.py", "relative_base"),
    ("10: base load error without --base-model", "moce_plugin/outputs/load.py",
     "    except OSError as exc:\n        first", "    except KeyError as exc:\n        first",
     "tests/unit/test_user_errors.py", "missing_base"),
    ("11: transformers' remote-code copy left on", "moce_plugin/outputs/hf_native.py",
     "        cls._auto_class = None\n", "        pass\n",
     "tests/e2e/test_hf_native.py", "save_pretrained_of"),
    ("11: artifact not copied by save_pretrained", "moce_plugin/outputs/hf_native.py",
     "_EXPORT_EXTRAS = (ARTIFACT_DIR_NAME, ENCODER_DIR_NAME)", "_EXPORT_EXTRAS = ()",
     "tests/e2e/test_hf_native.py", "save_pretrained_of"),
    ("12: model card without trust_remote_code for the tokenizer",
     "moce_plugin/outputs/hf_export.py",
     'AutoTokenizer.from_pretrained("<this folder>", trust_remote_code=True)',
     'AutoTokenizer.from_pretrained("<this folder>")',
     "tests/e2e/test_hf_native.py", "tokenizer_loads"),
    ("13: split rows aligned by position", "moce_plugin/integration/datasets.py",
     '        if len(out["input_ids"]) == len(ids):', "        if True:",
     "tests/unit/test_data.py", "completion"),
    ("13: every chunk gets the batch's first id", "moce_plugin/integration/datasets.py",
     "                [int(cid)] * len(t) for t in part[\"input_ids\"])",
     "                [int(ids[0])] * len(t) for t in part[\"input_ids\"])",
     "tests/unit/test_data.py", "completion"),
]


if __name__ == "__main__":
    sys.exit(run_mutants(MUTANTS, sys.argv[1:], "mutate_teeth-", ("-m", "not slow")))
