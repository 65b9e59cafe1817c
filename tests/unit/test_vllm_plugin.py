"""The vLLM plugin's parts that need no vLLM: where vLLM is imported, the family mapping."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from moce_plugin.errors import ExportError
from moce_plugin.model.architectures import supported_model_types
from moce_plugin.outputs.vllm_plugin import VLLM_BASE_ARCHITECTURES, moce_architecture

PACKAGE = Path(__file__).resolve().parents[2] / "moce_plugin"


def _vllm_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level) of each vllm import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [])
        if any(n == "vllm" or n.startswith("vllm.") for n in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_vllm_is_imported_only_by_the_vllm_modules():
    # The main environment has no vLLM: the plugin module imports it inside register() only.
    importers = {str(p.relative_to(PACKAGE)): _vllm_imports(p) for p in PACKAGE.rglob("*.py")}
    importers = {k: v for k, v in importers.items() if v}
    assert set(importers) == {"outputs/vllm_plugin.py", "outputs/vllm_model.py"}
    assert not any(top for _, top in importers["outputs/vllm_plugin.py"])


def test_every_supported_family_has_a_vllm_class():
    assert set(VLLM_BASE_ARCHITECTURES) == set(supported_model_types())
    assert moce_architecture("llama") == "MoCELlamaForCausalLM"
    with pytest.raises(ExportError, match="transformers serve"):
        moce_architecture("gpt2")


def test_pyproject_declares_the_vllm_entry_point():
    import importlib

    import tomllib

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    target = pyproject["project"]["entry-points"]["vllm.general_plugins"]["moce"]
    module, name = target.split(":")
    assert callable(getattr(importlib.import_module(module), name))
