"""Shared runner of the planted-bug scripts (``tests/mutate_*.py``): each bug is planted in
a scratch copy of the repository, so the working tree is never left mutated (also when the
run is killed), and the named tests must fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (what, file, original text, planted text, test file, -k expression)
Mutant = tuple[str, str, str, str, str, str]


def _ignore(folder: str, names: list[str]) -> set[str]:
    """Not copied: caches, virtual environments, models and run outputs at the top level
    (not the package's moce_plugin/outputs)."""
    skip = {".venv", ".venv-vllm", ".git", "__pycache__", ".pytest_cache", ".moce_cache"}
    if Path(folder) == ROOT:
        skip.add("outputs")
    if Path(folder) == ROOT / "examples":
        skip.add("models")
    return skip & set(names)


def run_mutants(mutants: Sequence[Mutant], only: Sequence[str], prefix: str,
                pytest_args: Sequence[str] = ()) -> int:
    """Plant each mutant whose name contains one of ``only`` (all when empty), run its tests
    with ``pytest_args``; prints one line per mutant, returns 0 when every one was caught."""
    caught = total = 0
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=_ignore)
        env = {**os.environ, "PYTHONPATH": str(copy)}  # the copy, not an installed package
        for name, file, old, new, test, k in mutants:
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
                proc = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                     *pytest_args, test, "-k", k],
                    cwd=copy, env=env, capture_output=True, text=True)
            finally:
                path.write_text(original)
            ok = proc.returncode == 1  # tests failed (not: collection error, none selected)
            caught += ok
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            print(f"{'CAUGHT  ' if ok else 'MISSED  '}{name}  (rc {proc.returncode}: {last})",
                  flush=True)
    print(f"{caught} of {total} caught")
    return 0 if caught == total else 1
