"""Shim kept for ``python -m moce_plugin.generate`` (0.1 docs and scripts use it); the command is
``moce-generate`` or ``python -m moce_plugin generate``;
the code lives in :mod:`moce_plugin.outputs.generate`."""

from .outputs.generate import *  # noqa: F401,F403
from .outputs.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
