"""Shim kept for ``python -m moce_plugin.usage`` (0.1 docs and scripts use it); the command is
``moce-usage`` or ``python -m moce_plugin usage``;
the code lives in :mod:`moce_plugin.outputs.usage`."""

from .outputs.usage import *  # noqa: F401,F403
from .outputs.usage import main

if __name__ == "__main__":
    raise SystemExit(main())
