"""Shim kept for ``python -m moce_plugin.export`` (0.1 docs and scripts use it); the command is
``moce-export`` or ``python -m moce_plugin export``;
the code lives in :mod:`moce_plugin.outputs.export`."""

from .outputs.export import *  # noqa: F401,F403
from .outputs.export import main

if __name__ == "__main__":
    raise SystemExit(main())
