"""Small helpers every part shares: atomic writes, JSON reads that name their file, pyplot."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FileFormatError


def describe_difference(diff: dict[str, tuple[Any, Any]], recorded: str,
                        given: str = "YAML") -> str:
    """``{key: (recorded value, given value)}`` as one clause of an error message, e.g.
    ``top_k: checkpoint 1, YAML 2; adapter_dim: checkpoint 8, YAML 16``: the one wording of
    every "the YAML differs from what was recorded" refusal."""
    return "; ".join(f"{k}: {recorded} {a!r}, {given} {b!r}" for k, (a, b) in diff.items())


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


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under 022)."""
    try:  # Linux >= 4.7 reports it without changing it (os.umask would, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def give_new_file_mode(*paths: str | os.PathLike) -> None:
    """Give files just written the mode of a new file under the umask. safetensors >= 0.8
    writes through a temporary file that is always 0600 (safetensors#782), so weights written
    by it (ours, transformers' save_pretrained) would be unreadable for a serving account or a
    teammate while every other file of the folder is not."""
    mode = new_file_mode()
    for path in paths:
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, mode)


def give_weights_new_file_mode(folder: str | os.PathLike) -> None:
    """:func:`give_new_file_mode` for the ``*.safetensors`` files directly in ``folder``."""
    give_new_file_mode(*Path(folder).glob("*.safetensors"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Like :func:`atomic_write_bytes` for writers that take a path (safetensors, numpy); the
    file gets the umask's mode whatever the writer gave it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        give_new_file_mode(tmp)
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


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
# .NAME.tmp-<host>-<pid>-<random> (and .old-): host and pid tell a killed run's leftovers
# from a live run's; the names of earlier versions (mkdtemp's 8 characters; .old-<pid>) too.
_SIDE = re.compile(r"(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}|(?P<legacy>[a-z0-9_]{8})"
                   r"|(?P<legacy_pid>\d+)")


def _side_path(target: Path, role: str) -> Path:
    return target.with_name(f".{target.name}.{role}-{_HOST}-{os.getpid()}-{os.urandom(4).hex()}")


def _apply_mode(root: Path, mode: int) -> None:
    """Give every folder under ``root`` the mode a new folder gets (copytree copies a source's
    0700 otherwise); files keep theirs (written with the umask, or copied: the fill function
    fixes what a writer like safetensors left at 0600, :func:`give_weights_new_file_mode`)."""
    for folder, _, _ in os.walk(root):
        os.chmod(folder, mode)


def _process_started(pid: int) -> float | None:
    """Start time (epoch seconds) of a live process; None when it is gone; +inf when unknown."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return float("-inf")  # alive, start unknown: never taken for a reused pid
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # pragma: no cover - access denied: alive
        return float("-inf")


def _is_stale(path: Path, rest: str) -> bool:
    """A temporary of ``target`` left by a run that is gone: its pid (on this host) is dead or
    now belongs to a process started after the folder was last written (a reused pid), or,
    for names without a pid, it is older than this process. Other hosts' are kept (their
    pids cannot be checked from here)."""
    match = _SIDE.fullmatch(rest)
    if match is None:
        return False
    try:
        mtime = path.lstat().st_mtime
    except OSError:
        return False
    if match["legacy"]:
        return mtime < (_process_started(os.getpid()) or float("-inf"))
    if match["host"] is not None and match["host"] != _HOST:
        return False
    pid = int(match["pid"] or match["legacy_pid"])
    if pid == os.getpid():
        return False
    started = _process_started(pid)
    return started is None or started > mtime + 1.0


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the ``.NAME.tmp-*`` / ``.NAME.old-*`` folders of ``target`` that a killed run
    (kill -9, power loss) left beside it; only ``target``'s, only stale ones
    (:func:`_is_stale`). Returns what was removed."""
    target = Path(target)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    # a killed swap may leave the earlier folder only as .old-*: kept until a new one is in
    for role in ("tmp", "old") if os.path.lexists(target) else ("tmp",):
        prefix = f".{target.name}.{role}-"
        for path in target.parent.glob(glob.escape(prefix) + "*"):
            if _is_stale(path, path.name[len(prefix):]):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        logging.getLogger(__name__).info("removed %d stale temporaries of %s (a killed run's): %s",
                                         len(removed), target, [p.name for p in removed])
    return removed


def atomic_dir(target: str | os.PathLike, fill: Callable[[Path], None],
               kind: FolderKind) -> Path:
    """Build a directory next to ``target`` and swap it in, so readers never see a half one.
    Only an earlier ``kind`` folder (or nothing) at ``target`` is replaced
    (:func:`check_replaceable`). The temporary directory is removed on every failure."""
    target = Path(target)
    if target.is_symlink() and target.is_dir():
        target = Path(os.path.realpath(target))  # write where the link points, keep the link
    check_replaceable(target, kind)
    remove_stale_temporaries(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _side_path(target, "tmp")
    tmp.mkdir()  # not mkdtemp (always 0700): the user's umask decides who may read the result
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        fill(tmp)
        _apply_mode(tmp, mode)
        check_replaceable(target, kind)  # something may have appeared while filling
        old = None
        if target.exists():
            old = _side_path(target, "old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        remove_stale_temporaries(target)  # a killed swap's .old-* copy, now superseded
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
