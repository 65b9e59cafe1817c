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

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")

# The package is installed (scripts/install.sh, editable): this wrapper only forwards to it.
from moce_plugin.clustering.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="preprocess/cluster.py"))
