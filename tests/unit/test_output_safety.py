"""Exports never destroy, every folder a run leaves is loadable (or refused with the reason),
the base model is the one trained on, and the CLIs report errors as one line."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from axolotl_helpers import sample_rows
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from test_inference import CFG, CLUSTERS, IDS, _full_output, _logits, _perturb, base_dir
from tiny_models import save_tiny_model_dir
from transformers import AutoModelForCausalLM

from moce_plugin.model.upcycle import upcycle_model
from moce_plugin.outputs import export as export_mod
from moce_plugin.outputs.export import ExportError, export_model
from moce_plugin.outputs.export import main as export_main
from moce_plugin.outputs.fingerprint import base_fingerprint
from moce_plugin.outputs.folder import (
    MOCE_CONFIG_NAME,
    MOCE_WEIGHTS_NAME,
    output_meta,
    read_meta,
    save_moce_files,
    saved_meta,
    write_moce_config,
)
from moce_plugin.outputs.generate import main as generate_main
from moce_plugin.outputs.load import MoCELoadError, load_moce_model
from moce_plugin.utils import FileFormatError

__all__ = ["base_dir"]  # the module-scoped fixture, shared with test_inference


def _lora_output(base, out: Path) -> torch.nn.Module:
    """A LoRA output whose meta is what training records (fingerprint included)."""
    model = upcycle_model(AutoModelForCausalLM.from_pretrained(base), CFG)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "gate_proj"], modules_to_save=["moce_experts"]))
    meta = output_meta({"base_model": str(base), "datasets": []}, peft_model)
    _perturb(peft_model, seed=1)
    peft_model.save_pretrained(out)
    save_moce_files(peft_model, CFG, out, meta)
    return peft_model


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Same tokenizer and config as base_dir, other weights (another seed)."""
    texts = [t for r in sample_rows(200) for t in (r["instruction"], r["output"])]
    return save_tiny_model_dir(tmp_path_factory.mktemp("other"), texts, seed=1)


