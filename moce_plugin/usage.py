"""Compatibility path: `python -m moce_plugin.usage` (documented); the code lives in
:mod:`moce_plugin.outputs.usage`."""

from .outputs.usage import *  # noqa: F401,F403
from .outputs.usage import main

if __name__ == "__main__":
    raise SystemExit(main())
