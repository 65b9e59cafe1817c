"""Sharded training for real: FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 runs of `axolotl train`
with MoCE, 2 gloo processes on CPU, launched the way axolotl documents it
(``accelerate launch -m axolotl.cli.train CFG``).

The sharding settings are the examples' own (``fsdp_version`` / ``fsdp_config`` of
examples/llama2-moce-fsdp.yml, ``examples/deepspeed/zero2.json`` and ``zero3_bf16.json``).
What a tiny CPU run overrides: the model/data/batch/step settings of ``base_config`` and its
CPU settings (fp32, sdpa attention, no LoRA kernels), nothing in the sharding config.

Checked for each mode, against a single-process run with the same global batch (2 ranks x
micro-batch 2 x accumulation 2 = 1 process x 2 x 4), seed and data:

* per-step training loss within LOSS_TOL (below);
* the output and every checkpoint hold the consolidated format of a single-process run
  (``moce_weights.safetensors`` with full-size tensors, or the PEFT adapter with MoCE in it),
  and ``load_moce_model`` on it reproduces rank 0's in-training logits exactly;
* resuming from the sharded checkpoint-2 reproduces the uninterrupted run's steps 3-4;
* ranks given different cluster mixes (rank 0: cluster 0 only, rank 1: never 0) do not hang
  under ZeRO-3 or FSDP2 and the logged expert load covers both ranks' clusters (in the LoRA
  runs of those two modes).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from axolotl_helpers import (
    ROOT,
    base_config,
    env,
    qlora_example_settings,
    run_train,
    train_losses,
    write_cluster_jsonl,
)
from safetensors.torch import load_file

from bench.launch import module_command

pytestmark = pytest.mark.slow

EXAMPLES = ROOT / "examples"
NPROC = 2
# Losses are fp32 means over the same global batch; sharding only changes the order of the
# gradient reductions (all-reduce / reduce-scatter of partial sums), i.e. rounding at the
# 1e-7 relative level per step. After 3 optimizer steps (lr 0.03) that stays far below 1e-4;
# a wrong batch split, a missing gradient reduction or a dropped aux loss moves the loss by
# more than 1e-3 already at step 2.
LOSS_TOL = dict(rel=1e-4, abs=1e-4)
# tiny model, 3 groups x 2 experts; keys end in the parameter's name inside MoCEExperts
MOCE_SHAPES = {"router.weight": (6, 32), "down": (6, 32, 8), "up": (6, 8, 32)}


def moce_param(key: str) -> str:
    """``layers.0.router.weight`` / ``...moce_experts.router.weight`` -> ``router.weight``."""
    return key.split("moce_experts.")[-1] if "moce_experts." in key else key.split(".", 2)[2]


def sharding_settings(mode: str) -> dict:
    """The examples' own sharding configuration."""
    if mode == "fsdp2":
        example = yaml.safe_load((EXAMPLES / "llama2-moce-fsdp.yml").read_text())
        return {"fsdp_version": example["fsdp_version"], "fsdp_config": example["fsdp_config"]}
    if mode == "zero2":
        return {"deepspeed": str(EXAMPLES / "deepspeed" / "zero2.json")}
    if mode == "zero3":
        example = yaml.safe_load((EXAMPLES / "llama2-moce-zero3.yml").read_text())
        return {"deepspeed": str(ROOT / example["deepspeed"])}
    raise ValueError(mode)


def launch(cfg: dict, workdir: Path, nproc: int = NPROC, timeout: int = 300) -> str:
    """`accelerate launch -m axolotl.cli.train` with nproc gloo processes (no accelerate
    config file: --multi_gpu selects accelerate's torchrun launcher, the plugin puts the
    ranks on gloo when there is no CUDA)."""
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = module_command("axolotl.cli.train", [str(path)], nproc)
    e = env()
    e["OMP_NUM_THREADS"] = "1"
    e.pop("ACCELERATE_USE_CPU", None)  # the plain launch, as on a GPU machine
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=e, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:  # a hang is a failure, not a stuck suite
        raise AssertionError(f"accelerate launch did not finish in {timeout}s (hang?)") from err
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({proc.returncode}):\n{log[-10000:]}")
    return log


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cluster_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", limit=240)


def sharded_config(model_dir: Path, data: Path, out: Path, mode: str, **overrides) -> dict:
    settings = dict(max_steps=4, save_steps=2, gradient_accumulation_steps=2,
                    plugins=["moce_plugin.MoCEPlugin", "rank_dump_plugin.RankDumpPlugin"])
    cfg = base_config(model_dir, data, out, **{**settings, **overrides})
    cfg.update(sharding_settings(mode))
    return cfg


