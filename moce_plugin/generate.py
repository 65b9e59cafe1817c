"""Compatibility path: `python -m moce_plugin.generate` (documented); the code lives in
:mod:`moce_plugin.outputs.generate`."""

from .outputs.generate import *  # noqa: F401,F403
from .outputs.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
