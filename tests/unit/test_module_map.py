"""moce_plugin/README.md's module map is true: every module is in it, no import cycle (not even
through imports inside functions), the layers it states, and its "Imports axolotl" paragraph.

Imports are read with ``ast`` (nothing is imported), so the test is fast and sees lazy imports.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "moce_plugin"
README = PKG / "README.md"


@dataclass(frozen=True)
class Import:
    target: str  # a dotted name: a moce_plugin module, or any other top-level import
    in_function: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path) -> Iterator[Import]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                yield from (Import(alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                # `from . import encode` imports the submodule, not the package's namespace.
                subs = [f"{target}.{a.name}" for a in child.names
                        if f"{target}.{a.name}" in MODULES]
                yield from (Import(s, in_function) for s in subs)
                if len(subs) < len(child.names):
                    yield Import(target, in_function)
            yield from visit(child, inside)

    yield from visit(ast.parse(path.read_text(encoding="utf-8")), False)


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {i.target for i in _imports(path)
                       if i.target in MODULES and i.target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _rel(name: str) -> str:
    return str(MODULES[name].relative_to(PKG))


def test_no_import_cycle_among_moce_plugin_modules():
    assert find_cycle(_graph()) is None, " -> ".join(find_cycle(_graph()) or [])


def test_cycle_finder_finds_a_planted_cycle():
    graph = _graph()
    graph["moce_plugin.clustering.report"].add("moce_plugin.clustering.pipeline")
    cycle = find_cycle(graph)
    assert cycle and cycle[0] == cycle[-1] and len(cycle) >= 3


def test_layers_as_the_map_states():
    # model/ and clustering/ import nothing of the package but utils and errors; outputs/ never
    # integration/.
    bad = []
    for name, targets in _graph().items():
        layer = ".".join(name.split(".")[:2])
        for target in targets:
            if layer in ("moce_plugin.model", "moce_plugin.clustering"):
                ok = target.startswith(layer) or target in ("moce_plugin.utils", "moce_plugin.errors")
            elif layer == "moce_plugin.outputs":
                ok = not target.startswith("moce_plugin.integration")
            else:
                ok = True
            if not ok:
                bad.append(f"{_rel(name)} imports {target}")
    assert not bad, bad


def _axolotl_paragraph() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^Imports axolotl:.*?(?:\n\n|\Z)", text, re.S | re.M)
    assert match, "moce_plugin/README.md has no 'Imports axolotl:' paragraph"
    return match.group(0)


def test_imports_axolotl_paragraph_is_true():
    paragraph = _axolotl_paragraph()
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", paragraph))
    importers: dict[str, list[Import]] = {}
    for name, path in MODULES.items():
        found = [i for i in _imports(path) if i.target.split(".")[0] == "axolotl"]
        if found:
            importers[_rel(name)] = found
    # Every importer is named (a folder names all its modules), and every named file imports it.
    unnamed = [m for m in importers
               if m not in named and not any(d.endswith("/") and m.startswith(d) for d in named)]
    assert not unnamed, f"modules import axolotl but the map does not say so: {unnamed}"
    over = [f for f in named if f.endswith(".py") and f not in importers]
    assert not over, f"the map says these import axolotl, they do not: {over}"
    # Outside integration/ the import is lazy (inside a function): importing the module, e.g.
    # for inference, never loads axolotl.
    eager = [m for m, found in importers.items()
             if not m.startswith("integration/") and any(not i.in_function for i in found)]
    assert not eager, f"import axolotl at module level outside integration/: {eager}"
    eager_named = re.search(r"at module level only in `([\w/]+\.py)`", paragraph)
    assert eager_named, "the paragraph names the one module-level importer"
    eager_integration = [m for m, found in importers.items()
                         if m.startswith("integration/") and any(not i.in_function for i in found)]
    assert eager_integration == [eager_named.group(1)]


def test_every_module_is_in_the_map():
    text = README.read_text(encoding="utf-8")
    table = {p for line in text.splitlines() if line.startswith("| `")
              for p in re.findall(r"`([\w/]+\.py)`", line.split("|")[1])}
    missing = [rel for rel in map(_rel, MODULES)
               if rel not in table and not (rel.endswith("/__init__.py") and "/" in rel)]
    assert not missing, f"modules missing from moce_plugin/README.md's table: {missing}"
    stale = [p for p in table if not (PKG / p).is_file()]
    assert not stale, f"the table names modules that do not exist: {stale}"