def single_process_losses(model_dir: Path, data: Path, work: Path,
                          **overrides) -> dict[int, float]:
    """Per-step losses of one process with the sharded runs' global batch (micro-batch 2 x
    accumulation 4 = 2 ranks x 2 x 2), seed and data; overrides as given to the sharded run."""
    cfg = base_config(model_dir, data, work, **{**overrides, "max_steps": 4, "save_steps": 4,
                                                "gradient_accumulation_steps": 4})
    run_train(cfg, work)
    return train_losses(work / "model" / "checkpoint-4")


@pytest.fixture(scope="module")
def reference_losses(tiny_model_dir, data, tmp_path_factory) -> dict[int, float]:
    """One process, full MoCE fine-tune."""
    return single_process_losses(tiny_model_dir, data, tmp_path_factory.mktemp("single"))


# The LoRA runs' settings, and the packed + gradient-checkpointing extras. With packing,
# axolotl's MultipackBatchSampler wraps a plain RandomSampler that accelerate does not replace
# by its seeded sampler, so the packed order follows the global RNG, whose state differs
# between one process and DeepSpeed ranks (step-1 losses 8.2982 vs 8.2657 without this):
# curriculum_sampling (sequential packing) gives both the same bins.
LORA = dict(adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True)
PACKED_GC = dict(sample_packing=True, gradient_checkpointing=True, sequence_len=512,
                 curriculum_sampling=True)
# LoRA's A matrices come from the global RNG too: the same seed right before PEFT wraps the
# model (tests/seed_lora_plugin.py) in the compared runs, or they start from different LoRA.
SEED_LORA = "seed_lora_plugin.SeedLoraPlugin"


def assert_losses_match(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference), (losses, reference)
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], **LOSS_TOL), (step, losses, reference)


@pytest.fixture(scope="module")
def lora_reference_losses(tiny_model_dir, data, tmp_path_factory) -> dict[int, float]:
    """One process, LoRA + MoCE with sample packing and gradient checkpointing."""
    return single_process_losses(tiny_model_dir, data, tmp_path_factory.mktemp("single_lora"),
                                 plugins=["moce_plugin.MoCEPlugin", SEED_LORA], **LORA,
                                 **PACKED_GC)


def assert_full_moce_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(directory / "moce_weights.safetensors"))
    assert (directory / "moce_config.json").is_file()
    assert {k.split(".")[1] for k in weights} == {"0", "1"}
    for key, value in weights.items():
        assert tuple(value.shape) == MOCE_SHAPES[moce_param(key)], (key, value.shape)
    assert weights["layers.0.up"].abs().sum() > 0  # trained, not the zero init of `up`
    return weights


def assert_adapter_with_full_moce(directory: Path) -> dict[str, torch.Tensor]:
    """The PEFT adapter holds LoRA and the full (gathered) MoCE tensors; returns MoCE's."""
    adapter = load_file(str(directory / "adapter_model.safetensors"))
    moce = {k: v for k, v in adapter.items() if "moce_experts" in k}
    lora = {k: v for k, v in adapter.items() if "lora_A" in k}
    assert len(moce) == 6 and lora, sorted(adapter)[:8]
    for key, value in moce.items():
        assert tuple(value.shape) == MOCE_SHAPES[moce_param(key)], (key, value.shape)
    assert all(v.numel() > 0 for v in lora.values())
    assert_full_moce_weights(directory)
    return moce


def assert_reload_reproduces_training(out: Path) -> None:
    from rank_dump_plugin import PROBE_CLUSTERS, PROBE_IDS

    from moce_plugin.inference import load_moce_model

    in_training = torch.load(out / "rank0_logits.pt")
    rank0 = load_file(str(out / "rank0_moce.safetensors"))
    rank1 = load_file(str(out / "rank1_moce.safetensors"))
    for key in rank0:  # the gathered weights are the same on both ranks
        assert torch.equal(rank0[key], rank1[key]), key
    reloaded = load_moce_model(out)
    with torch.no_grad():
        logits = reloaded.model(input_ids=PROBE_IDS, moce_cluster_ids=PROBE_CLUSTERS).logits
    torch.testing.assert_close(logits, in_training, atol=1e-5, rtol=1e-5)


