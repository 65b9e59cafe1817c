"""Merge LoRA into the base and write one self-contained MoCE directory.

    moce-export OUTPUT_DIR DEST [--base-model PATH] [--dtype bfloat16]
        [--overwrite] [--allow-different-base] [--debug]

DEST must be new or empty (``--overwrite`` replaces an earlier export, never anything else)
and may not be, contain or lie inside OUTPUT_DIR; these checks run before anything is loaded,
the folder is built beside DEST and swapped in at the end, and a failure leaves DEST as it was.

DEST holds the merged weights (safetensors, with the MoCE parameters), config, tokenizer,
``moce_config.json`` / ``moce_weights.safetensors``, the cluster artifact and a README card;
``moce_plugin.load_moce_model(DEST)`` reloads it with one call.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import ExportError
from ..utils import FolderKind, atomic_dir, cli_errors, give_weights_new_file_mode
from .folder import ARTIFACT_DIR_NAME, save_moce_files
from .hf_export import write_hf_native
from .load import add_loading_arguments, load_moce_model

EXPORT_RECORD = "moce_export.json"


def is_export(path: Path) -> bool:
    """An earlier export (what --overwrite may replace): it holds the export record."""
    return (path / EXPORT_RECORD).is_file()


EXPORT_KIND = FolderKind("MoCE export", is_export,
                         "Choose a new or empty DEST, or move that folder away first.", ExportError)


def _writable_ancestor(dest: Path) -> Path:
    """The nearest existing folder above ``dest``: where the build folder goes."""
    parent = dest.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def check_export_paths(
    source: str | Path, dest: str | Path, overwrite: bool = False,
    allow_inside_source: bool = False,
) -> None:
    """Refuse every DEST whose writing could destroy data, before anything is loaded.

    DEST may not be SRC, contain SRC (replacing it would delete the training run) or, unless
    ``allow_inside_source`` (axolotl merge-lora's fixed ``<output_dir>/merged``), lie inside
    SRC; a non-empty DEST is replaced only when it is an earlier export and ``overwrite`` is
    given; DEST's parent must be writable.
    """
    src, dst = Path(source).resolve(), Path(dest).resolve()
    if dst == src:
        raise ExportError(f"DEST {dest} is the folder being exported: choose a new folder.")
    if dst in src.parents:
        raise ExportError(
            f"DEST {dest} contains the folder being exported ({source}): replacing it would "
            "delete the source (also with --overwrite). Choose a folder outside it."
        )
    if src in dst.parents and not allow_inside_source:
        raise ExportError(
            f"DEST {dest} is inside the folder being exported ({source}): choose a folder "
            "outside it."
        )
    if dst.exists() and not dst.is_dir():
        raise ExportError(f"DEST {dest} exists and is not a folder: choose a new folder.")
    if dst.is_dir() and any(dst.iterdir()) and not is_export(dst):
        raise ExportError(
            f"DEST {dest} is not empty and is not an earlier export (no {EXPORT_RECORD}): it "
            "is never replaced, also with --overwrite. Choose a new or empty folder."
        )
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ExportError(
            f"DEST {dest} holds an earlier export: pass --overwrite (overwrite=True) to "
            "replace it, or choose a new folder."
        )
    parent = _writable_ancestor(dst)
    try:  # os.access is not enough (root, read-only mounts): try to create what export will
        probe = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dst.name}.probe-"))
        probe.rmdir()
    except OSError as exc:
        raise ExportError(
            f"cannot write to {parent} (the parent of DEST {dest}): {exc.strerror or exc}. "
            "Choose a writable location."
        ) from exc


def export_model(
    source: str | Path, dest: str | Path, base_model: str | None = None,
    dtype: torch.dtype = torch.float32, overwrite: bool = False,
    allow_different_base: bool = False, allow_inside_source: bool = False,
) -> Path:
    """Write the merged model to ``dest``; see :func:`check_export_paths` for what is refused.
    The folder is built beside ``dest`` and swapped in at the end, removed on any failure."""
    source, dest = Path(source), Path(dest)
    check_export_paths(source, dest, overwrite, allow_inside_source)
    moce = load_moce_model(source, base_model=base_model, merge_lora=True, dtype=dtype,
                           allow_different_base=allow_different_base)
    meta = dict(moce.meta)  # the folder's, or for a bare checkpoint its run's
    meta["adapter"] = None
    meta["exported_from"] = str(source)
    meta["saved"] = "export"

    def fill(tmp: Path) -> None:
        moce.model.save_pretrained(tmp)
        give_weights_new_file_mode(tmp)
        moce.tokenizer.save_pretrained(tmp)
        save_moce_files(moce.model, moce.config, tmp, meta)
        if moce.cluster_model is not None:
            shutil.copytree(moce.cluster_model.path, tmp / ARTIFACT_DIR_NAME)
        write_hf_native(tmp, moce, source)  # config/auto_map, remote code, model card
        (tmp / EXPORT_RECORD).write_text(json.dumps({"source": str(source)}, indent=2))

    return atomic_dir(dest, fill, EXPORT_KIND)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="MoCE output directory (axolotl output_dir or checkpoint)")
    parser.add_argument("dest", help="directory to write (new or empty; see --overwrite)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export at DEST (never other files, nor SOURCE)")
    add_loading_arguments(parser)
    args = parser.parse_args(argv)
    with cli_errors(args.debug, "moce_plugin.export"):
        out = export_model(args.source, args.dest, args.base_model, getattr(torch, args.dtype),
                           overwrite=args.overwrite,
                           allow_different_base=args.allow_different_base)
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
