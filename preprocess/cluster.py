"""Stage 1 of MoCE: cluster the training data of an axolotl YAML into a cluster artifact.

    python preprocess/cluster.py CONFIG.yml [options]

The documented entry point from a checkout; the same command is installed as ``moce-cluster``
(a pip user has no ``preprocess/`` folder), and ``axolotl preprocess CONFIG.yml`` runs it when
the artifact is missing. All logic, and every option, lives in
:mod:`moce_plugin.clustering.cli`; ``--help`` lists them. See docs/clustering.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
# Run as a script from a checkout: make the package importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moce_plugin.clustering.cli import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="preprocess/cluster.py"))