@pytest.fixture
def lora_out(tmp_path, base_dir):
    trained = _lora_output(base_dir, tmp_path / "run")
    return tmp_path / "run", _logits(trained, IDS, CLUSTERS)


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _no_load(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(export_mod, "load_moce_model", fail)


# ---- exports never destroy ---------------------------------------------------------------------
def test_export_refuses_non_empty_dest_and_keeps_its_files(tmp_path, lora_out, monkeypatch):
    src, _ = lora_out
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    _no_load(monkeypatch)
    for overwrite in (False, True):  # a user's folder is never replaced
        with pytest.raises(ExportError, match=f"{dest} is not empty and is not an earlier "
                           "export .* never replaced, also with --overwrite"):
            export_model(src, dest, overwrite=overwrite)
    (dest / "moce_export.json").write_text("{}")  # an earlier export: only with --overwrite
    with pytest.raises(ExportError, match="holds an earlier export: pass --overwrite"):
        export_model(src, dest)
    assert (dest / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_refuses_dest_related_to_source(tmp_path, lora_out, monkeypatch, where, overwrite):
    src, _ = lora_out
    dest = {"same": src, "inside": src / "merged", "contains": tmp_path}[where]
    before = _tree(src)
    _no_load(monkeypatch)
    match = {"same": "is the folder being exported", "inside": "is inside the folder",
             "contains": "contains the folder being exported"}[where]
    with pytest.raises(ExportError, match=match):
        export_model(src, dest, overwrite=overwrite)
    assert _tree(src) == before


def test_export_refuses_unwritable_parent_before_loading(tmp_path, lora_out, monkeypatch):
    src, _ = lora_out
    _no_load(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ExportError, match="cannot write to"):
        export_model(src, afile / "dest")
    if sys.platform.startswith("linux"):  # read-only even for root
        with pytest.raises(ExportError, match="cannot write to /proc"):
            export_model(src, "/proc/moce_dest")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(ExportError, match="cannot write to"):
                export_model(src, ro / "dest")
        finally:
            ro.chmod(0o755)


def test_export_failure_midway_leaves_dest_and_no_temporary(tmp_path, lora_out, monkeypatch):
    src, _ = lora_out
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    (dest / "moce_export.json").write_text("{}")  # an earlier export, which overwrite replaces

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "save_moce_files", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(src, dest, overwrite=True)
    assert _tree(dest) == {"old.txt": hashlib.sha256(b"old").hexdigest(),
                           "moce_export.json": hashlib.sha256(b"{}").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "run"]


def test_export_overwrite_replaces_dest_and_never_touches_source(tmp_path, lora_out):
    src, expected = lora_out
    before = _tree(src)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    (dest / "moce_export.json").write_text("{}")  # an earlier export
    export_model(src, dest, overwrite=True)
    assert not (dest / "old.txt").exists() and (dest / "README.md").is_file()
    assert _tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "run"]
    torch.testing.assert_close(_logits(load_moce_model(dest).model, IDS, CLUSTERS), expected,
                               atol=1e-5, rtol=1e-5)


def test_export_cli_prints_one_line_and_exits_2(tmp_path, lora_out, capsys):
    src, _ = lora_out
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(src), str(src / "merged")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moce_plugin.export: error: DEST")
    with pytest.raises(SystemExit):
        export_main([str(src), str(src), "--debug"])
    assert "Traceback" in capsys.readouterr().err


def test_merge_lora_route_refuses_foreign_files_and_replaces_a_previous_merge(lora_out):
    from axolotl.utils.dict import DictDefault

    from moce_plugin.integration.plugin import wrap_merge_lora

    src, expected = lora_out
    cfg = DictDefault(moce={"num_clusters": 3}, output_dir=str(src), lora_model_dir=str(src),
                      base_model=None)
    merge = wrap_merge_lora(lambda cfg: pytest.fail("axolotl's merge ran"))
    merged = src / "merged"
    merged.mkdir()
    (merged / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not empty"):
        merge(cfg=cfg)
    (merged / "notes.txt").unlink()
    merge(cfg=cfg)  # empty merged/ (axolotl's layout: inside the run) is fine
    (merged / "stale.txt").write_text("from the first merge")
    (merged / "moce_export.json").touch()  # still a previous merge: replaced, as axolotl does
    merge(cfg=cfg)
    assert not (merged / "stale.txt").exists() and (merged / "moce_export.json").is_file()
    torch.testing.assert_close(_logits(load_moce_model(merged).model, IDS, CLUSTERS), expected,
                               atol=1e-5, rtol=1e-5)


# ---- a run that added tokens ---------------------------------------------------------------
def _lora_output_with_added_tokens(base, out: Path, modules_to_save: list[str]) -> torch.nn.Module:
    """What axolotl trains for ``tokens: [...]`` with LoRA: the base's embeddings resized to
    the tokenizer (two new rows), the resized embedding and head saved whole with the adapter."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<tool>", "</tool>"])
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    model = upcycle_model(model, CFG)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save))
    meta = output_meta({"base_model": str(base), "datasets": []}, peft_model)
    _perturb(peft_model, seed=2)
    with torch.no_grad():  # the new tokens' rows are trained (not a fresh resize's)
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name and ("embed_tokens" in name or "lm_head" in name):
                p[-2:].normal_(generator=torch.Generator().manual_seed(3))
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_moce_files(peft_model, CFG, out, meta)
    return peft_model


def test_lora_output_of_a_run_that_added_tokens_loads_exactly(tmp_path, base_dir):
    out = tmp_path / "run"
    trained = _lora_output_with_added_tokens(
        base_dir, out, ["embed_tokens", "lm_head", "moce_experts"])
    ids = torch.cat([IDS, torch.full((2, 1), 2001)], dim=1)  # a new token's id too
    moce = load_moce_model(out)
    assert moce.model.get_input_embeddings().num_embeddings == len(moce.tokenizer) == 2002
    expected = _logits(trained, ids, CLUSTERS)
    assert expected.shape[-1] == 2002
    torch.testing.assert_close(_logits(moce.model, ids, CLUSTERS), expected, atol=0, rtol=0)
    exported = export_model(out, tmp_path / "exported")  # merged: LoRA rounding only
    torch.testing.assert_close(_logits(load_moce_model(exported).model, ids, CLUSTERS),
                               expected, atol=1e-5, rtol=1e-5)


def test_lora_output_with_added_tokens_frozen_embedding_loads_exactly(tmp_path, base_dir):
    # without lora_modules_to_save PEFT still saves the resized (frozen) embedding and head
    out = tmp_path / "run"
    trained = _lora_output_with_added_tokens(base_dir, out, ["moce_experts"])
    ids = torch.cat([IDS, torch.full((2, 1), 2001)], dim=1)
    torch.testing.assert_close(_logits(load_moce_model(out).model, ids, CLUSTERS),
                               _logits(trained, ids, CLUSTERS), atol=0, rtol=0)


def test_lora_output_without_the_resized_embedding_is_refused(tmp_path, base_dir):
    out = tmp_path / "run"
    _lora_output_with_added_tokens(base_dir, out, ["moce_experts"])
    weights = out / "adapter_model.safetensors"
    kept = {k: v for k, v in load_file(str(weights)).items() if "embed_tokens" not in k}
    save_file(kept, str(weights))  # an adapter saved with save_embedding_layers=False
    with pytest.raises(MoCELoadError, match=r"2002 token embeddings.*model\.embed_tokens"):
        load_moce_model(out)


# ---- weights other accounts can read (the umask, not safetensors' 0600) ------------------------
@pytest.fixture
def umask_002():
    old = os.umask(0o002)  # group-writable: differs from both 0600 and the usual 0644
    yield 0o664
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_files_get_the_umask_mode(tmp_path, lora_out, umask_002):
    # safetensors >= 0.8 writes 0600 (a renamed temporary file): the export's weights, written
    # by save_pretrained and by us, would be the only files a serving account cannot read.
    src, _ = lora_out
    dest = export_model(src, tmp_path / "exported")
    modes = _modes(dest)
    assert {"model.safetensors", MOCE_WEIGHTS_NAME} <= set(modes)
    assert modes == dict.fromkeys(modes, umask_002)


def test_training_weights_get_the_umask_mode(tmp_path, base_dir, umask_002):
    from types import SimpleNamespace

    from axolotl.utils.dict import DictDefault

    from moce_plugin.integration.plugin import MoCEPlugin
    from moce_plugin.integration.trainer import MoCECheckpointCallback

    out = tmp_path / "run"
    model = _full_output(base_dir, out)  # what the trainer saved: model.safetensors
    checkpoint = out / "checkpoint-2"
    model.save_pretrained(checkpoint)
    for weights in (out / "model.safetensors", checkpoint / "model.safetensors"):
        weights.chmod(0o600)  # as safetensors >= 0.8 leaves them, whatever this one did
    state = SimpleNamespace(global_step=2, is_world_process_zero=True)
    MoCECheckpointCallback(CFG, {}).on_save(SimpleNamespace(output_dir=str(out)), state, None,
                                            model=model)
    assert _modes(checkpoint)["model.safetensors"] == umask_002
    assert _modes(checkpoint)[MOCE_WEIGHTS_NAME] == umask_002
    cfg = DictDefault(moce=CFG.model_dump(mode="json"), output_dir=str(out), base_model=None,
                      datasets=[])
    MoCEPlugin().post_train(cfg, model)
    assert _modes(out)["model.safetensors"] == umask_002
    assert _modes(out)[MOCE_WEIGHTS_NAME] == umask_002


# ---- every folder a run leaves is loadable --------------------------------------------------
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_full_output_without_moce_weights_loads_them_from_the_model(tmp_path, base_dir,
                                                                      sharded):
    out = tmp_path / "out"
    trained = _full_output(base_dir, out)
    (out / MOCE_WEIGHTS_NAME).unlink()
    if sharded:
        (out / "model.safetensors").unlink()
        trained.save_pretrained(out, max_shard_size="100KB")
        assert (out / "model.safetensors.index.json").is_file()
    moce = load_moce_model(out)
    assert torch.equal(_logits(moce.model, IDS, CLUSTERS), _logits(trained, IDS, CLUSTERS))


def test_lora_output_without_moce_weights_loads_them_from_the_adapter(lora_out):
    src, expected = lora_out
    (src / MOCE_WEIGHTS_NAME).unlink()
    moce = load_moce_model(src)
    assert torch.equal(_logits(moce.model, IDS, CLUSTERS), expected)
    merged = load_moce_model(src, merge_lora=True)  # plain names, adapter file keys wrapped
    torch.testing.assert_close(_logits(merged.model, IDS, CLUSTERS), expected, atol=1e-5,
                               rtol=1e-5)
    # and not from the start-of-training values PEFT would otherwise keep
    fresh = upcycle_model(AutoModelForCausalLM.from_pretrained(moce.meta["base_model"]), CFG)
    assert not torch.equal(_logits(fresh, IDS, CLUSTERS), expected)


def test_checkpoint_without_moce_files_uses_the_runs_config(tmp_path, base_dir):
    out = tmp_path / "out"
    trained = _full_output(base_dir, out)
    trained.save_pretrained(out / "checkpoint-4")  # stopped before our on_save ran
    moce = load_moce_model(out / "checkpoint-4")
    expected = _logits(trained, IDS, CLUSTERS)
    assert torch.equal(_logits(moce.model, IDS, CLUSTERS), expected)
    export_model(out / "checkpoint-4", tmp_path / "exported")
    # a full model re-saved keeps its key names (transformers reverses load-time renamings)
    keys = load_file(str(tmp_path / "exported" / "model.safetensors")).keys()
    assert "model.layers.0.mlp.moce_experts.up" in keys and all(k.startswith(
        ("model.", "lm_head.")) for k in keys), sorted(keys)[:3]
    exported = _logits(load_moce_model(tmp_path / "exported").model, IDS, CLUSTERS)
    assert torch.equal(exported, expected)


def test_start_of_training_weights_are_refused_naming_the_newest_checkpoint(tmp_path, base_dir):
    out = tmp_path / "out"
    _full_output(base_dir, out)
    write_moce_config(out, CFG, saved_meta(read_meta(out), "start", 0))
    (out / MOCE_WEIGHTS_NAME).unlink()
    for step in (2, 10):
        (out / f"checkpoint-{step}").mkdir()
    with pytest.raises(MoCELoadError, match="saved when training started.*checkpoint-10"):
        load_moce_model(out)
    write_moce_config(out, CFG, saved_meta(read_meta(out), "interrupted", 7))
    load_moce_model(out)


def test_folder_without_any_weights_is_explained(tmp_path):
    write_moce_config(tmp_path, CFG, {})
    with pytest.raises(MoCELoadError, match="neither moce_weights.safetensors nor model"):
        load_moce_model(tmp_path)


def test_damaged_moce_config_names_the_file(tmp_path, base_dir):
    out = tmp_path / "out"
    _full_output(base_dir, out)
    (out / MOCE_CONFIG_NAME).write_text('{"num_clusters": 3,')
    with pytest.raises(FileFormatError, match=f"{out / MOCE_CONFIG_NAME} is damaged"):
        load_moce_model(out)


# ---- base model identity ------------------------------------------------------------------------
def test_other_base_of_the_same_shape_is_refused_unless_allowed(lora_out, other_base):
    src, expected = lora_out
    assert json.loads((other_base / "config.json").read_text()) == json.loads(
        (Path(read_meta(src)["base_model"]) / "config.json").read_text())
    with pytest.raises(MoCELoadError, match="same shape .* but other weights"):
        load_moce_model(src, base_model=str(other_base))
    moce = load_moce_model(src, base_model=str(other_base), allow_different_base=True)
    assert not torch.allclose(_logits(moce.model, IDS, CLUSTERS), expected)


def test_base_in_another_dtype_still_matches(tmp_path, lora_out, base_dir):
    src, expected = lora_out
    bf16 = tmp_path / "base_bf16"
    AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bf16 / name).write_bytes((base_dir / name).read_bytes())
    load_moce_model(src, base_model=str(bf16))  # no error: same weights, rounded


def test_generate_cli_flag_allows_a_different_base(lora_out, other_base, capsys):
    src, _ = lora_out
    args = [str(src), "--prompt", "hi", "--cluster", "0", "--max-new-tokens", "2",
            "--base-model", str(other_base)]
    with pytest.raises(SystemExit):
        generate_main(args)
    assert "--allow-different-base" in capsys.readouterr().err
    assert generate_main([*args, "--allow-different-base", "--no-stream"]) == 0


def test_fingerprint_skips_quantized_tensors_and_says_so(base_dir):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    for proj in ("gate_proj", "up_proj", "down_proj"):  # as bitsandbytes stores them
        linear = getattr(model.model.layers[0].mlp, proj)
        linear.weight = torch.nn.Parameter(linear.weight.data.to(torch.int8),
                                           requires_grad=False)
    fp = base_fingerprint(model)
    assert fp["skipped"] == {"model.layers.0.mlp.down_proj.weight": "quantized (torch.int8)"}
    assert sorted(fp["tensors"]) == ["model.embed_tokens.weight",
                                     "model.layers.1.mlp.down_proj.weight"]
    assert len(fp["tensors"]["model.embed_tokens.weight"]["values"]) == 16


# ---- CLI errors ----------------------------------------------------------------------
def _one_error_line(capsys) -> str:
    """The one error line (transformers' progress bars may precede it), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_generate_cli_errors_are_one_line_with_the_fix(tmp_path, base_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_main([str(base_dir), "--prompt", "hi"])
    assert exit_info.value.code == 2
    assert "is missing moce_config.json" in _one_error_line(capsys)
    out = tmp_path / "out"
    _full_output(base_dir, out)
    with pytest.raises(SystemExit):
        generate_main([str(out), "--prompt", "hi"])  # no artifact, no --cluster
    assert "pass --cluster <0..2>" in _one_error_line(capsys)
    with pytest.raises(SystemExit):
        generate_main([str(out), "--prompt", "hi", "--cluster", "7"])
    assert "--cluster 7 is out of range" in _one_error_line(capsys)
    (out / MOCE_CONFIG_NAME).write_text("{")
    with pytest.raises(SystemExit):
        generate_main([str(out), "--prompt", "hi", "--cluster", "0"])
    assert f"{out / MOCE_CONFIG_NAME} is damaged" in _one_error_line(capsys)
    with pytest.raises(SystemExit):
        generate_main([str(out), "--prompt", "hi", "--cluster", "0", "--debug"])
    assert "Traceback" in capsys.readouterr().err


def test_usage_cli_names_a_damaged_data_file(tmp_path, base_dir, capsys):
    from moce_plugin.outputs.usage import main as usage_main

    out = tmp_path / "out"
    _full_output(base_dir, out)
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a", "cluster_id": 0}\n{"text": "b", "clu\n')
    with pytest.raises(SystemExit) as exit_info:
        usage_main([str(out), "--data", str(data)])
    assert exit_info.value.code == 2
    assert f"{data} is damaged at line 2" in _one_error_line(capsys)
    data.write_text('{"text": "a"}\n')
    with pytest.raises(SystemExit):
        usage_main([str(out), "--data", str(data)])
    assert "give every row" in _one_error_line(capsys)


def test_lm_eval_device_falls_back_like_hf(monkeypatch, tmp_path, base_dir):
    from moce_plugin.outputs.lm_eval import MoCELM, pick_device

    _full_output(base_dir, tmp_path / "out")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = MoCELM(path=str(tmp_path / "out"), device="cuda:0")  # what lm-eval's CLI passes
    assert lm.device.type == "cpu" and next(lm.model.parameters()).device.type == "cpu"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # lm-eval's CLI passes cuda:0 unless --device is given
    assert [pick_device(d) for d in (None, "cuda:0", "cuda", "cpu")] == ["cpu"] * 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [pick_device(d) for d in (None, "cuda:1", "cpu")] == ["cuda", "cuda:1", "cpu"]


def test_routing_log_cut_by_a_killed_run_skips_the_plot(tmp_path):
    from moce_plugin.outputs.plots import plot_routing_log

    (tmp_path / "moce_routing.jsonl").write_text('{"step": 1, "layers": {"0": {"expert_lo')
    with pytest.warns(UserWarning, match="routing log .*moce_routing.jsonl is damaged at line 1"):
        assert plot_routing_log(tmp_path) is None


def test_fingerprint_samples_tensors_larger_than_float32_indices():
    """SmolLM2's embedding has 28.3M values: positions computed in float32 ran past the end."""
    from moce_plugin.outputs.fingerprint import _samples

    big = torch.zeros(49152 * 576)
    big[0], big[-1] = 3.0, 7.0
    values = _samples(big)
    assert values[0] == 3.0 and values[-1] == 7.0
