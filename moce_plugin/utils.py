"""Small helpers every part shares: atomic writes, JSON reads that name their file, pyplot."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class FileFormatError(ValueError):
    """A file the package wrote (or expects) cannot be read; the message names the file."""


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """``json.loads`` of ``path``; a damaged file is reported with its name, not a bare
    JSONDecodeError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            f"{what} {path} is damaged (not valid JSON: {exc.msg} at line {exc.lineno}); "
            "restore it from a copy or re-create it."
        ) from exc


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[Any]:
    """One JSON value per non-empty line of ``path``; a bad line is reported with the file
    name and line number."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise FileFormatError(
                    f"{what} {path} is damaged at line {lineno} (not valid JSON: {exc.msg}); "
                    "restore it from a copy or re-create it."
                ) from exc
    return rows


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``, so a
    reader (or an interrupted run) never sees half a file."""
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Like :func:`atomic_write_bytes` for writers that take a path (safetensors, numpy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder the package writes (cluster artifact, export, ...): how an earlier one
    is recognised, so that writing replaces only that and never a user's files."""

    name: str  # "cluster artifact", named in the refusal
    is_own: Callable[[Path], bool]  # True for an earlier folder of this kind
    fix: str  # what to do instead, appended to the refusal
    error: type[Exception] = ValueError  # the writing module's error class


def _describe(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    if not path.is_dir():
        return "a file"
    entries = sorted(p.name for p in path.iterdir())
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    return f"a folder of {len(entries)} entries ({shown})"


def check_replaceable(target: str | os.PathLike, kind: FolderKind) -> None:
    """Refuse (``kind.error``) to write a ``kind`` folder at ``target`` when something that is
    not an earlier one of that kind is there: a file, a user's folder, the training data.
    Nothing there, or an empty folder, is fine. Callers run this before any heavy work;
    :func:`atomic_dir` runs it again just before the swap."""
    target = Path(target)
    if not os.path.lexists(target):
        return
    if target.is_dir() and (not any(target.iterdir()) or kind.is_own(target)):
        return
    raise kind.error(
        f"{target} already exists and is not a {kind.name} ({_describe(target)}): writing the "
        f"{kind.name} there would replace it, so nothing was done. {kind.fix}"
    )


def atomic_dir(target: str | os.PathLike, fill: Callable[[Path], None],
               kind: FolderKind) -> Path:
    """Build a directory next to ``target`` and swap it in, so readers never see a half one.
    Only an earlier ``kind`` folder (or nothing) at ``target`` is replaced
    (:func:`check_replaceable`). The temporary directory is removed on every failure."""
    target = Path(target)
    if target.is_symlink() and target.is_dir():
        target = Path(os.path.realpath(target))  # write where the link points, keep the link
    check_replaceable(target, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        fill(tmp)
        check_replaceable(target, kind)  # something may have appeared while filling
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@contextmanager
def cli_errors(debug: bool = False, prog: str = "moce") -> Iterator[None]:
    """For command-line entry points: an expected error (bad input, damaged or missing file:
    ValueError / OSError, whose messages name the problem and the fix) is printed as one line
    and exits with status 2; ``debug=True`` (the ``--debug`` flag) adds the traceback."""
    try:
        yield
    except (ValueError, OSError) as exc:
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (plots are written to PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
