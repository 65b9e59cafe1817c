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
