"""Mutation check of the output-safety tests: plant one bug at a time in a scratch copy of
the repository and expect the named tests to fail (``python tests/mutate_outputs.py
[name-substring ...]``). The working tree is never mutated, also when the run is killed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MUTANTS = [
    ("export: non-empty DEST accepted", "moce_plugin/outputs/export.py",
     "and not overwrite:\n        raise ExportError", "and False:\n        raise ExportError",
     "tests/unit/test_output_safety.py", "non_empty"),
    ("export: DEST containing SRC accepted", "moce_plugin/outputs/export.py",
     "if dst in src.parents:", "if False:",
     "tests/unit/test_output_safety.py", "related_to_source"),
    ("export: DEST inside SRC accepted", "moce_plugin/outputs/export.py",
     "if src in dst.parents and not allow_inside_source:", "if False:",
     "tests/unit/test_output_safety.py", "related_to_source"),
    ("export: no writability probe", "moce_plugin/outputs/export.py",
     "mkdtemp(dir=parent, prefix=", "mkdtemp(dir=tempfile.gettempdir(), prefix=",
     "tests/unit/test_output_safety.py", "unwritable"),
    ("export: rmtree DEST like main", "moce_plugin/outputs/export.py",
     "    return atomic_dir(dest, fill, EXPORT_KIND)",
     "    tmp = Path(tempfile.mkdtemp(dir=dest.parent))\n    fill(tmp)\n"
     "    shutil.rmtree(dest, ignore_errors=True)\n    tmp.rename(dest)\n    return dest",
     "tests/unit/test_output_safety.py", "midway"),
    ("merge-lora: a previous merge is not replaced", "moce_plugin/integration/plugin.py",
     "base_model=cfg.base_model, overwrite=True,", "base_model=cfg.base_model, overwrite=False,",
     "tests/unit/test_output_safety.py", "merge_lora"),
    ("load: no fallback to model weights", "moce_plugin/outputs/folder.py",
     "    return moce_weights_from_model_files(directory, model)",
     "    return {}",
     "tests/unit/test_output_safety.py", "without_moce_weights"),
    ("load: sharded index ignored", "moce_plugin/outputs/folder.py",
     "        return [directory / f for f in sorted(shards)]", "        return []",
     "tests/unit/test_output_safety.py", "without_moce_weights"),
    ("load: PEFT prefix not stripped", "moce_plugin/outputs/folder.py",
     "    name = name.removeprefix(_PEFT_PREFIX)", "    pass",
     "tests/unit/test_output_safety.py", "adapter"),
    ("load: checkpoint needs its own config", "moce_plugin/outputs/load.py",
     "    if path.name.startswith(\"checkpoint-\") and", "    if False and",
     "tests/unit/test_output_safety.py", "checkpoint_without"),
    ("load: start-of-training weights accepted", "moce_plugin/outputs/load.py",
     "if own_config and meta.get(\"saved\") == \"start\":", "if False:",
     "tests/unit/test_output_safety.py", "start_of_training"),
    ("load: fingerprint not checked", "moce_plugin/outputs/load.py",
     "if difference and not allow_different_base:", "if False:",
     "tests/unit/test_output_safety.py", "other_base or different_base"),
    ("fingerprint: exact compare", "moce_plugin/outputs/fingerprint.py",
     "RTOL, ATOL = 2e-2, 1e-5", "RTOL, ATOL = 0.0, 0.0",
     "tests/unit/test_output_safety.py", "another_dtype"),
    ("fingerprint: quantized not skipped", "moce_plugin/outputs/fingerprint.py",
     "        return f\"quantized ({p.dtype})\"", "        return None",
     "tests/unit/test_output_safety.py", "quantized"),
    ("artifact: checksums not checked", "moce_plugin/clustering/artifact.py",
     "            check_files(path, metadata)\n", "",
     "tests/unit/test_artifact_integrity.py", "cut or edited"),
    ("artifact: checksums not written", "moce_plugin/clustering/pipeline.py",
     "        metadata[\"files\"] = file_checksums(tmp)", "        pass",
     "tests/unit/test_artifact_integrity.py", "records or edited"),
    ("artifact: bare JSONDecodeError on a bad line", "moce_plugin/clustering/artifact.py",
     "except (ValueError, KeyError, TypeError) as exc:", "except KeyError as exc:",
     "tests/unit/test_artifact_integrity.py", "oldest"),
    ("artifact: metadata read without the file name", "moce_plugin/clustering/artifact.py",
     "metadata = read_json(path / METADATA_FILE, \"cluster artifact metadata\")",
     "metadata = json.loads((path / METADATA_FILE).read_text())",
     "tests/unit/test_artifact_integrity.py", "metadata_names"),
    ("data: empty-file check removed", "moce_plugin/clustering/pipeline.py",
     "        if _is_empty_file(Path(str(dc.path))):", "        if False:",
     "tests/unit/test_artifact_integrity.py", "says_empty"),
    ("data: no check after loading", "moce_plugin/clustering/pipeline.py",
     "        if len(ds) == 0:", "        if False:",
     "tests/unit/test_artifact_integrity.py", "empty_split"),
    ("data: loader's no-data error not mapped", "moce_plugin/clustering/pipeline.py",
     "            if \"corresponds to no data\" in str(exc):", "            if False:",
     "tests/unit/test_artifact_integrity.py", "found_when"),
    ("lm-eval: device passed through", "moce_plugin/outputs/lm_eval.py",
     "        device = pick_device(device)", "        pass",
     "tests/unit/test_output_safety.py", "lm_eval_device"),
    ("lm-eval: pick_device keeps cuda", "moce_plugin/outputs/lm_eval.py",
     "    if device and not (str(device).startswith(\"cuda\") and not torch.cuda.is_available()):",
     "    if device:", "tests/unit/test_output_safety.py", "lm_eval_device"),
    ("cli: tracebacks", "moce_plugin/utils.py",
     "    except (ValueError, OSError) as exc:", "    except KeyError as exc:",
     "tests/unit/test_output_safety.py", "cli"),
    ("generate: no --cluster check", "moce_plugin/outputs/generate.py",
     "    _check_clusters_assignable(moce, args.cluster)\n", "",
     "tests/unit/test_output_safety.py", "generate_cli_errors"),
    ("usage: json.loads of the data file", "moce_plugin/outputs/usage.py",
     "        rows = read_rows(Path(args.data))",
     "        rows = [__import__('json').loads(x)\n"
     "                for x in Path(args.data).read_text().splitlines() if x.strip()]",
     "tests/unit/test_output_safety.py", "usage_cli"),
    ("load: load-time key renaming reversed on save", "moce_plugin/outputs/load.py",
     "        _forget_base_mlp_mapping(model)\n", "",
     "tests/unit/test_output_safety.py", "checkpoint_without"),
    # issue 25: nothing a user points at is replaced; stale state is refused
    ("write: anything replaced", "moce_plugin/utils.py",
     "    if target.is_dir() and (not any(target.iterdir()) or kind.is_own(target)):",
     "    if True:", "tests/unit/test_write_safety.py", "never_replaces or only_an_earlier"),
    ("write: artifact kind accepts any metadata.json", "moce_plugin/clustering/artifact.py",
     "isinstance(meta.get(\"format_version\"), int)\n            and \"num_clusters\" in meta)",
     "True)", "tests/unit/test_write_safety.py", "never_replaces"),
    ("write: cluster command checks after loading the data", "moce_plugin/clustering/cli.py",
     "    check_replaceable(out, ARTIFACT_KIND)  # before", "    pass  # before",
     "tests/unit/test_write_safety.py", "before_loading_the_data"),
    ("write: training checks output_dir/cluster_artifact late", "moce_plugin/integration/plugin.py",
     "            check_artifact_copy_target(moce.cluster_artifact, cfg.output_dir)",
     "            pass", "tests/unit/test_write_safety.py", "foreign_cluster_artifact_folder"),
    ("export: --overwrite replaces a user's folder", "moce_plugin/outputs/export.py",
     "and not is_export(dst):", "and False:", "tests/unit/test_output_safety.py", "non_empty"),
    ("write: mkdtemp's 0700", "moce_plugin/utils.py",
     "    tmp.mkdir()  # not mkdtemp", "    tmp.mkdir(0o700)  # not mkdtemp",
     "tests/unit/test_write_safety.py", "umask"),
    ("write: a copied folder keeps its source's mode", "moce_plugin/utils.py",
     "        _apply_mode(tmp, mode)\n", "", "tests/unit/test_write_safety.py", "umask"),
    ("write: killed runs' temporaries kept", "moce_plugin/utils.py",
     "    removed: list[Path] = []\n    if not target.parent.is_dir():",
     "    removed: list[Path] = []\n    if True:", "tests/unit/test_write_safety.py",
     "temporaries or killed"),
    ("write: every temporary is stale", "moce_plugin/utils.py",
     "    match = _SIDE.fullmatch(rest)\n", "    return True\n",
     "tests/unit/test_write_safety.py", "temporaries"),
    ("write: reused pid taken for a live run", "moce_plugin/utils.py",
     "started is None or started > mtime + 1.0", "started is None",
     "tests/unit/test_write_safety.py", "temporaries"),
    ("stale: clustering settings not compared", "moce_plugin/integration/args.py",
     "    model.check_settings(ClusteringOptions.from_dict(moce.get(\"clustering\")))\n", "",
     "tests/unit/test_stale_state.py", "clustering_settings or without_the_settings"),
    ("stale: algorithm auto not resolved", "moce_plugin/clustering/artifact.py",
     "given = choose_algorithm(int(meta[\"num_rows\"]), \"auto\")", "pass",
     "tests/unit/test_stale_state.py", "same_clustering_settings"),
    ("stale: resume not compared", "moce_plugin/integration/plugin.py",
     "            check_resume_config(cfg, moce)\n", "            pass\n",
     "tests/unit/test_stale_state.py", "resume"),
    ("stale: auto-resume not seen", "moce_plugin/integration/plugin.py",
     "        return max(steps)[1] if steps else None", "        return None",
     "tests/unit/test_stale_state.py", "resume"),
    ("stale: resume reads only the checkpoint's config", "moce_plugin/integration/plugin.py",
     "(checkpoint, checkpoint.parent)", "(checkpoint,)",
     "tests/unit/test_stale_state.py", "resume"),
    ("stale: MoCE weights checksum not compared", "moce_plugin/outputs/load.py",
     "meta if config_dir == path and source_file == MOCE_WEIGHTS_NAME else None)", "None)",
     "tests/unit/test_stale_state.py", "checksum"),
    ("stale: a borrowed config's checksum compared", "moce_plugin/outputs/load.py",
     "meta if config_dir == path and source_file == MOCE_WEIGHTS_NAME else None)", "meta)",
     "tests/unit/test_stale_state.py", "borrowing"),
    ("stale: non-finite MoCE weights loaded", "moce_plugin/outputs/folder.py",
     "        if t.is_floating_point() and t.numel() and not _all_finite(t):",
     "        if False:", "tests/unit/test_stale_state.py", "non_finite"),
    ("stale: NaN passes the finiteness test", "moce_plugin/outputs/folder.py",
     "    return bool(torch.isfinite(lo) & torch.isfinite(hi))", "    return True",
     "tests/unit/test_export_weights.py", "nan"),
    ("export: remote-code load skips the MoCE weights check", "moce_plugin/outputs/hf_native.py",
     "            check_export_weights(folder, self)", "            pass",
     "tests/unit/test_export_weights.py", "nan or checksum"),
    ("export: remote-code load ignores the recorded checksum", "moce_plugin/outputs/hf_native.py",
     "    if not recorded or moce_weights_checksum(state) == recorded:", "    if True:",
     "tests/unit/test_export_weights.py", "checksum"),
    ("stale: output's artifact fingerprint not compared", "moce_plugin/outputs/load.py",
     "            if recorded and model.fingerprint != recorded:", "            if False:",
     "tests/unit/test_stale_state.py", "reclustered_artifact and output"),
    ("stale: artifact fingerprint not recorded", "moce_plugin/integration/plugin.py",
     "            self._meta[ARTIFACT_META_KEY] = cluster_model_of(moce).fingerprint",
     "            pass", "tests/unit/test_stale_state.py", "records_the_artifact"),
    ("stale: resume with a re-clustered artifact", "moce_plugin/integration/plugin.py",
     "        if current != recorded:", "        if False:",
     "tests/unit/test_stale_state.py", "resume_refuses_a_reclustered"),
    # slow: a real axolotl train each (about a minute)
    ("plugin: nothing written when training starts", "moce_plugin/integration/plugin.py",
     "MoCECheckpointCallback(moce, self._meta), MoCEOutputDirCallback(moce, self._meta)]",
     "MoCECheckpointCallback(moce, self._meta)]", "tests/e2e/test_e2e_interrupt.py", "SIGINT"),
    ("plugin: SIGINT snapshot not stamped", "moce_plugin/integration/plugin.py",
     "        self._chain_sigint(out)\n", "", "tests/e2e/test_e2e_interrupt.py", "SIGINT"),
]


def _ignore(folder: str, names: list[str]) -> set[str]:
    """Not copied: caches, virtual environments, models and run outputs at the top level
    (not the package's moce_plugin/outputs)."""
    skip = {".venv", ".venv-vllm", ".git", "__pycache__", ".pytest_cache", ".moce_cache"}
    if Path(folder) == ROOT:
        skip.add("outputs")
    if Path(folder) == ROOT / "examples":
        skip.add("models")
    return skip & set(names)


def main(only: list[str]) -> int:
    caught = total = 0
    with tempfile.TemporaryDirectory(prefix="mutate_outputs-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=_ignore)
        env = {**os.environ, "PYTHONPATH": str(copy)}  # the copy, not an installed package
        for name, file, old, new, test, k in MUTANTS:
            if only and not any(o in name for o in only):
                continue
            total += 1
            path = copy / file
            original = path.read_text()
            if original.count(old) != 1:
                print(f"STALE    {name}: the text occurs {original.count(old)} times in {file}")
                continue
            path.write_text(original.replace(old, new))
            try:
                proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                                       "no:warnings", "-p", "no:cacheprovider", test, "-k", k],
                                      cwd=copy, env=env, capture_output=True, text=True)
            finally:
                path.write_text(original)
            ok = proc.returncode == 1
            caught += ok
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            print(f"{'CAUGHT  ' if ok else 'MISSED  '}{name}  (rc {proc.returncode}: {last})",
                  flush=True)
    print(f"{caught} of {total} caught")
    return 0 if caught == total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