def _moce_cli(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("mode", ["fsdp2", "zero2", "zero3"])
def test_sharded_full_run_matches_single_process_saves_and_resumes(
    tmp_path, tiny_model_dir, data, reference_losses, mode
):
    cfg = sharded_config(tiny_model_dir, data, tmp_path, mode)
    log = launch(cfg, tmp_path)
    assert "MoCE parameters:" in log
    out = tmp_path / "model"
    losses = train_losses(out / "checkpoint-4")
    assert sorted(losses) == [1, 2, 3, 4]
    assert_losses_match(losses, reference_losses)
    for ckpt in ("checkpoint-2", "checkpoint-4", "."):
        assert_full_moce_weights(out / ckpt)
    full = load_file(str(out / "model.safetensors"))  # consolidated, like one process
    assert tuple(full["model.layers.1.mlp.moce_experts.down"].shape) == MOCE_SHAPES["down"]
    assert_reload_reproduces_training(out)
    if mode == "zero3":  # the CLIs on a sharded run's output
        _moce_cli("moce_plugin.export", str(out), str(tmp_path / "exported"), cwd=tmp_path)
        assert_full_moce_weights(tmp_path / "exported")
        text = _moce_cli("moce_plugin.generate", str(out), "--prompt", "Add 2 and 3.",
                         "--cluster", "2", "--max-new-tokens", "4", "--no-stream", cwd=tmp_path)
        assert text.strip()

    # Interrupt after step 2 and resume from the sharded checkpoint.
    shutil.rmtree(out / "checkpoint-4")
    launch({**cfg, "resume_from_checkpoint": str(out / "checkpoint-2")}, tmp_path)
    resumed = train_losses(out / "checkpoint-4")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-5), step


