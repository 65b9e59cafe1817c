"""Output folders saved by moce-plugin before the package restructure still load, with the
same logits (tests/data/legacy_v0_1/README.md says how they were made)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moce_plugin.outputs.load import load_moce_model

LEGACY = Path(__file__).parents[1] / "data" / "legacy_v0_1"


@pytest.mark.parametrize("name", ["full_acmoe_v", "lora_linear"])
def test_folder_saved_by_0_1_0_reloads_with_same_logits(name):
    expected = torch.load(LEGACY / "expected.pt")
    base = str(LEGACY / "base") if name.startswith("lora") else None
    moce = load_moce_model(LEGACY / name, base_model=base, prompt_format="raw")
    logits = moce.logits(expected["input_ids"], expected["clusters"])
    torch.testing.assert_close(logits, expected["logits"][name], rtol=0, atol=1e-5)
