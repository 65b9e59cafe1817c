"""Every patch of axolotl / transformers is listed in one place and its target exists."""

from __future__ import annotations

from moce_plugin.integration import patches


def test_every_patch_target_exists_in_installed_axolotl():
    assert patches.check_targets() == []


def test_check_targets_reports_a_missing_target(monkeypatch):
    gone = patches.Patch("axolotl.utils.data.sft", "no_such_function", "x:y", "test")
    monkeypatch.setattr(patches, "PATCHES", (*patches.PATCHES, gone))
    problems = patches.check_targets()
    assert len(problems) == 1 and "no_such_function" in problems[0]


def test_install_is_idempotent_and_replaces_each_target():
    patches.install_patches()
    first = [patches._resolve(p.module, p.attribute)[2] for p in patches.PATCHES]
    patches.install_patches()
    second = [patches._resolve(p.module, p.attribute)[2] for p in patches.PATCHES]
    assert first == second
    for patch, value in zip(patches.PATCHES, first):
        assert getattr(value, "_moce_patched", False), patch.attribute
        for module in patch.also_in:
            assert patches._resolve(module, patch.attribute)[2] is value


def test_fsdp_qlora_rank_device_map_loads_on_cpu_without_cuda():
    """axolotl pins FSDP + QLoRA ranks to {"": LOCAL_RANK} (a CUDA index); without CUDA the
    plugin's wrapper turns that into the CPU, and leaves device names alone."""
    import torch

    from moce_plugin.integration.cpu_dist import wrap_set_device_map_config

    class Loader:
        def __init__(self, device_map: object) -> None:
            self.device_map = device_map
            self.model_kwargs: dict = {}

    def original(self: Loader) -> None:
        self.model_kwargs["device_map"] = self.device_map

    wrapped = wrap_set_device_map_config(original)
    rank_pinned, named = Loader({"": 1}), Loader({"": "meta"})
    wrapped(rank_pinned)
    wrapped(named)
    expected = {"": 1} if torch.cuda.is_available() else {"": "cpu"}
    assert rank_pinned.model_kwargs["device_map"] == expected
    assert named.model_kwargs["device_map"] == {"": "meta"}