def test_fsdp2_sharded_state_dict_keeps_moce_exact_and_resumes(tmp_path, tiny_model_dir, data,
                                                               reference_losses):
    """FSDP2 with ``state_dict_type: SHARDED_STATE_DICT`` (DCP shards in the checkpoints):
    every checkpoint still gets the gathered MoCE tensors, the final output reloads them
    exactly (axolotl merges the final ``model.safetensors`` from the DCP shards in bfloat16,
    whatever the training dtype, so the base weights are only bf16-close), and resuming from
    the sharded checkpoint-2 reproduces steps 3-4."""
    from moce_plugin.inference import load_moce_model
    from moce_plugin.model.upcycle import moce_state_dict

    cfg = sharded_config(tiny_model_dir, data, tmp_path, "fsdp2")
    cfg["fsdp_config"] = {**cfg["fsdp_config"], "state_dict_type": "SHARDED_STATE_DICT"}
    launch(cfg, tmp_path)
    out = tmp_path / "model"
    assert (out / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # really sharded
    losses = train_losses(out / "checkpoint-4")
    assert_losses_match(losses, reference_losses)
    for ckpt in ("checkpoint-2", "checkpoint-4", "."):
        assert_full_moce_weights(out / ckpt)
    assert load_file(str(out / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    in_training = load_file(str(out / "rank0_moce.safetensors"))
    reloaded = moce_state_dict(load_moce_model(out).model)
    assert reloaded.keys() == in_training.keys()
    for key, value in reloaded.items():
        assert torch.equal(value, in_training[key]), key

    shutil.rmtree(out / "checkpoint-4")
    launch({**cfg, "resume_from_checkpoint": str(out / "checkpoint-2")}, tmp_path)
    resumed = train_losses(out / "checkpoint-4")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-5), step


def assert_routing_log_has_both_ranks_clusters(out: Path, steps: int) -> None:
    rows = [json.loads(line) for line in (out / "moce_routing.jsonl").read_text().splitlines()]
    assert len(rows) == steps
    for row in rows:
        for layer in row["layers"].values():
            tokens = layer["group_tokens"]
            # Written by rank 0, which saw only cluster 0: clusters 1/2 come from rank 1.
            assert tokens[0] > 0 and tokens[1] + tokens[2] > 0, tokens


@pytest.mark.parametrize(
    "mode,extra",
    [("fsdp2", {}), ("zero2", PACKED_GC), ("zero3", PACKED_GC)],
    ids=["fsdp2-mixes", "zero2-packed-gc", "zero3-packed-gc-mixes"],
)
def test_sharded_lora_run_saves_adapter_with_full_moce(request, tmp_path, tiny_model_dir, data,
                                                       mode, extra):
    """LoRA + MoCE. Under FSDP2 and ZeRO-3 the ranks also get different cluster mixes
    (rank 0: cluster 0 only, rank 1: never 0, tests/rank_cluster_plugin.py): the run must not
    hang (launch() fails after its timeout) and the logged expert load must be all ranks'.
    Those two runs cannot be compared with one process: no single process sees that data
    order (each rank's cluster ids are rewritten), so their losses are only checked finite.
    The ZeRO-2 run sees the normal data: its losses must match one process with the same
    LoRA, packing and gradient-checkpointing settings (lora_reference_losses)."""
    mixes = mode in ("fsdp2", "zero3")
    plugins = ["moce_plugin.MoCEPlugin", "rank_dump_plugin.RankDumpPlugin"]
    plugins.append("rank_cluster_plugin.RankClusterPlugin" if mixes else SEED_LORA)
    cfg = sharded_config(tiny_model_dir, data, tmp_path, mode, plugins=plugins, **LORA, **extra)
    launch(cfg, tmp_path)
    out = tmp_path / "model"
    losses = train_losses(out / "checkpoint-4")
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v for v in losses.values())
    for ckpt in ("checkpoint-2", "checkpoint-4", "."):
        assert_adapter_with_full_moce(out / ckpt)
    assert_reload_reproduces_training(out)
    if mixes:
        assert_routing_log_has_both_ranks_clusters(out, steps=4)
    if mode == "fsdp2":
        _moce_cli("moce_plugin.export", str(out), str(tmp_path / "exported"), cwd=tmp_path)
        assert_full_moce_weights(tmp_path / "exported")
    if not mixes:
        assert extra == PACKED_GC  # the settings of the reference run
        assert_losses_match(losses, request.getfixturevalue("lora_reference_losses"))


def test_plugin_puts_cpu_ranks_on_gloo():
    """Unit check of the CPU adjustments (moce_plugin/integration/cpu_dist.py)."""
    from moce_plugin.integration.patches import install_patches

    install_patches()
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.state import AcceleratorState, PartialState
    from axolotl.loaders.model import ModelLoader

    if torch.cuda.is_available():
        pytest.skip("the patches are only installed without CUDA")
    for fn in (ParallelismConfig.build_device_mesh, PartialState._prepare_backend,
               AcceleratorState.__init__, ModelLoader._set_device_map_config):
        assert getattr(fn, "_moce_patched", False), fn


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes")
def test_fsdp2_qlora_run_keeps_4bit_ffn_and_saves_adapter_with_moce(tmp_path, tiny_model_dir,
                                                                    data):
    """FSDP2 + QLoRA (axolotl's recipe: adapter qlora + load_in_4bit + fsdp_version 2, the
    settings of examples/llama2-moce-qlora.yml and examples/llama2-moce-fsdp.yml), 2 gloo
    ranks. On CPU this needs the plugin's device_map fix (integration/cpu_dist.py): axolotl
    pins each rank to {"": LOCAL_RANK}, a CUDA index. Checked: the FFN is a 4-bit Linear4bit
    before and (as a DTensor shard of a Params4bit) after training and runs once per forward,
    MoCE is float32 and trainable, every save holds the gathered MoCE tensors, and
    load_moce_model reloads them. Losses: only checked to fall (not compared with one process)."""
    # (not RankDumpPlugin: its eval-mode probe hits bitsandbytes' CPU inference repack, which
    # fails for the tiny model's in_features < 64, see test_quantized_axolotl.py)
    plugins = ["moce_plugin.MoCEPlugin", "quant_check_plugin.QuantCheckPlugin"]
    cfg = sharded_config(tiny_model_dir, data, tmp_path, "fsdp2", plugins=plugins,
                         **{**LORA, **qlora_example_settings()})
    assert cfg["adapter"] == "qlora" and cfg["load_in_4bit"] and cfg["fsdp_version"] == 2
    launch(cfg, tmp_path)
    out = tmp_path / "model"
    info = json.loads((out / "quant_check.json").read_text())
    assert info["ffn_classes"] == ["Linear4bit"] and info["ffn_bytes_per_weight"] == [0.5], info
    assert info["ffn_weight_after_training"] == ["DTensor", "Params4bit"], info
    assert info["ffn_calls_per_forward"] == 1, info
    assert info["moce_dtypes"] == ["torch.float32"] and info["moce_trainable"], info
    losses = train_losses(out / "checkpoint-4")
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1], losses
    assert_adapter_with_full_moce(out / "checkpoint-2")
    # checkpoint-4 (the trainer's save) and the final adapter (the plugin's FSDP2 save) hold
    # the same trained MoCE, gathered by two different paths
    at_step4 = assert_adapter_with_full_moce(out / "checkpoint-4")
    final = assert_adapter_with_full_moce(out)
    assert at_step4.keys() == final.keys()
    for key in final:
        assert torch.equal(final[key], at_step4[key]), key
    from moce_plugin.inference import load_moce_model
    from moce_plugin.model.upcycle import moce_state_dict

    reloaded = load_moce_model(out)  # float32 base + adapter + MoCE
    saved = load_file(str(out / "moce_weights.safetensors"))
    reloaded_moce = moce_state_dict(reloaded.model)
    assert reloaded_moce.keys() == saved.keys()
    for key, value in reloaded_moce.items():  # the trained MoCE, not a fresh init
        assert torch.equal(value, saved[key]), key
    with torch.no_grad():
        logits = reloaded.model(input_ids=torch.arange(4, 28).view(2, 12),
                                moce_cluster_ids=torch.tensor([0, 2])).logits
    assert torch.isfinite(logits).all()
